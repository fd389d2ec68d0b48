//! Detection for vovdet: detection ops (box coding, IoU, NMS, RoIAlign), FPN, anchors, RPN, RoI box and mask
//! heads, post-processing and the assembled Mask R-CNN.
//!
//! Semantics follow detectron2 (class `num_classes` is background, box widths without `+1`, aligned RoIAlign);
//! the options in [`config`] also reproduce torchvision's `maskrcnn_resnet50_fpn`, whose weights
//! [`torchvision`] converts.

pub mod anchors;
pub mod config;
pub mod detectron2;
pub mod diagnostics;
pub mod fpn;
mod heads;
pub mod layers;
mod losses;
pub mod model;
pub mod ops;
pub mod postprocess;
pub mod roi_heads;
pub mod rpn;
pub mod structures;
mod targets;
pub mod torchvision;

pub use config::DetectorConfig;
pub use model::MaskRcnn;
pub use structures::{Detections, GtInstances, GtMasks, ImageBatch, TrainingTargets};

/// Errors raised while building or running the detector.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// The backbone could not be built or its weights imported.
    #[error(transparent)]
    Backbone(#[from] backbone::BackboneError),
    /// A config value the model cannot be built with.
    #[error("model.{field}: {message}")]
    Config {
        /// Dotted field name under `[model]`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A matcher built from invalid thresholds.
    #[error("model matcher: {0}")]
    Matcher(#[from] ops::MatcherError),
    /// Variables that another framework's layout has no name for (exporting a model it cannot express).
    #[error("the model cannot be written with {format}'s names: no equivalent for {names}")]
    NoExternalName {
        /// The target layout.
        format: String,
        /// Our variable names without an equivalent.
        names: String,
    },
    /// Inputs or ground truth the model cannot use.
    #[error("{0}")]
    Input(String),
}
