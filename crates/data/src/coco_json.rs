//! The COCO instances JSON as written on disk (serde types with line/column errors) and the validation of single
//! entries (segmentations, boxes, file names), each problem naming the file and the annotation or image id.

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::error::DataError;

/// An instance mask as stored in the dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Segmentation {
    /// One or more polygons, each a flat list `x0, y0, x1, y1, ...` in image pixels.
    Polygons(Vec<Vec<f64>>),
    /// A run-length encoded bitmap of the full image (column-major, pycocotools layout).
    Rle(hotcoco::Rle),
}

#[derive(Deserialize)]
pub(crate) struct RawCoco {
    pub(crate) images: Vec<RawImage>,
    #[serde(default)]
    pub(crate) annotations: Vec<RawAnnotation>,
    pub(crate) categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
pub(crate) struct RawImage {
    pub(crate) id: u64,
    pub(crate) file_name: String,
    pub(crate) width: u32,
    pub(crate) height: u32,
}

#[derive(Deserialize)]
pub(crate) struct RawCategory {
    pub(crate) id: u64,
    pub(crate) name: String,
}

#[derive(Deserialize)]
pub(crate) struct RawAnnotation {
    pub(crate) id: u64,
    pub(crate) image_id: u64,
    pub(crate) category_id: u64,
    pub(crate) bbox: [f64; 4],
    #[serde(default)]
    pub(crate) iscrowd: u8,
    #[serde(default)]
    pub(crate) segmentation: Option<RawSegmentation>,
}

pub(crate) enum RawSegmentation {
    Polygons(Vec<Vec<f64>>),
    Rle { size: [u32; 2], counts: RawCounts },
}

pub(crate) enum RawCounts {
    Compressed(String),
    Uncompressed(Vec<u32>),
}

impl<'de> Deserialize<'de> for RawCounts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountsVisitor;
        impl<'de> Visitor<'de> for CountsVisitor {
            type Value = RawCounts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("RLE counts as a string (compressed) or a list of integers (uncompressed)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawCounts, E> {
                Ok(RawCounts::Compressed(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawCounts, A::Error> {
                let mut counts = Vec::new();
                while let Some(c) = seq.next_element::<u32>()? {
                    counts.push(c);
                }
                Ok(RawCounts::Uncompressed(counts))
            }
        }
        deserializer.deserialize_any(CountsVisitor)
    }
}

impl<'de> Deserialize<'de> for RawSegmentation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SegmentationVisitor;
        impl<'de> Visitor<'de> for SegmentationVisitor {
            type Value = RawSegmentation;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of polygons or an RLE object {\"size\": [h, w], \"counts\": ...}")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawSegmentation, A::Error> {
                let mut polygons = Vec::new();
                while let Some(p) = seq.next_element::<Vec<f64>>()? {
                    polygons.push(p);
                }
                Ok(RawSegmentation::Polygons(polygons))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSegmentation, A::Error> {
                let mut size = None;
                let mut counts = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "size" => size = Some(map.next_value::<[u32; 2]>()?),
                        "counts" => counts = Some(map.next_value::<RawCounts>()?),
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                let size = size.ok_or_else(|| de::Error::missing_field("size"))?;
                let counts = counts.ok_or_else(|| de::Error::missing_field("counts"))?;
                Ok(RawSegmentation::Rle { size, counts })
            }
        }
        deserializer.deserialize_any(SegmentationVisitor)
    }
}

pub(crate) fn read_with_progress(path: &Path, progress: bool) -> Result<Vec<u8>, DataError> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let bar = if progress {
        let bar = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
        {
            bar.set_style(style);
        }
        bar.set_message(format!("reading {}", path.display()));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut bytes = Vec::with_capacity(len as usize);
    let mut chunk = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut chunk).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(bytes)
}

pub(crate) fn parse_raw(path: &Path, bytes: &[u8], progress: bool) -> Result<RawCoco, DataError> {
    let spinner = if progress {
        let s = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            s.set_style(style);
        }
        s.set_message(format!("parsing {}", path.display()));
        s.enable_steady_tick(std::time::Duration::from_millis(200));
        s
    } else {
        indicatif::ProgressBar::hidden()
    };
    let parsed = serde_json::from_slice::<RawCoco>(bytes).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    });
    spinner.finish_and_clear();
    parsed
}

pub(crate) fn convert_segmentation(
    path: &Path,
    ann: &RawAnnotation,
    image: &RawImage,
    raw: &RawSegmentation,
) -> Result<Segmentation, DataError> {
    let err = |message: String| DataError::Annotation { path: path.to_path_buf(), annotation_id: ann.id, message };
    match raw {
        RawSegmentation::Polygons(parts) => {
            if parts.is_empty() {
                return Err(err("segmentation is an empty polygon list".into()));
            }
            for (i, part) in parts.iter().enumerate() {
                if part.len() % 2 != 0 {
                    return Err(err(format!("polygon part {i} has an odd number of coordinates ({})", part.len())));
                }
                if part.len() < 6 {
                    return Err(err(format!("polygon part {i} has {} points; at least 3 are needed", part.len() / 2)));
                }
                if part.iter().any(|v| !v.is_finite()) {
                    return Err(err(format!("polygon part {i} has a non-finite coordinate")));
                }
            }
            Ok(Segmentation::Polygons(parts.clone()))
        }
        RawSegmentation::Rle { size, counts } => {
            let [h, w] = *size;
            if (h, w) != (image.height, image.width) {
                return Err(err(format!(
                    "RLE size [{h}, {w}] differs from image id {} size [{}, {}]",
                    image.id, image.height, image.width
                )));
            }
            let rle = match counts {
                RawCounts::Compressed(s) => hotcoco::mask::rle_from_string(s, h, w),
                RawCounts::Uncompressed(c) => hotcoco::Rle::new(h, w, c.clone()),
            }
            .map_err(|e| err(format!("invalid RLE: {e}")))?;
            let total: u64 = rle.counts.iter().map(|&c| c as u64).sum();
            if total != h as u64 * w as u64 {
                return Err(err(format!("RLE counts sum to {total}, expected h*w = {}", h as u64 * w as u64)));
            }
            Ok(Segmentation::Rle(rle))
        }
    }
}

/// Why `file_name` would leave the folder it is relative to, if it would: absolute paths and `..` components.
pub(crate) fn escapes_root(file_name: &str) -> Option<&'static str> {
    let path = Path::new(file_name);
    if path.has_root() || path.is_absolute() {
        return Some("is an absolute path");
    }
    path.components().any(|c| matches!(c, std::path::Component::ParentDir)).then_some("climbs out with `..`")
}

/// A box must be finite and overlap the image grown by its own size on every side: real annotations lie inside
/// their image, give or take rounding, so anything further out (1e30) is a broken value that would blow up the
/// box-regression targets.
pub(crate) fn check_bbox(bbox: &[f64; 4], image: &RawImage) -> Result<(), String> {
    if bbox.iter().any(|v| !v.is_finite()) {
        return Err(format!("bbox {bbox:?} has a non-finite value"));
    }
    let [x, y, w, h] = *bbox;
    let (width, height) = (f64::from(image.width), f64::from(image.height));
    if x < -width || y < -height || x + w.max(0.0) > 2.0 * width || y + h.max(0.0) > 2.0 * height {
        return Err(format!(
            "bbox {bbox:?} lies far outside the {}x{} image id {} (more than the image's size beyond an edge)",
            image.width, image.height, image.id
        ));
    }
    Ok(())
}
