//! RoI heads (detectron2 `StandardROIHeads` with `FastRCNNConvFCHead`, `FastRCNNOutputLayers` and
//! `MaskRCNNConvUpsampleHead`): proposal matching and balanced sampling, the box head and predictor with
//! cross-entropy and smooth-L1 losses, the mask head trained on foreground RoIs, and test-time post-processing
//! (score threshold, per-class NMS, top-k, per-class mask selection).
//!
//! Host syncs: sampling (`nonzero` inside `ops::subsample_labels`) once per image; the mask targets read the
//! foreground boxes to the host once per image to rasterise polygons; at test time the score filter and NMS
//! read once per image; RoIAlign with adaptive sampling once per pooler call.

use std::collections::BTreeMap;
use std::sync::Arc;

use backbone::BatchStatsReducer;
use tch::{nn, Kind, Reduction, Tensor};

use crate::config::{BoxHeadConfig, MaskHeadConfig, RoiHeadsConfig};
use crate::heads::{BoxHead, MaskHead};
use crate::layers::{Linear, LinearInit};
use crate::losses::smooth_l1_sum;
use crate::ops::{
    batched_nms, box_iou, clip_boxes, subsample_labels, BoxCoder, LevelMapping, Matcher, PyramidRows, RoiPooler,
};
use crate::rpn::Proposals;
use crate::structures::GtInstances;
use crate::targets::mask_targets;
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

/// Proposals sampled for training in one image.
struct SampledRois {
    boxes: Tensor,
    classes: Tensor,
    gt_boxes: Tensor,
    gt_index: Tensor,
    num_foreground: i64,
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
        })
    }

    /// Matches proposals (with the ground truth appended) to the ground truth and samples
    /// `batch_size_per_image` of them, foreground first.
    fn sample(&self, proposals: &Proposals, target: &GtInstances) -> SampledRois {
        let device = proposals.boxes.device();
        let gt_boxes = transfer::to_device(&target.boxes, device).to_kind(Kind::Float);
        let boxes = if self.config.proposal_append_gt {
            Tensor::cat(&[&proposals.boxes, &gt_boxes], 0)
        } else {
            proposals.boxes.shallow_clone()
        };
        let background = self.config.num_classes;
        let num_boxes = boxes.size()[0];
        let (matched, classes) = if target.is_empty() {
            (
                Tensor::zeros([num_boxes], (Kind::Int64, device)),
                Tensor::full([num_boxes], background, (Kind::Int64, device)),
            )
        } else {
            let (matched, labels) = self.matcher.match_quality(&box_iou(&gt_boxes, &boxes));
            let classes = transfer::to_device(&target.labels, device).index_select(0, &matched);
            let classes = classes.masked_fill(&labels.eq(0), background).masked_fill(&labels.eq(-1), -1);
            (matched, classes)
        };
        let (positive, negative) = subsample_labels(
            &classes,
            self.config.batch_size_per_image,
            self.config.positive_fraction,
            background,
            // A stream apart from the RPN's, which starts from the same per-image seed.
            target.sampling_seed.map(|seed| seed ^ 0x9e37_79b9_7f4a_7c15),
        );
        let sampled = Tensor::cat(&[&positive, &negative], 0);
        let gt_index = matched.index_select(0, &sampled);
        let sampled_gt_boxes = if target.is_empty() {
            Tensor::zeros([sampled.size()[0], 4], (Kind::Float, device))
        } else {
            gt_boxes.index_select(0, &gt_index)
        };
        SampledRois {
            boxes: boxes.index_select(0, &sampled),
            classes: classes.index_select(0, &sampled),
            gt_boxes: sampled_gt_boxes,
            gt_index,
            num_foreground: positive.size()[0],
        }
    }

    /// Training: samples RoIs and returns `loss_cls`, `loss_box_reg` and `loss_mask`. `features` are the pyramid
    /// levels named in `roi_heads.in_features`.
    pub fn forward_train(
        &self,
        features: &[Tensor],
        proposals: &[Proposals],
        targets: &[GtInstances],
    ) -> Result<BTreeMap<String, Tensor>, DetectorError> {
        let sampled: Vec<SampledRois> =
            tch::no_grad(|| proposals.iter().zip(targets).map(|(p, t)| self.sample(p, t)).collect());
        let zero = || features[0].sum(Kind::Float) * 0.0;
        let mut losses = BTreeMap::new();
        let total: i64 = sampled.iter().map(|s| s.boxes.size()[0]).sum();
        if total == 0 {
            for name in ["loss_cls", "loss_box_reg", "loss_mask"] {
                losses.insert(name.to_string(), zero());
            }
            return Ok(losses);
        }
        let boxes: Vec<Tensor> = sampled.iter().map(|s| s.boxes.shallow_clone()).collect();
        // The box and mask poolers read the same maps at the same scales: stack them once.
        let rows = self.stack(features);
        let pooled = self.box_pooler.pool(&rows, &boxes);
        let hidden = self.box_head.forward(&pooled, true);
        let logits = self.cls_score.forward(&hidden);
        let deltas = self.bbox_pred.forward(&hidden);
        let classes = Tensor::cat(&sampled.iter().map(|s| s.classes.shallow_clone()).collect::<Vec<_>>(), 0);
        losses.insert(
            "loss_cls".to_string(),
            logits.cross_entropy_loss::<Tensor>(&classes, None, Reduction::Mean, -100, 0.0),
        );

        // Foreground rows: the first `num_foreground` of each image's sampled set.
        let device = logits.device();
        let mut foreground = Vec::new();
        let mut offset = 0;
        for s in &sampled {
            foreground.extend(offset..offset + s.num_foreground);
            offset += s.boxes.size()[0];
        }
        if foreground.is_empty() {
            // The mask head still runs, on no RoIs (as detectron2's): a SyncBN in it joins the other processes'
            // all-reduce with zero weight, and its parameters get (zero) gradients on every rank alike.
            let pooled_size = pooled.size();
            let resolution = self.mask_config.pooler_resolution;
            let no_rois = pooled.new_zeros([0, pooled_size[1], resolution, resolution], (pooled.kind(), device));
            let mask_logits = self.mask_head.forward(&no_rois, true);
            losses.insert("loss_box_reg".to_string(), deltas.sum(Kind::Float) * 0.0);
            losses.insert("loss_mask".to_string(), mask_logits.sum(Kind::Float) * 0.0);
            return Ok(losses);
        }
        let foreground = transfer::upload(&Tensor::from_slice(&foreground), device);
        let fg_classes = classes.index_select(0, &foreground);
        let fg_deltas = deltas.index_select(0, &foreground);
        let fg_deltas = if self.box_config.cls_agnostic_bbox_reg {
            fg_deltas
        } else {
            let f = fg_deltas.size()[0];
            fg_deltas
                .view([f, -1, 4])
                .gather(1, &fg_classes.view([f, 1, 1]).expand([f, 1, 4], false), false)
                .squeeze_dim(1)
        };
        let fg_boxes: Vec<Tensor> = sampled.iter().map(|s| s.boxes.narrow(0, 0, s.num_foreground)).collect();
        let fg_gt_boxes: Vec<Tensor> = sampled.iter().map(|s| s.gt_boxes.narrow(0, 0, s.num_foreground)).collect();
        let target_deltas = self.box_coder.encode(&Tensor::cat(&fg_boxes, 0), &Tensor::cat(&fg_gt_boxes, 0));
        let box_loss = smooth_l1_sum(&fg_deltas, &target_deltas, self.box_config.smooth_l1_beta) / total as f64;
        losses.insert("loss_box_reg".to_string(), box_loss);

        // Mask loss on the foreground RoIs with targets rasterised inside each proposal box.
        let mask_size = 2 * self.mask_config.pooler_resolution;
        let mut targets_per_image = Vec::new();
        for (s, target) in sampled.iter().zip(targets) {
            let fg_index = s.gt_index.narrow(0, 0, s.num_foreground);
            targets_per_image.push(mask_targets(&target.masks, &fg_boxes_of(s), &fg_index, mask_size)?);
        }
        let mask_targets = transfer::to_device(&Tensor::cat(&targets_per_image, 0), device);
        let mask_features = self.mask_pooler.pool(&rows, &fg_boxes);
        let mask_logits = self.mask_head.forward(&mask_features, true);
        let mask_logits = self.select_class_masks(&mask_logits, &fg_classes);
        losses.insert(
            "loss_mask".to_string(),
            mask_logits.binary_cross_entropy_with_logits::<Tensor>(&mask_targets, None, None, Reduction::Mean),
        );
        Ok(losses)
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

fn fg_boxes_of(s: &SampledRois) -> Tensor {
    s.boxes.narrow(0, 0, s.num_foreground)
}

fn empty_detections(device: tch::Device) -> BoxDetections {
    BoxDetections {
        boxes: Tensor::zeros([0, 4], (Kind::Float, device)),
        scores: Tensor::zeros([0], (Kind::Float, device)),
        labels: Tensor::zeros([0], (Kind::Int64, device)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeadNorm;
    use crate::structures::GtMasks;
    use tch::Device;

    /// With fixed features and fixed RoIs (all of them sampled every step) the box classifier, the class-specific
    /// box regression and the mask head must fit their targets: every RoI-head loss falls.
    #[test]
    fn roi_head_losses_fall_on_fixed_rois() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let config = RoiHeadsConfig {
            num_classes: 3,
            batch_size_per_image: 64,
            positive_fraction: 1.0,
            proposal_append_gt: false,
            ..Default::default()
        };
        let box_config = BoxHeadConfig { conv_dim: 32, fc_dim: 64, gn_groups: 8, ..Default::default() };
        let mask_config = MaskHeadConfig {
            conv_dim: 32,
            gn_groups: 8,
            norm: HeadNorm::GN,
            pooler_resolution: 7,
            ..Default::default()
        };
        let heads =
            RoiHeads::new(&vs.root(), &config, &box_config, &mask_config, 8, &[4, 8], LevelMapping::Detectron2, None)
                .unwrap();
        let features = [
            Tensor::randn([1, 8, 32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randn([1, 8, 16, 16], (Kind::Float, Device::Cpu)),
        ];
        let target = GtInstances {
            boxes: Tensor::from_slice(&[10.0f32, 12.0, 70.0, 60.0, 60.0, 50.0, 120.0, 124.0]).view([2, 4]),
            labels: Tensor::from_slice(&[0i64, 2]),
            masks: GtMasks::Polygons(vec![
                vec![vec![10.0, 12.0, 70.0, 12.0, 10.0, 60.0]],
                vec![vec![60.0, 50.0, 120.0, 50.0, 120.0, 124.0, 60.0, 124.0]],
            ]),
            sampling_seed: None,
        };
        let jitter =
            Tensor::from_slice(&[-4.0f32, 3.0, 5.0, -2.0, 6.0, -5.0, -3.0, 4.0, 0.0, 0.0, 0.0, 0.0]).view([3, 1, 4]);
        let proposals = Proposals {
            boxes: (target.boxes.unsqueeze(0) + jitter).reshape([-1, 4]),
            logits: Tensor::zeros([6], (Kind::Float, Device::Cpu)),
        };
        let params = vs.trainable_variables();
        let momentum: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
        let mut history: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for _ in 0..30 {
            let losses = heads
                .forward_train(&features, std::slice::from_ref(&proposals), std::slice::from_ref(&target))
                .unwrap();
            let total = losses.values().map(|l| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
            for (name, loss) in &losses {
                history.entry(name.clone()).or_default().push(loss.double_value(&[]));
            }
            for p in &params {
                p.shallow_clone().zero_grad();
            }
            total.backward();
            tch::no_grad(|| {
                for (p, buf) in params.iter().zip(&momentum) {
                    let _ = buf.shallow_clone().g_mul_scalar_(0.9).g_add_(&p.grad());
                    let _ = p.shallow_clone().g_sub_(&(buf * 0.01));
                }
            });
        }
        assert_eq!(history.len(), 3);
        for (name, h) in &history {
            eprintln!("{name}: {:?}", h.iter().map(|v| (v * 1e3).round() / 1e3).collect::<Vec<_>>());
            let first = h[..5].iter().sum::<f64>() / 5.0;
            let last = h[h.len() - 5..].iter().sum::<f64>() / 5.0;
            assert!(last < 0.9 * first, "{name} did not fall: {h:?}");
        }
    }
}
