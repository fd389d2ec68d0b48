//! Truncated and corrupt image files are errors naming the file (issue 15, item 1): the `image` crate's lenient
//! JPEG decoding fills the missing part with grey and reports success, our decoder does not. Intact files decode
//! to exactly the pixels `image` gives.

use data::decode::decode_rgb_bytes;

/// A `size` x `size` RGB picture with enough texture that its JPEG has many kilobytes of entropy-coded data.
fn textured(size: u32) -> image::RgbImage {
    image::RgbImage::from_fn(size, size, |x, y| {
        let v = (x * 7 + y * 13) ^ (x * y);
        image::Rgb([(v % 251) as u8, ((v / 3) % 241) as u8, ((x * 31 + y * 17) % 239) as u8])
    })
}

/// Encodes a picture as JPEG (quality 90) or PNG.
pub fn encode(picture: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    picture.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

#[test]
fn intact_jpegs_decode_to_the_pixels_image_gives() {
    let color = encode(&textured(96), image::ImageFormat::Jpeg);
    let gray_picture = image::DynamicImage::ImageRgb8(textured(80)).into_luma8();
    let mut gray = std::io::Cursor::new(Vec::new());
    gray_picture.write_to(&mut gray, image::ImageFormat::Jpeg).unwrap();
    for bytes in [color, gray.into_inner()] {
        let ours = decode_rgb_bytes(&bytes).unwrap();
        let theirs = image::load_from_memory(&bytes).unwrap().into_rgb8();
        assert_eq!((ours.width, ours.height), theirs.dimensions());
        assert_eq!(ours.data, theirs.into_raw());
    }
}

#[test]
fn truncated_jpeg_is_an_error_saying_truncated() {
    let bytes = encode(&textured(256), image::ImageFormat::Jpeg);
    let cut = &bytes[..bytes.len() / 3];
    // The lenient decoder accepts it (this is what the issue reported).
    assert!(image::load_from_memory(cut).is_ok());
    let message = decode_rgb_bytes(cut).unwrap_err();
    assert!(message.contains("truncated JPEG"), "{message}");
}

#[test]
fn jpeg_with_garbage_in_the_middle_is_an_error_saying_corrupt() {
    let bytes = encode(&textured(256), image::ImageFormat::Jpeg);
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    let mut state = 0x2545_f491_u32;
    for byte in &mut damaged[middle - 2048..middle + 2048] {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        *byte = state as u8;
    }
    assert!(image::load_from_memory(&damaged).is_ok());
    let message = decode_rgb_bytes(&damaged).unwrap_err();
    assert!(message.contains("corrupt JPEG data"), "{message}");
}

#[test]
fn truncated_png_is_an_error() {
    let bytes = encode(&textured(128), image::ImageFormat::Png);
    let message = decode_rgb_bytes(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(message.contains("cannot decode image"), "{message}");
}
