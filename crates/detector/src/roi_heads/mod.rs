//! RoI heads (detectron2 `StandardROIHeads` with `FastRCNNConvFCHead`, `FastRCNNOutputLayers` and
//! `MaskRCNNConvUpsampleHead`): proposal matching and balanced sampling, the box head and predictor with
//! cross-entropy and smooth-L1 losses, the mask head trained on foreground RoIs, and test-time post-processing
//! (score threshold, per-class NMS, top-k, per-class mask selection).
//!
//! Training lives in `training.rs`. Host syncs: the foreground counts once per step (none with `static_shapes`);
//! polygon mask targets read the foreground boxes to the host once per image to rasterise them (bitmap targets stay
//! on the device); at test time the score filter and NMS read once per image; RoIAlign with adaptive sampling once
//! per pooler call.

mod training;

use std::sync::Arc;

use backbone::BatchStatsReducer;
use tch::{nn, Kind, Tensor};

use crate::config::{BoxHeadConfig, MaskHeadConfig, RoiHeadsConfig};
use crate::heads::{BoxHead, MaskHead};
use crate::layers::{Linear, LinearInit};
use crate::ops::{batched_nms, clip_boxes, BoxCoder, LevelMapping, Matcher, PyramidRows, RoiPooler};
use crate::rpn::Proposals;
use crate::DetectorError;

/// Boxes, scores and labels of one image before masks and rescaling.
#[derive(Debug)]
pub struct BoxDetections {
    /// `[D, 4]` boxes in the pixels of the image in the batch.
    pub boxes: Tensor,
    /// `[D]` scores, descending.
    pub scores: Tensor,
    /// `[D]` labels in `0..num_classes`.
    pub labels: Tensor,
}

/// Box and mask heads with their poolers, sampler and post-processing.
#[derive(Debug)]
pub struct RoiHeads {
    box_pooler: RoiPooler,
    box_head: BoxHead,
    cls_score: Linear,
    bbox_pred: Linear,
    mask_pooler: RoiPooler,
    mask_head: MaskHead,
    box_coder: BoxCoder,
    matcher: Matcher,
    config: RoiHeadsConfig,
    box_config: BoxHeadConfig,
    mask_config: MaskHeadConfig,
    /// With `static_shapes`: box regression and mask head on fixed, weighted foreground slots.
    static_foreground: bool,
}

impl RoiHeads {
    /// Builds the heads: `box_head.*`, `box_predictor.{cls_score,bbox_pred}.*` and `mask_head.*` under `path`,
    /// for pyramid levels of `channels` channels at `strides` (the levels named in `roi_heads.in_features`);
    /// `reducer` serves SyncBN head norms.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: &nn::Path,
        config: &RoiHeadsConfig,
        box_config: &BoxHeadConfig,
        mask_config: &MaskHeadConfig,
        channels: i64,
        strides: &[i64],
        level_mapping: LevelMapping,
        reducer: Option<Arc<dyn BatchStatsReducer>>,
    ) -> Result<RoiHeads, DetectorError> {
        let scales: Vec<f64> = strides.iter().map(|&s| 1.0 / s as f64).collect();
        let pooler = |resolution: i64, sampling_ratio: i64, aligned: bool| {
            RoiPooler::new(
                (resolution, resolution),
                scales.clone(),
                sampling_ratio,
                aligned,
                config.canonical_box_size,
                config.canonical_level,
            )
            .with_level_mapping(level_mapping)
        };
        let k = config.num_classes;
        let box_head = BoxHead::new(&path.sub("box_head"), box_config, channels, reducer.clone())?;
        let width = BoxHead::output_width(box_config, channels);
        let predictor = path.sub("box_predictor");
        let box_outputs = if box_config.cls_agnostic_bbox_reg { 4 } else { 4 * k };
        let mask_classes = if mask_config.cls_agnostic_mask { 1 } else { k };
        Ok(RoiHeads {
            box_pooler: pooler(
                box_config.pooler_resolution,
                box_config.pooler_sampling_ratio,
                box_config.pooler_aligned,
            ),
            box_head,
            cls_score: Linear::new(&predictor.sub("cls_score"), width, k + 1, LinearInit::Normal(0.01)),
            bbox_pred: Linear::new(&predictor.sub("bbox_pred"), width, box_outputs, LinearInit::Normal(0.001)),
            mask_pooler: pooler(
                mask_config.pooler_resolution,
                mask_config.pooler_sampling_ratio,
                mask_config.pooler_aligned,
            ),
            mask_head: MaskHead::new(&path.sub("mask_head"), mask_config, channels, mask_classes, reducer)?,
            box_coder: BoxCoder::new(box_config.bbox_reg_weights),
            matcher: Matcher::new(vec![config.iou_threshold], vec![0, 1], false)?,
            config: config.clone(),
            box_config: box_config.clone(),
            mask_config: mask_config.clone(),
            static_foreground: false,
        })
    }

    /// Box regression and mask head on a fixed number of weighted foreground slots per image (`static_shapes`), or
    /// on the sampled foreground only (`false`, the default, detectron2's).
    pub fn with_static_shapes(self, static_foreground: bool) -> RoiHeads {
        RoiHeads { static_foreground, ..self }
    }

    /// The mask of each RoI's class: `[R, C, M, M]` logits → `[R, M, M]`.
    fn select_class_masks(&self, logits: &Tensor, classes: &Tensor) -> Tensor {
        let s = logits.size();
        if self.mask_config.cls_agnostic_mask {
            return logits.select(1, 0);
        }
        let index = classes.view([s[0], 1, 1, 1]).expand([s[0], 1, s[2], s[3]], false);
        logits.gather(1, &index, false).squeeze_dim(1)
    }

    /// The pyramid maps the heads pool from (`roi_heads.in_features`), stacked once for both poolers.
    pub fn stack(&self, features: &[Tensor]) -> PyramidRows {
        self.box_pooler.stack(features)
    }

    /// Inference on the proposals, pooled from `rows` ([`RoiHeads::stack`]): class scores, per-class boxes, score
    /// threshold, optional small-box removal, per-class NMS and the top `detections_per_image`.
    pub fn detect_boxes(
        &self,
        rows: &PyramidRows,
        proposals: &[Proposals],
        image_sizes: &[(i64, i64)],
    ) -> Vec<BoxDetections> {
        let device = rows.device();
        let boxes: Vec<Tensor> = proposals.iter().map(|p| p.boxes.shallow_clone()).collect();
        let counts: Vec<i64> = boxes.iter().map(|b| b.size()[0]).collect();
        let total: i64 = counts.iter().sum();
        let k = self.config.num_classes;
        if total == 0 {
            return image_sizes.iter().map(|_| empty_detections(device)).collect();
        }
        let pooled = self.box_pooler.pool(rows, &boxes);
        let hidden = self.box_head.forward(&pooled, false);
        let probs = self.cls_score.forward(&hidden).softmax(-1, Kind::Float);
        let deltas = self.bbox_pred.forward(&hidden);
        let all_boxes = Tensor::cat(&boxes, 0);
        let decoded = self.box_coder.decode(&deltas, &all_boxes);
        let decoded = if self.box_config.cls_agnostic_bbox_reg {
            decoded.view([total, 1, 4]).expand([total, k, 4], false)
        } else {
            decoded.view([total, k, 4])
        };
        let mut offset = 0;
        counts
            .iter()
            .zip(image_sizes)
            .map(|(&count, &(h, w))| {
                let scores = probs.narrow(0, offset, count).narrow(1, 0, k);
                let boxes = clip_boxes(&decoded.narrow(0, offset, count).reshape([-1, 4]), h, w).view([count, k, 4]);
                offset += count;
                self.filter_detections(&boxes, &scores)
            })
            .collect()
    }

    /// detectron2 `fast_rcnn_inference_single_image` (plus torchvision's small-box removal when enabled).
    fn filter_detections(&self, boxes: &Tensor, scores: &Tensor) -> BoxDetections {
        let finite = boxes.isfinite().all_dim(2, false).logical_and(&scores.isfinite());
        let mut keep = scores.gt(self.config.score_thresh_test).logical_and(&finite);
        if self.config.test_min_box_size > 0.0 {
            let widths = boxes.select(2, 2) - boxes.select(2, 0);
            let heights = boxes.select(2, 3) - boxes.select(2, 1);
            let size = self.config.test_min_box_size;
            keep = keep.logical_and(&widths.ge(size)).logical_and(&heights.ge(size));
        }
        let index = keep.nonzero();
        let rows = index.select(1, 0);
        let classes = index.select(1, 1);
        let k = self.config.num_classes;
        let flat = &rows * k + &classes;
        let boxes = boxes.reshape([-1, 4]).index_select(0, &flat);
        let scores = scores.reshape([-1]).index_select(0, &flat);
        let keep = batched_nms(&boxes, &scores, &classes, self.config.nms_thresh_test);
        let keep = keep.narrow(0, 0, self.config.detections_per_image.min(keep.size()[0]));
        BoxDetections {
            boxes: boxes.index_select(0, &keep),
            scores: scores.index_select(0, &keep),
            labels: classes.index_select(0, &keep),
        }
    }

    /// Mask probabilities `[D, M, M]` (M = 2 x mask pooler resolution) of each detection's class, per image, pooled
    /// from `rows` ([`RoiHeads::stack`]).
    pub fn detect_masks(&self, rows: &PyramidRows, detections: &[BoxDetections]) -> Vec<Tensor> {
        let counts: Vec<i64> = detections.iter().map(|d| d.boxes.size()[0]).collect();
        let m = 2 * self.mask_config.pooler_resolution;
        let device = rows.device();
        if counts.iter().sum::<i64>() == 0 {
            return counts.iter().map(|_| Tensor::zeros([0, m, m], (Kind::Float, device))).collect();
        }
        let boxes: Vec<Tensor> = detections.iter().map(|d| d.boxes.shallow_clone()).collect();
        let labels = Tensor::cat(&detections.iter().map(|d| d.labels.shallow_clone()).collect::<Vec<_>>(), 0);
        let logits = self.mask_head.forward(&self.mask_pooler.pool(rows, &boxes), false);
        let probs = self.select_class_masks(&logits, &labels).sigmoid();
        let mut offset = 0;
        counts
            .iter()
            .map(|&count| {
                let p = probs.narrow(0, offset, count);
                offset += count;
                p
            })
            .collect()
    }
}

fn empty_detections(device: tch::Device) -> BoxDetections {
    BoxDetections {
        boxes: Tensor::zeros([0, 4], (Kind::Float, device)),
        scores: Tensor::zeros([0], (Kind::Float, device)),
        labels: Tensor::zeros([0], (Kind::Int64, device)),
    }
}
