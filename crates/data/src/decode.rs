//! Image decoding that refuses damaged files.
//!
//! The `image` crate decodes JPEG with `zune-jpeg` in its lenient mode: a file cut short or with garbage in its
//! entropy-coded data decodes "successfully", the missing part filled with grey, and only a log line (which we
//! do not see) records it. PIL raises `image file is truncated` on the same files. Training on such an image
//! silently teaches the model grey boxes, so JPEGs are decoded here with `zune-jpeg` directly: headers in lenient
//! mode (extraneous bytes between header markers are common and harmless; libjpeg only warns about them), the
//! image data in strict mode, where running out of data or an invalid Huffman code or marker is an error. The
//! cost is that of a normal decode (the same decoder, one pass). PNGs go through `image`, whose `png` decoder
//! already fails on truncated data and on bad CRCs.

use std::path::Path;

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use crate::coco::ImageRecord;
use crate::error::DataError;

/// An 8-bit RGB image, rows of interleaved `r, g, b`.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

/// JPEG start-of-image marker, the first two bytes of every JPEG file.
const JPEG_SOI: [u8; 2] = [0xFF, 0xD8];
/// JPEG end-of-image marker.
const JPEG_EOI: [u8; 2] = [0xFF, 0xD9];

/// Decodes a JPEG or PNG file to RGB (format guessed from the content). A truncated or corrupt file is an
/// [`DataError::Io`] of kind `InvalidData` whose message says which.
pub fn decode_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_rgb_bytes(&bytes).map_err(|message| DataError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    })
}

/// Decodes an in-memory JPEG or PNG to RGB; the error says what is wrong with the data.
pub fn decode_rgb_bytes(bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.starts_with(&JPEG_SOI) {
        return decode_jpeg(bytes);
    }
    let decoded = image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
    let rgb = decoded.into_rgb8();
    Ok(RgbImage { width: rgb.width(), height: rgb.height(), data: rgb.into_raw() })
}

/// Whether the JPEG data ends with the end-of-image marker (trailing zero or 0xFF padding allowed).
fn ends_with_eoi(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0x00).map_or(0, |i| i + 1);
    bytes[..end].ends_with(&JPEG_EOI)
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, String> {
    let lenient = DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let failed = |e: &dyn std::fmt::Display| {
        if ends_with_eoi(bytes) {
            format!("corrupt JPEG data ({e})")
        } else {
            format!("truncated JPEG: the data stops after {} bytes without an end-of-image marker ({e})", bytes.len())
        }
    };
    let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), lenient);
    decoder.decode_headers().map_err(|e| failed(&format!("in the headers: {e}")))?;
    decoder.set_options(lenient.set_strict_mode(true));
    let data = decoder.decode().map_err(|e| failed(&e))?;
    let (width, height) = decoder.dimensions().ok_or_else(|| failed(&"no image size after decoding"))?;
    let expected = width * height * 3;
    if data.len() != expected {
        return Err(failed(&format!("{} bytes of pixels for {width}x{height} RGB", data.len())));
    }
    Ok(RgbImage { width: width as u32, height: height as u32, data })
}

/// Decodes the image of a dataset record and checks its size against the JSON's; every failure is a
/// [`DataError::ImageFile`] naming the file and the image id.
pub fn decode_record(record: &ImageRecord) -> Result<RgbImage, DataError> {
    let fail = |message: String| DataError::ImageFile { file: record.file.clone(), image_id: record.image_id, message };
    let bytes = std::fs::read(&record.file).map_err(|e| fail(e.to_string()))?;
    let image = decode_rgb_bytes(&bytes).map_err(fail)?;
    if (image.width, image.height) != (record.width, record.height) {
        return Err(fail(format!(
            "file is {}x{} but the JSON says {}x{}",
            image.width, image.height, record.width, record.height
        )));
    }
    Ok(image)
}
