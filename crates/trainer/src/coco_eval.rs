//! COCO bbox and segm evaluation in process with the `hotcoco` crate (pycocotools-exact): detections in memory
//! or from a results JSON (read as pycocotools' `loadRes` reads them, in `coco_results.rs`), the 12 standard
//! numbers printed exactly as pycocotools' `summarize()` prints them, the per-class AP table, and the backend of
//! `trainer coco-eval`.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::coco_error::CocoEvalError;
pub use crate::coco_gt::GroundTruth;
use crate::coco_results::load_results;
pub use crate::coco_results::{
    derived_geometry, load_detections, write_detections, CompressedRle, DerivedGeometry, Detection,
};

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
