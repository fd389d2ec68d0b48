//! COCO results files: detections with compressed RLE masks, reading and writing them, and how pycocotools'
//! `loadRes` reads them (the kind of the file from its first entry; boxes and areas derived from masks, masks
//! from boxes), with every entry `loadRes` would fail on named.

use std::collections::BTreeSet;
use std::path::Path;

use hotcoco::{Annotation, Segmentation, COCO};
use serde::{Deserialize, Serialize};

use crate::coco_error::CocoEvalError;
use crate::coco_gt::GroundTruth;

/// A COCO compressed RLE mask (`counts` in COCO's string encoding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressedRle {
    /// `[height, width]`.
    pub size: [u32; 2],
    /// LEB128-like COCO string of run lengths (column-major).
    pub counts: String,
}

impl CompressedRle {
    /// Encodes a binary mask given row-major (`height` rows of `width` bytes, nonzero = foreground) exactly as
    /// pycocotools' `mask.encode` encodes the same array.
    pub fn from_mask(mask: &[u8], height: u32, width: u32) -> Result<Self, CocoEvalError> {
        let (h, w) = (height as usize, width as usize);
        if mask.len() != h * w {
            return Err(CocoEvalError::Mask(format!(
                "{height}x{width} mask needs {} bytes, got {}",
                h * w,
                mask.len()
            )));
        }
        let mut column_major = vec![0u8; h * w];
        for (y, row) in mask.chunks_exact(w.max(1)).enumerate() {
            for (x, &value) in row.iter().enumerate() {
                column_major[y + h * x] = value;
            }
        }
        Self::from_column_major(&column_major, height, width)
    }

    /// Encodes a `[height, width]` mask tensor (bool or integer; nonzero = foreground) on any device.
    pub fn from_tensor(mask: &tch::Tensor) -> Result<Self, CocoEvalError> {
        let size = mask.size();
        let [height, width] = size[..] else {
            return Err(CocoEvalError::Mask(format!("expected a [height, width] mask, got shape {size:?}")));
        };
        let column_major = mask.ne(0).to_kind(tch::Kind::Uint8).to_device(tch::Device::Cpu).t_().contiguous();
        let bytes = Vec::<u8>::try_from(column_major.flatten(0, -1)).map_err(|e| CocoEvalError::Mask(e.to_string()))?;
        Self::from_column_major(&bytes, height as u32, width as u32)
    }

    fn from_column_major(mask: &[u8], height: u32, width: u32) -> Result<Self, CocoEvalError> {
        let rle = hotcoco::mask::encode(mask, height, width).map_err(|e| CocoEvalError::Mask(e.to_string()))?;
        Ok(CompressedRle { size: [height, width], counts: hotcoco::mask::rle_to_string(&rle) })
    }
}

/// One detection in COCO results format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Ground-truth image id.
    pub image_id: u64,
    /// Ground-truth category id.
    pub category_id: u64,
    /// `[x, y, width, height]` in pixels. Results files may leave it out (or give `[]`) when every entry has a
    /// `segmentation`: as pycocotools' `loadRes` does, the box and the area are then derived from the mask.
    #[serde(default, deserialize_with = "optional_box", skip_serializing_if = "Option::is_none")]
    pub bbox: Option<[f64; 4]>,
    /// Confidence.
    pub score: f64,
    /// Instance mask, required for segm evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<CompressedRle>,
}

impl Detection {
    /// A detection from an `[x1, y1, x2, y2]` box in image pixels (what the model predicts), converted to COCO's
    /// `[x, y, width, height]` as detectron2's `instances_to_coco_json` does.
    pub fn from_xyxy(image_id: u64, category_id: u64, xyxy: [f64; 4], score: f64, mask: Option<CompressedRle>) -> Self {
        let [x1, y1, x2, y2] = xyxy;
        Detection { image_id, category_id, bbox: Some([x1, y1, x2 - x1, y2 - y1]), score, segmentation: mask }
    }
}

/// A results entry's `bbox`: four numbers, or absent, `null` or `[]` (pycocotools treats an empty list as no box).
fn optional_box<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<[f64; 4]>, D::Error> {
    let values: Option<Vec<f64>> = Option::deserialize(deserializer)?;
    match values.as_deref() {
        None | Some([]) => Ok(None),
        Some(&[x, y, w, h]) => Ok(Some([x, y, w, h])),
        Some(other) => Err(serde::de::Error::invalid_length(other.len(), &"a bbox of 4 numbers, or []")),
    }
}

/// Reads a COCO results file (a JSON array of detections). Parse errors name the file, line and column.
pub fn load_detections(path: &Path) -> Result<Vec<Detection>, CocoEvalError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| CocoEvalError::Read { path: display.clone(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| CocoEvalError::Parse { path: display, message: format!("not a COCO results array: {e}") })
}

/// The detections as pycocotools' `loadRes` reads them: checked (known images, the fields the file's kind needs),
/// with ids assigned and each box and area derived as `loadRes` derives them.
pub(crate) fn load_results(
    gt: &GroundTruth,
    detections: &[Detection],
    source_name: &str,
) -> Result<COCO, CocoEvalError> {
    let image_ids: BTreeSet<u64> = gt.image_ids().into_iter().collect();
    let mut annotations = Vec::with_capacity(detections.len());
    for (index, detection) in detections.iter().enumerate() {
        if !image_ids.contains(&detection.image_id) {
            return Err(CocoEvalError::UnknownImage {
                source_name: source_name.into(),
                index,
                image_id: detection.image_id,
                gt: gt.path.clone(),
            });
        }
        // pycocotools' `loadRes` takes the kind of the whole file from its first entry: boxes (a mask, when
        // missing, is the box's rectangle) or masks (a box, when missing, is the mask's extent).
        let boxes_file = detections[0].bbox.is_some();
        match (&detection.bbox, &detection.segmentation) {
            (None, _) if boxes_file => {
                return Err(CocoEvalError::MissingBox {
                    source_name: source_name.into(),
                    index,
                    image_id: detection.image_id,
                    why: ", but the first detection has one, so every detection needs one".into(),
                })
            }
            (_, None) if !boxes_file => {
                return Err(if index == 0 {
                    CocoEvalError::MissingBox {
                        source_name: source_name.into(),
                        index,
                        image_id: detection.image_id,
                        why: " and no segmentation".into(),
                    }
                } else {
                    CocoEvalError::MissingSegmentation {
                        source_name: source_name.into(),
                        index,
                        image_id: detection.image_id,
                    }
                })
            }
            _ => {}
        }
        let segmentation = detection
            .segmentation
            .as_ref()
            .map(|rle| Segmentation::CompressedRle { size: rle.size, counts: rle.counts.clone() });
        annotations.push(Annotation {
            image_id: detection.image_id,
            category_id: detection.category_id,
            bbox: detection.bbox,
            score: Some(detection.score),
            segmentation,
            ..Default::default()
        });
    }
    gt.coco.load_res_anns(annotations).map_err(|e| CocoEvalError::Eval(e.to_string()))
}

/// A detection's `(bbox, area)` after pycocotools' `loadRes` (see [`derived_geometry`]).
pub type DerivedGeometry = (Option<[f64; 4]>, Option<f64>);

/// The `(bbox, area)` pycocotools' `loadRes` gives each detection (in order): the given box, or the mask's extent
/// when a masks-only file has none; the box's area in a boxes file, the mask's in a masks file.
pub fn derived_geometry(
    gt: &GroundTruth,
    detections: &[Detection],
    source_name: &str,
) -> Result<Vec<DerivedGeometry>, CocoEvalError> {
    let results = load_results(gt, detections, source_name)?;
    Ok(results.dataset.annotations.iter().map(|a| (a.bbox, a.area)).collect())
}

/// Writes detections as a COCO results JSON (what `trainer coco-eval --dt` and pycocotools' `loadRes` read).
pub fn write_detections(path: &Path, detections: &[Detection]) -> Result<(), CocoEvalError> {
    let text = serde_json::to_string(detections).expect("detections serialise to JSON");
    std::fs::write(path, text).map_err(|source| CocoEvalError::Read { path: path.display().to_string(), source })
}
