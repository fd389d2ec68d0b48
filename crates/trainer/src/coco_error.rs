//! The errors of COCO evaluation and of COCO results files.

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
