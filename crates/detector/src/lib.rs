//! Detection for vovdet: detection ops (box coding, IoU, NMS, RoIAlign), FPN, anchors, RPN, RoI box and mask
//! heads, post-processing and the assembled Mask R-CNN.

pub mod ops;
