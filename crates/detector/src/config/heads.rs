//! The heads' parts of the `[model]` section: the region proposal network (`[model.rpn]`), the RoI heads'
//! sampling and post-processing (`[model.roi_heads]`), and the box and mask heads (`[model.box_head]`,
//! `[model.mask_head]`). Defaults are detectron2's from-scratch GN recipe.

use serde::{Deserialize, Serialize};

use super::{ClassLayout, HeadNorm, OutputStyle};

/// Region proposal network: head, anchor labelling and sampling, losses and proposal selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpnConfig {
    /// Proposals kept per level before NMS, training.
    pub pre_nms_topk_train: i64,
    /// Proposals kept per level before NMS, inference.
    pub pre_nms_topk_test: i64,
    /// Proposals kept per image after NMS, training.
    pub post_nms_topk_train: i64,
    /// Proposals kept per image after NMS, inference.
    pub post_nms_topk_test: i64,
    /// NMS IoU threshold (per level).
    pub nms_thresh: f64,
    /// Proposals whose clipped width or height is not above this are dropped.
    pub min_size: f64,
    /// Anchors sampled per image for the losses.
    pub batch_size_per_image: i64,
    /// Fraction of positives among the sampled anchors.
    pub positive_fraction: f64,
    /// IoU thresholds: below the first negative, at or above the second positive, between ignored.
    pub iou_thresholds: [f64; 2],
    /// Box regression loss: smooth-L1 with this beta; 0 is the L1 loss.
    pub smooth_l1_beta: f64,
    /// Box coder weights (dx, dy, dw, dh).
    pub bbox_reg_weights: [f64; 4],
    /// 3x3 convolutions (with ReLU) shared by the levels before the two predictors: 1 is detectron2's
    /// `StandardRPNHead`, 2 the `new_baselines` LSJ recipe's (`conv_dims = [-1, -1]`).
    pub num_conv: i64,
    /// Norm after each of those convolutions (detectron2's RPN head has none).
    pub norm: HeadNorm,
    /// Groups of a GroupNorm `norm`.
    pub gn_groups: i64,
}

impl Default for RpnConfig {
    fn default() -> Self {
        RpnConfig {
            pre_nms_topk_train: 2000,
            pre_nms_topk_test: 1000,
            post_nms_topk_train: 1000,
            post_nms_topk_test: 1000,
            nms_thresh: 0.7,
            min_size: 0.0,
            batch_size_per_image: 256,
            positive_fraction: 0.5,
            iou_thresholds: [0.3, 0.7],
            smooth_l1_beta: 0.0,
            bbox_reg_weights: [1.0, 1.0, 1.0, 1.0],
            num_conv: 1,
            norm: HeadNorm::None,
            gn_groups: 32,
        }
    }
}

/// RoI heads: proposal sampling, test-time post-processing and the shared pooler settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoiHeadsConfig {
    /// Number of foreground classes; labels are 0..num_classes, background is `num_classes`.
    pub num_classes: i64,
    /// Pyramid levels the RoIs are pooled from, finest first (`p2`..`p5`).
    pub in_features: Vec<String>,
    /// RoIs sampled per image for training.
    pub batch_size_per_image: i64,
    /// Fraction of foreground RoIs among the sampled ones.
    pub positive_fraction: f64,
    /// Proposals with IoU at or above this are foreground.
    pub iou_threshold: f64,
    /// Appends the ground-truth boxes to the proposals during training.
    pub proposal_append_gt: bool,
    /// Detections need a class score above this.
    pub score_thresh_test: f64,
    /// Per-class NMS IoU threshold.
    pub nms_thresh_test: f64,
    /// Detections kept per image.
    pub detections_per_image: i64,
    /// Detections whose clipped width or height is below this are dropped before NMS (torchvision: 0.01; 0 keeps
    /// every box, as detectron2 does).
    pub test_min_box_size: f64,
    /// Size of the canonical box for the level assignment of RoIs.
    pub canonical_box_size: f64,
    /// Level a canonical box is pooled from.
    pub canonical_level: i64,
    /// How boxes and masks are mapped back to the original image.
    pub output_style: OutputStyle,
    /// What the labels mean: the dataset's categories in id order, or category ids (torchvision's layout).
    pub class_layout: ClassLayout,
}

impl Default for RoiHeadsConfig {
    fn default() -> Self {
        RoiHeadsConfig {
            num_classes: 80,
            in_features: ["p2", "p3", "p4", "p5"].map(String::from).to_vec(),
            batch_size_per_image: 512,
            positive_fraction: 0.25,
            iou_threshold: 0.5,
            proposal_append_gt: true,
            score_thresh_test: 0.05,
            nms_thresh_test: 0.5,
            detections_per_image: 100,
            test_min_box_size: 0.0,
            canonical_box_size: 224.0,
            canonical_level: 4,
            output_style: OutputStyle::Detectron2,
            class_layout: ClassLayout::Contiguous,
        }
    }
}

/// Box head (`num_conv` convs then `num_fc` fully connected layers) and box predictor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BoxHeadConfig {
    /// 3x3 convolutions on the pooled features (4 in `4conv1fc`, 0 in `2fc`).
    pub num_conv: i64,
    /// Width of those convolutions.
    pub conv_dim: i64,
    /// Fully connected layers after them (1 in `4conv1fc`, 2 in `2fc`).
    pub num_fc: i64,
    /// Width of the fully connected layers.
    pub fc_dim: i64,
    /// Norm after each convolution.
    pub norm: HeadNorm,
    /// GroupNorm groups.
    pub gn_groups: i64,
    /// RoIAlign output size.
    pub pooler_resolution: i64,
    /// RoIAlign samples per bin side; 0 adapts to the RoI size.
    pub pooler_sampling_ratio: i64,
    /// RoIAlign with the half-pixel shift (detectron2 `ROIAlignV2`); torchvision's `MultiScaleRoIAlign` is false.
    pub pooler_aligned: bool,
    /// Box coder weights (dx, dy, dw, dh).
    pub bbox_reg_weights: [f64; 4],
    /// Box regression loss: smooth-L1 with this beta; 0 is the L1 loss.
    pub smooth_l1_beta: f64,
    /// One box regression for all classes instead of one per class.
    pub cls_agnostic_bbox_reg: bool,
}

impl Default for BoxHeadConfig {
    fn default() -> Self {
        BoxHeadConfig {
            num_conv: 4,
            conv_dim: 256,
            num_fc: 1,
            fc_dim: 1024,
            norm: HeadNorm::GN,
            gn_groups: 32,
            pooler_resolution: 7,
            pooler_sampling_ratio: 0,
            pooler_aligned: true,
            bbox_reg_weights: [10.0, 10.0, 5.0, 5.0],
            smooth_l1_beta: 0.0,
            cls_agnostic_bbox_reg: false,
        }
    }
}

/// Mask head: `num_conv` 3x3 convs, a 2x2 stride-2 deconvolution and a 1x1 per-class predictor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskHeadConfig {
    /// 3x3 convolutions.
    pub num_conv: i64,
    /// Width of the convolutions and the deconvolution.
    pub conv_dim: i64,
    /// Norm after each convolution.
    pub norm: HeadNorm,
    /// GroupNorm groups.
    pub gn_groups: i64,
    /// RoIAlign output size; the predicted masks are twice this.
    pub pooler_resolution: i64,
    /// RoIAlign samples per bin side; 0 adapts to the RoI size.
    pub pooler_sampling_ratio: i64,
    /// RoIAlign with the half-pixel shift.
    pub pooler_aligned: bool,
    /// One mask for all classes instead of one per class.
    pub cls_agnostic_mask: bool,
    /// Probability above which a pasted mask pixel is foreground.
    pub mask_threshold: f64,
}

impl Default for MaskHeadConfig {
    fn default() -> Self {
        MaskHeadConfig {
            num_conv: 4,
            conv_dim: 256,
            norm: HeadNorm::GN,
            gn_groups: 32,
            pooler_resolution: 14,
            pooler_sampling_ratio: 0,
            pooler_aligned: true,
            cls_agnostic_mask: false,
            mask_threshold: 0.5,
        }
    }
}
