//! The `[model]` section of an experiment config: backbone, FPN, anchors, RPN, RoI heads. (How images become
//! the model's input is the data crate's `[input]` section.) Every default is detectron2's from-scratch GN recipe (`shared/notes/vovnet.md`);
//! [`DetectorConfig::torchvision_maskrcnn_r50_fpn`] expresses torchvision's `maskrcnn_resnet50_fpn` (v1).

use std::sync::Arc;

use backbone::norm::NormSpec;
use backbone::{BackboneConfig, BatchStatsReducer, NormKind};
use serde::{Deserialize, Serialize};

use crate::DetectorError;

mod heads;

pub use heads::{BoxHeadConfig, MaskHeadConfig, RoiHeadsConfig, RpnConfig};

/// Norm layer after the convolutions of the FPN and the heads (detectron2's `FPN.NORM`, `ROI_BOX_HEAD.NORM`,
/// `ROI_MASK_HEAD.NORM`). Convolutions followed by a norm have no bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HeadNorm {
    /// No norm; convolutions carry a bias (torchvision, pretrained detectron2 configs).
    #[serde(rename = "none")]
    None,
    /// GroupNorm with `gn_groups` groups (the from-scratch recipe).
    #[default]
    GN,
    /// BatchNorm: the local batch's statistics in training, the running ones at test time.
    BN,
    /// BatchNorm with statistics over every training process, weighted by each one's element count
    /// (detectron2's `NaiveSyncBatchNorm(stats_mode="N")`), so a process whose head has no RoIs joins with zero
    /// weight instead of hanging the others. In one process it is BN.
    SyncBN,
}

impl HeadNorm {
    /// The norm layer this choice builds (`None` without one); `reducer` serves SyncBN.
    pub fn spec(self, gn_groups: i64, reducer: Option<Arc<dyn BatchStatsReducer>>) -> Option<NormSpec> {
        let kind = match self {
            HeadNorm::None => return None,
            HeadNorm::GN => NormKind::GN,
            HeadNorm::BN => NormKind::BN,
            HeadNorm::SyncBN => NormKind::SyncBN,
        };
        Some(NormSpec { kind, gn_groups, reducer })
    }
}

/// How detections are mapped back to the original image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputStyle {
    /// detectron2's `detector_postprocess`: rescaled boxes clipped to the image and empty ones dropped; masks
    /// pasted with the bilinear grid-sample paste (`ops::paste_masks`).
    #[default]
    Detectron2,
    /// torchvision's `transform.postprocess`: rescaled boxes kept as they are; masks pasted with torchvision's
    /// integer-box `paste_masks_in_image` (1-pixel padded mask, resized to the rounded box).
    Torchvision,
}

/// How the dataset's category ids map to the classifier's labels; the trainer loads datasets accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClassLayout {
    /// Label `i` is the dataset's `i`-th category by id (detectron2); `num_classes` is the category count.
    #[default]
    Contiguous,
    /// Label `id - 1` is category `id` (torchvision's COCO models: 90 foreground labels for COCO's ids 1..90,
    /// ten of them unused); `num_classes` is the largest category id.
    CategoryId,
}

fn default_in_features() -> Vec<String> {
    ["stage2", "stage3", "stage4", "stage5"].map(String::from).to_vec()
}

/// Feature pyramid network: P2..P5 from the backbone outputs, P6 by max-pool (k1, s2) of P5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FpnConfig {
    /// Backbone outputs, finest first, that get a lateral connection.
    pub in_features: Vec<String>,
    /// Width of every pyramid level.
    pub out_channels: i64,
    /// Norm after the lateral and output convolutions.
    pub norm: HeadNorm,
    /// GroupNorm groups.
    pub gn_groups: i64,
}

impl Default for FpnConfig {
    fn default() -> Self {
        FpnConfig { in_features: default_in_features(), out_channels: 256, norm: HeadNorm::GN, gn_groups: 32 }
    }
}

/// Anchor generator: one list of sizes per pyramid level, shared aspect ratios (height / width).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnchorConfig {
    /// Anchor sizes (square root of the area) per level, P2 first.
    pub sizes: Vec<Vec<f64>>,
    /// Aspect ratios (height / width) used at every level.
    pub aspect_ratios: Vec<f64>,
    /// Anchor centre offset within a cell, in units of the stride (0.0 or 0.5).
    pub offset: f64,
    /// torchvision's cell anchors: float32 arithmetic, ratio-major order (same as detectron2's with one size per
    /// level), rounded to integers.
    pub round_cell_anchors: bool,
    /// Strides from the padded image size divided (integer division) by each feature map size, as torchvision
    /// does; otherwise the nominal stride of the level (4, 8, .., 64).
    pub strides_from_sizes: bool,
}

impl Default for AnchorConfig {
    fn default() -> Self {
        AnchorConfig {
            sizes: vec![vec![32.0], vec![64.0], vec![128.0], vec![256.0], vec![512.0]],
            aspect_ratios: vec![0.5, 1.0, 2.0],
            offset: 0.0,
            round_cell_anchors: false,
            strides_from_sizes: false,
        }
    }
}

/// A training step with the same tensor shapes every time and no host read in the detector (`[model.static_shapes]`),
/// the precondition for replaying the step as a CUDA graph. Off, the step is detectron2's: lists cut to their data
/// on the host. On, what is cut there is marked invalid in fixed-size tensors instead, with the same sampling
/// distribution and, for the same sample, the same losses:
/// - ground truth padded to a multiple of `max_instances` per image;
/// - proposals: boxes filtered out or suppressed marked invalid, NMS on the device in `nms_sweeps` sweeps
///   ([`crate::ops::nms_sweeps()`]), `rpn.post_nms_topk_train` slots per image;
/// - foreground: the box regression and the mask head run on a fixed `floor(batch_size_per_image *
///   positive_fraction)` RoI slots per image, weighted by whether each holds foreground (mask-head work on empty
///   slots, and with a batch norm in the mask head, those slots in its statistics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StaticShapesConfig {
    /// Fixed shapes in the training step.
    pub enabled: bool,
    /// Ground truth is padded to a multiple of this many instances per image (a new multiple is a new shape).
    pub max_instances: i64,
    /// Sweeps of the device NMS: with at least the longest chain of boxes suppressing each other it is exactly
    /// greedy NMS; the step counts the (image, level) pairs that had not converged (`rpn_nms_unconverged`) and
    /// the trainer warns about them.
    pub nms_sweeps: i64,
}

impl Default for StaticShapesConfig {
    fn default() -> Self {
        StaticShapesConfig { enabled: false, max_instances: 128, nms_sweeps: 32 }
    }
}

/// The whole Mask R-CNN: the trainer embeds it as its `[model]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    /// The backbone network.
    pub backbone: BackboneConfig,
    /// Feature pyramid.
    #[serde(default)]
    pub fpn: FpnConfig,
    /// Anchor generator.
    #[serde(default)]
    pub anchors: AnchorConfig,
    /// Region proposal network.
    #[serde(default)]
    pub rpn: RpnConfig,
    /// RoI sampling and post-processing.
    #[serde(default)]
    pub roi_heads: RoiHeadsConfig,
    /// Box head and predictor.
    #[serde(default)]
    pub box_head: BoxHeadConfig,
    /// Mask head.
    #[serde(default)]
    pub mask_head: MaskHeadConfig,
    /// Fixed shapes in the training step.
    #[serde(default)]
    pub static_shapes: StaticShapesConfig,
}

impl DetectorConfig {
    /// The from-scratch GN recipe on `backbone` with `num_classes` foreground classes.
    pub fn scratch(backbone: &str, num_classes: i64) -> Self {
        DetectorConfig {
            backbone: BackboneConfig::new(backbone),
            fpn: FpnConfig::default(),
            anchors: AnchorConfig::default(),
            rpn: RpnConfig::default(),
            roi_heads: RoiHeadsConfig { num_classes, ..Default::default() },
            box_head: BoxHeadConfig::default(),
            mask_head: MaskHeadConfig::default(),
            static_shapes: StaticShapesConfig::default(),
        }
    }

    /// torchvision's `maskrcnn_resnet50_fpn` (v1) for inference: FrozenBN R-50, FPN with biases and no norm,
    /// rounded anchors with torchvision's strides, RPN 1000/1000 at test, `MultiScaleRoIAlign` (aligned=False,
    /// sampling ratio 2), `TwoMLPHead`, torchvision's post-processing and its COCO label layout (label = category
    /// id - 1). `num_classes` counts foreground classes only (torchvision's `num_classes` minus one). Its input
    /// transform is the data crate's `InputConfig::torchvision()`.
    pub fn torchvision_maskrcnn_r50_fpn(num_classes: i64) -> Self {
        let mut backbone = BackboneConfig::new("R-50");
        backbone.norm = NormKind::FrozenBN;
        backbone.freeze_at = 2;
        DetectorConfig {
            backbone,
            fpn: FpnConfig { norm: HeadNorm::None, ..Default::default() },
            anchors: AnchorConfig { round_cell_anchors: true, strides_from_sizes: true, ..Default::default() },
            rpn: RpnConfig {
                post_nms_topk_train: 2000,
                min_size: 1e-3,
                smooth_l1_beta: 1.0 / 9.0,
                ..Default::default()
            },
            roi_heads: RoiHeadsConfig {
                num_classes,
                test_min_box_size: 1e-2,
                output_style: OutputStyle::Torchvision,
                class_layout: ClassLayout::CategoryId,
                ..Default::default()
            },
            box_head: BoxHeadConfig {
                num_conv: 0,
                num_fc: 2,
                norm: HeadNorm::None,
                pooler_sampling_ratio: 2,
                pooler_aligned: false,
                smooth_l1_beta: 1.0 / 9.0,
                ..Default::default()
            },
            mask_head: MaskHeadConfig {
                norm: HeadNorm::None,
                pooler_sampling_ratio: 2,
                pooler_aligned: false,
                ..Default::default()
            },
            static_shapes: StaticShapesConfig::default(),
        }
    }

    /// Checks the values serde cannot: positive sizes, fractions in [0, 1], one anchor-size list per level.
    pub fn validate(&self) -> Result<(), DetectorError> {
        let err = |field: &str, message: String| Err(DetectorError::Config { field: field.into(), message });
        let positive = [
            ("roi_heads.num_classes", self.roi_heads.num_classes),
            ("fpn.out_channels", self.fpn.out_channels),
            ("rpn.batch_size_per_image", self.rpn.batch_size_per_image),
            ("rpn.num_conv", self.rpn.num_conv),
            ("rpn.pre_nms_topk_train", self.rpn.pre_nms_topk_train),
            ("rpn.pre_nms_topk_test", self.rpn.pre_nms_topk_test),
            ("rpn.post_nms_topk_train", self.rpn.post_nms_topk_train),
            ("rpn.post_nms_topk_test", self.rpn.post_nms_topk_test),
            ("static_shapes.nms_sweeps", self.static_shapes.nms_sweeps),
            ("static_shapes.max_instances", self.static_shapes.max_instances),
            ("roi_heads.batch_size_per_image", self.roi_heads.batch_size_per_image),
            ("roi_heads.detections_per_image", self.roi_heads.detections_per_image),
            ("box_head.pooler_resolution", self.box_head.pooler_resolution),
            ("box_head.fc_dim", self.box_head.fc_dim),
            ("mask_head.pooler_resolution", self.mask_head.pooler_resolution),
            ("mask_head.conv_dim", self.mask_head.conv_dim),
        ];
        for (field, value) in positive {
            if value <= 0 {
                return err(field, format!("must be positive, got {value}"));
            }
        }
        for (field, value) in [("box_head.num_conv", self.box_head.num_conv), ("box_head.num_fc", self.box_head.num_fc)]
        {
            if value < 0 {
                return err(field, format!("must not be negative, got {value}"));
            }
        }
        if self.box_head.num_conv == 0 && self.box_head.num_fc == 0 {
            return err("box_head", "needs at least one conv or fc layer".into());
        }
        if self.box_head.num_conv > 0 && self.box_head.conv_dim <= 0 {
            return err("box_head.conv_dim", format!("must be positive, got {}", self.box_head.conv_dim));
        }
        for (field, value) in [
            ("rpn.positive_fraction", self.rpn.positive_fraction),
            ("roi_heads.positive_fraction", self.roi_heads.positive_fraction),
            ("rpn.nms_thresh", self.rpn.nms_thresh),
            ("roi_heads.nms_thresh_test", self.roi_heads.nms_thresh_test),
            ("roi_heads.iou_threshold", self.roi_heads.iou_threshold),
            ("mask_head.mask_threshold", self.mask_head.mask_threshold),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return err(field, format!("must be in [0, 1], got {value}"));
            }
        }
        let [low, high] = self.rpn.iou_thresholds;
        if !(0.0 <= low && low <= high && high <= 1.0) {
            return err("rpn.iou_thresholds", format!("need 0 <= low <= high <= 1, got [{low}, {high}]"));
        }
        if self.fpn.in_features.is_empty() {
            return err("fpn.in_features", "needs at least one backbone output".into());
        }
        let levels = self.fpn.in_features.len() + 1;
        if self.anchors.sizes.len() != levels {
            return err(
                "anchors.sizes",
                format!(
                    "needs one list per pyramid level ({levels}: P2..P6 from fpn.in_features plus P6), got {}",
                    self.anchors.sizes.len()
                ),
            );
        }
        if self.anchors.sizes.iter().any(|s| s.is_empty() || s.iter().any(|&v| v <= 0.0))
            || self.anchors.sizes.iter().any(|s| s.len() != self.anchors.sizes[0].len())
        {
            return err("anchors.sizes", "every level needs the same number of positive sizes".into());
        }
        if self.anchors.aspect_ratios.is_empty() || self.anchors.aspect_ratios.iter().any(|&r| r <= 0.0) {
            return err("anchors.aspect_ratios", "needs at least one positive ratio".into());
        }
        if self.roi_heads.in_features.is_empty() {
            return err("roi_heads.in_features", "needs at least one pyramid level".into());
        }
        for ((field, norm, groups), width) in [
            ("rpn.gn_groups", self.rpn.norm, self.rpn.gn_groups),
            ("fpn.gn_groups", self.fpn.norm, self.fpn.gn_groups),
            ("box_head.gn_groups", self.box_head.norm, self.box_head.gn_groups),
            ("mask_head.gn_groups", self.mask_head.norm, self.mask_head.gn_groups),
        ]
        .into_iter()
        .zip([self.fpn.out_channels, self.fpn.out_channels, self.box_head.conv_dim, self.mask_head.conv_dim])
        {
            if norm == HeadNorm::GN && (groups <= 0 || width % groups != 0) {
                return err(field, format!("{groups} groups do not divide the {width} channels"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_preset_file_equals_the_preset() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/presets/torchvision_maskrcnn_r50_fpn.toml");
        let parsed: DetectorConfig = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(parsed, DetectorConfig::torchvision_maskrcnn_r50_fpn(90));
        parsed.validate().unwrap();
    }

    #[test]
    fn defaults_are_the_scratch_recipe_and_unknown_keys_are_refused() {
        let parsed: DetectorConfig =
            toml::from_str("[backbone]\nname = \"V-39\"\n[roi_heads]\nnum_classes = 80\n").unwrap();
        assert_eq!(parsed, DetectorConfig::scratch("V-39", 80));
        assert_eq!(parsed.rpn.post_nms_topk_train, 1000);
        assert_eq!(parsed.box_head.num_conv, 4);
        let error = toml::from_str::<DetectorConfig>("[backbone]\nname = \"V-39\"\n[rpn]\nnms = 0.5\n").unwrap_err();
        assert!(error.to_string().contains("nms"), "{error}");
        let mut bad = DetectorConfig::scratch("V-39", 80);
        bad.anchors.sizes.pop();
        assert!(matches!(bad.validate(), Err(DetectorError::Config { field, .. }) if field == "anchors.sizes"));
    }
}
