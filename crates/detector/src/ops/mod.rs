//! Detection ops: boxes, box coding, IoU, NMS, RoIAlign and multi-level RoI pooling.
