//! Detection ops: boxes, box coding, IoU, NMS, RoIAlign and multi-level RoI pooling, proposal matching and
//! sampling, and mask rasterisation / pasting. Every op keeps tensors on their input's device; the few places
//! that copy to the host say so in their docs.

pub mod box_coder;
pub mod boxes;
pub mod masks;
pub mod matcher;
pub mod nms;
pub mod nms_sweeps;
mod pool_rows;
pub mod roi_align;
pub mod roi_pooler;
pub mod sampler;

pub use box_coder::BoxCoder;
pub use boxes::{box_area, box_ioa, box_iou, clip_boxes, nonempty, xywh_to_xyxy, xyxy_to_xywh};
pub use masks::{
    bitmask_to_roi_mask, bitmasks_to_roi_masks, paste_masks, paste_masks_torchvision, polygons_to_bitmask,
    polygons_to_roi_mask, polygons_to_roi_masks,
};
pub use matcher::{Matcher, MatcherError};
pub use nms::{batched_nms, nms};
pub use nms_sweeps::{nms_sweeps, SweptNms};
pub use roi_align::{roi_align, PyramidRows};
pub use roi_pooler::{LevelMapping, RoiPooler};
pub use sampler::{max_positives, sample_balanced, BalancedSample};

/// The kind an operator computes in for inputs of `kind`: float32 for half and bfloat16 (what autocast does for
/// RoIAlign and the regression losses, which lose too much in 16 bits), otherwise `kind` itself.
pub(crate) fn widened_kind(kind: tch::Kind) -> tch::Kind {
    match kind {
        tch::Kind::Half | tch::Kind::BFloat16 => tch::Kind::Float,
        kind => kind,
    }
}
