//! COCO bbox and segm evaluation in process with the `hotcoco` crate (pycocotools-exact): detections in memory
//! or from a results JSON, the 12 standard numbers printed exactly as pycocotools' `summarize()` prints them, the
//! per-class AP table, and the backend of `trainer coco-eval`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use hotcoco::{Annotation, Segmentation, COCO};
use serde::{Deserialize, Serialize};

/// Errors in loading ground truth or detections, or in evaluating; each names the file or the offending id.
#[derive(Debug, thiserror::Error)]
pub enum CocoEvalError {
    /// A file that cannot be read or written.
    #[error("cannot access {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// A ground-truth or results file that is not valid JSON of the expected shape.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// Detections for images the ground truth does not have (pycocotools refuses these too).
    #[error("{source_name}: detection {index} has image_id {image_id}, which is not in the ground truth {gt}")]
    UnknownImage { source_name: String, index: usize, image_id: u64, gt: String },
    /// A detection without a mask in a file whose first detection has a mask but no box (pycocotools' `loadRes`
    /// then derives every box from its mask, and fails on this one too).
    #[error(
        "{source_name}: detection {index} (image_id {image_id}) has no segmentation, but the first detection has a \
         mask and no bbox, so every detection needs a segmentation"
    )]
    MissingSegmentation { source_name: String, index: usize, image_id: u64 },
    /// A detection without a box in a file whose first detection has one, or a detection with neither box nor
    /// mask (pycocotools' `loadRes` fails on both).
    #[error("{source_name}: detection {index} (image_id {image_id}) has no bbox{why}")]
    MissingBox { source_name: String, index: usize, image_id: u64, why: String },
    /// A mask that cannot be encoded.
    #[error("mask: {0}")]
    Mask(String),
    /// An evaluation failure reported by hotcoco.
    #[error("COCO evaluation failed: {0}")]
    Eval(String),
}

/// Which overlap COCO evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IouType {
    /// Box IoU.
    Bbox,
    /// Mask IoU.
    Segm,
}

impl IouType {
    /// `bbox` or `segm`.
    pub fn name(self) -> &'static str {
        match self {
            IouType::Bbox => "bbox",
            IouType::Segm => "segm",
        }
    }
}

impl std::str::FromStr for IouType {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "bbox" => Ok(IouType::Bbox),
            "segm" => Ok(IouType::Segm),
            other => Err(format!("unknown IoU type `{other}` (expected bbox or segm)")),
        }
    }
}

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

/// Average precision of one category (over IoU 0.50:0.95, all areas, 100 detections), -1 when it has no ground
/// truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAp {
    /// Category id.
    pub category_id: u64,
    /// Category name.
    pub name: String,
    /// AP in [0, 1], or -1.
    pub ap: f64,
}

/// The result of one COCO evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoSummary {
    /// bbox or segm.
    pub iou_type: IouType,
    /// The 12 numbers of pycocotools' `COCOeval.stats`, in its order (AP, AP50, AP75, APs, APm, APl, AR1, AR10,
    /// AR100, ARs, ARm, ARl).
    pub stats: [f64; 12],
    /// Per-category AP, in category id order.
    pub per_class: Vec<ClassAp>,
}

/// What `trainer coco-eval --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoEvalJson {
    /// `bbox` or `segm`.
    pub iou_type: IouType,
    /// The 12 numbers.
    pub stats: [f64; 12],
}

/// Names of the 12 stats, as logged (`bbox/AP`, `segm/AP50`, ...).
pub const STAT_NAMES: [&str; 12] =
    ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"];

/// (is AP, IoU threshold, area, max detections) of each of pycocotools' 12 summary lines.
const SUMMARY_ROWS: [(bool, Option<f64>, &str, u32); 12] = [
    (true, None, "all", 100),
    (true, Some(0.5), "all", 100),
    (true, Some(0.75), "all", 100),
    (true, None, "small", 100),
    (true, None, "medium", 100),
    (true, None, "large", 100),
    (false, None, "all", 1),
    (false, None, "all", 10),
    (false, None, "all", 100),
    (false, None, "small", 100),
    (false, None, "medium", 100),
    (false, None, "large", 100),
];

impl CocoSummary {
    /// The 12 lines pycocotools' `summarize()` prints, character for character.
    pub fn summary_lines(&self) -> Vec<String> {
        SUMMARY_ROWS
            .iter()
            .zip(self.stats)
            .map(|(&(ap, iou, area, max_dets), value)| {
                let (title, kind) = if ap { ("Average Precision", "(AP)") } else { ("Average Recall", "(AR)") };
                let iou = iou.map_or_else(|| "0.50:0.95".to_string(), |t| format!("{t:.2}"));
                format!(" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {value:.3}")
            })
            .collect()
    }

    /// The per-class AP table (AP in percent, three name/value column pairs per row, as detectron2 prints it).
    pub fn per_class_table(&self) -> String {
        let width = self.per_class.iter().map(|c| c.name.len()).max().unwrap_or(8).max(8);
        let mut out = String::new();
        let header = format!("| {:<width$} | {:>6} ", "category", "AP");
        out.push_str(&format!("{}|\n", header.repeat(3)));
        let rule = format!("|{}|{}", "-".repeat(width + 2), "-".repeat(8));
        out.push_str(&format!("{}|\n", rule.repeat(3)));
        for row in self.per_class.chunks(3) {
            for class in row {
                let ap = if class.ap < 0.0 { "nan".to_string() } else { format!("{:.3}", class.ap * 100.0) };
                out.push_str(&format!("| {:<width$} | {:>6} ", class.name, ap));
            }
            out.push_str("|\n");
        }
        out
    }

    /// The 12 stats keyed `{iou_type}/{name}` plus `{iou_type}/AP-{category}`, for metrics.jsonl and TensorBoard.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let prefix = self.iou_type.name();
        let mut metrics: Vec<(String, f64)> =
            STAT_NAMES.iter().zip(self.stats).map(|(name, v)| (format!("{prefix}/{name}"), v)).collect();
        metrics.extend(self.per_class.iter().map(|c| (format!("{prefix}/AP-{}", c.name), c.ap)));
        metrics
    }

    /// `{"iou_type": ..., "stats": [...]}`.
    pub fn to_json(&self) -> CocoEvalJson {
        CocoEvalJson { iou_type: self.iou_type, stats: self.stats }
    }
}

/// Loaded ground truth.
pub struct GroundTruth {
    coco: Arc<COCO>,
    path: String,
}

impl GroundTruth {
    /// Loads a COCO instances JSON.
    pub fn load(path: &Path) -> Result<Self, CocoEvalError> {
        let display = path.display().to_string();
        if let Err(source) = std::fs::metadata(path) {
            return Err(CocoEvalError::Read { path: display, source });
        }
        let coco =
            COCO::new(path).map_err(|e| CocoEvalError::Parse { path: display.clone(), message: e.to_string() })?;
        Ok(GroundTruth { coco: Arc::new(coco), path: display })
    }

    /// Image ids in the ground truth.
    pub fn image_ids(&self) -> Vec<u64> {
        self.coco.get_img_ids(&[], &[])
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
fn load_results(gt: &GroundTruth, detections: &[Detection], source_name: &str) -> Result<COCO, CocoEvalError> {
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

/// Evaluates `detections` against `gt` with pycocotools' default parameters; `source_name` names the detections
/// in errors (a file path, or e.g. `validation predictions`).
pub fn evaluate(
    gt: &GroundTruth,
    detections: &[Detection],
    iou_type: IouType,
    source_name: &str,
) -> Result<CocoSummary, CocoEvalError> {
    let eval_error = |e: hotcoco::Error| CocoEvalError::Eval(e.to_string());
    let results = load_results(gt, detections, source_name)?;
    let kind = match iou_type {
        IouType::Bbox => hotcoco::IouType::Bbox,
        IouType::Segm => hotcoco::IouType::Segm,
    };
    let mut eval = hotcoco::COCOeval::new(Arc::clone(&gt.coco), results, kind);
    eval.evaluate().map_err(eval_error)?;
    eval.accumulate();
    eval.summarize_lines();
    let stats: [f64; 12] = eval
        .stats()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| CocoEvalError::Eval("hotcoco did not produce the 12 COCO stats".into()))?;
    let per_class_by_name = eval.get_results(None, true);
    let per_class = gt
        .coco
        .get_cat_ids(&[], &[], &[])
        .into_iter()
        .filter_map(|id| gt.coco.get_cat(id).map(|c| (id, c.name.clone())))
        .map(|(category_id, name)| {
            let ap = per_class_by_name.get(&format!("AP/{name}")).copied().unwrap_or(-1.0);
            ClassAp { category_id, name, ap }
        })
        .collect();
    Ok(CocoSummary { iou_type, stats, per_class })
}

/// Writes detections as a COCO results JSON (what `trainer coco-eval --dt` and pycocotools' `loadRes` read).
pub fn write_detections(path: &Path, detections: &[Detection]) -> Result<(), CocoEvalError> {
    let text = serde_json::to_string(detections).expect("detections serialise to JSON");
    std::fs::write(path, text).map_err(|source| CocoEvalError::Read { path: path.display().to_string(), source })
}

/// What `trainer coco-eval` prints: the `--json` object on one line, or the 12 summary lines followed by the
/// per-class AP table.
pub fn coco_eval_report(
    gt_path: &Path,
    dt_path: &Path,
    iou_type: IouType,
    json: bool,
) -> Result<String, CocoEvalError> {
    let summary = coco_eval_files(gt_path, dt_path, iou_type)?;
    Ok(if json {
        serde_json::to_string(&summary.to_json()).expect("stats serialise to JSON")
    } else {
        format!("{}\n\n{}", summary.summary_lines().join("\n"), summary.per_class_table().trim_end())
    })
}

/// The backend of `trainer coco-eval --gt GT --dt DT --iou-type T`.
pub fn coco_eval_files(gt_path: &Path, dt_path: &Path, iou_type: IouType) -> Result<CocoSummary, CocoEvalError> {
    let gt = GroundTruth::load(gt_path)?;
    let detections = load_detections(dt_path)?;
    evaluate(&gt, &detections, iou_type, &dt_path.display().to_string())
}
