//! Detection ops (box coding, IoU, NMS, RoIAlign), FPN, anchors, RPN, RoI box and mask heads, post-processing,
//! the assembled Mask R-CNN and weight import. Filled by the detector issue.
