//! Training of the RoI heads: proposal matching and balanced sampling in fixed-size slots, the classification and
//! box-regression losses over the sampled RoIs, and the mask loss over the foreground RoIs.
//!
//! The sampler puts each image's foreground first, in at most `batch_size_per_image * positive_fraction` slots.
//! With `static_shapes` the box regression and the mask head run on all those slots, weighted by
//! whether they hold foreground: the same shapes every step and no host read. Without it (detectron2's way) the
//! foreground counts are read to the host once per step and only the foreground RoIs run.

use std::collections::BTreeMap;

use tch::{Kind, Reduction, Tensor};

use super::RoiHeads;
use crate::losses::masked_smooth_l1_sum;
use crate::ops::{box_iou, max_positives, sample_balanced};
use crate::rpn::Proposals;
use crate::structures::TrainingTargets;
use crate::targets::mask_targets;
use crate::DetectorError;

/// The RoIs sampled for training in one image, in the sampler's slots (foreground first).
struct SampledRois {
    /// `[S, 4]` RoI boxes.
    boxes: Tensor,
    /// `[S]` i64 class targets: the matched class, `num_classes` for background, -100 (ignored) for empty slots.
    classes: Tensor,
    /// `[S, 4]` matched ground-truth boxes (zeros when the image has none).
    gt_boxes: Tensor,
    /// `[S]` i64 matched ground-truth index.
    gt_index: Tensor,
    /// `[S]` bool: the slot holds a foreground RoI.
    positive: Tensor,
}

impl SampledRois {
    fn len(&self) -> i64 {
        self.boxes.size()[0]
    }
}

impl RoiHeads {
    /// Matches proposals (with the ground truth appended) to the ground truth and samples
    /// `batch_size_per_image` of them, foreground first.
    fn sample(&self, proposals: &Proposals, targets: &TrainingTargets) -> SampledRois {
        let target = &targets.gt;
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
            let (matched, labels) = self.matcher.match_valid(&box_iou(&gt_boxes, &boxes), targets.valid.as_ref());
            let classes = transfer::to_device(&target.labels, device).index_select(0, &matched);
            let classes = classes.masked_fill(&labels.eq(0), background).masked_fill(&labels.eq(-1), -1);
            (matched, classes)
        };
        // Empty proposal slots and padding instances (`static_shapes`) are never sampled.
        let classes = if proposals.valid.is_some() || targets.valid.is_some() {
            let proposal_valid = match &proposals.valid {
                Some(valid) => valid.shallow_clone(),
                None => Tensor::ones([proposals.boxes.size()[0]], (Kind::Bool, device)),
            };
            let mut valid = vec![proposal_valid];
            if self.config.proposal_append_gt {
                valid.push(targets.valid_or_all());
            }
            classes.masked_fill(&Tensor::cat(&valid, 0).logical_not(), -1)
        } else {
            classes
        };
        let sample = sample_balanced(
            &classes,
            self.config.batch_size_per_image,
            self.config.positive_fraction,
            background,
            // A stream apart from the RPN's, which starts from the same per-image seed.
            target.sampling_seed.map(|seed| seed ^ 0x9e37_79b9_7f4a_7c15),
        );
        let gt_index = matched.index_select(0, &sample.index);
        let sampled_gt_boxes = if target.is_empty() {
            Tensor::zeros([sample.len(), 4], (Kind::Float, device))
        } else {
            gt_boxes.index_select(0, &gt_index)
        };
        SampledRois {
            boxes: boxes.index_select(0, &sample.index),
            classes: classes.index_select(0, &sample.index).masked_fill(&sample.valid.logical_not(), -100),
            gt_boxes: sampled_gt_boxes,
            gt_index,
            positive: sample.positive,
        }
    }

    /// Foreground slots per image: the fixed slot count with `static_shapes`, otherwise the sampled
    /// foreground counts (one host read for the whole batch).
    fn foreground_slots(&self, sampled: &[SampledRois]) -> Result<Vec<i64>, DetectorError> {
        let most = max_positives(self.config.batch_size_per_image, self.config.positive_fraction);
        if self.static_foreground {
            return Ok(sampled.iter().map(|s| most.min(s.len())).collect());
        }
        let counts = Tensor::stack(&sampled.iter().map(|s| s.positive.sum(Kind::Int64)).collect::<Vec<_>>(), 0);
        transfer::download_vec::<i64>(&counts)
            .map_err(|e| DetectorError::Input(format!("RoI sampling: cannot read the foreground counts ({e})")))
    }

    /// Training: samples RoIs and returns `loss_cls`, `loss_box_reg` and `loss_mask`. `features` are the pyramid
    /// levels named in `roi_heads.in_features`.
    pub fn forward_train(
        &self,
        features: &[Tensor],
        proposals: &[Proposals],
        targets: &[TrainingTargets],
    ) -> Result<BTreeMap<String, Tensor>, DetectorError> {
        let sampled: Vec<SampledRois> =
            tch::no_grad(|| proposals.iter().zip(targets).map(|(p, t)| self.sample(p, t)).collect());
        let zero = || features[0].sum(Kind::Float) * 0.0;
        let mut losses = BTreeMap::new();
        if sampled.iter().all(|s| s.len() == 0) {
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
        // Mean over the sampled RoIs (empty slots are ignored).
        losses.insert(
            "loss_cls".to_string(),
            logits.cross_entropy_loss::<Tensor>(&classes, None, Reduction::Mean, -100, 0.0),
        );
        let num_sampled = classes.ne(-100).sum(Kind::Float).clamp_min(1.0);

        let slots = self.foreground_slots(&sampled)?;
        // The first `slots[i]` rows of each image's block of `rows` (images in order, `len()` rows each).
        let take = |rows: &Tensor| {
            let mut offset = 0;
            let parts: Vec<Tensor> = sampled
                .iter()
                .zip(&slots)
                .map(|(s, &count)| {
                    let part = rows.narrow(0, offset, count);
                    offset += s.len();
                    part
                })
                .collect();
            Tensor::cat(&parts, 0)
        };
        let fg_positive =
            take(&Tensor::cat(&sampled.iter().map(|s| s.positive.shallow_clone()).collect::<Vec<_>>(), 0));
        if fg_positive.size()[0] == 0 {
            // The mask head still runs, on no RoIs (as detectron2's): a SyncBN in it joins the other processes'
            // all-reduce with zero weight, and its parameters get (zero) gradients on every rank alike.
            let pooled_size = pooled.size();
            let resolution = self.mask_config.pooler_resolution;
            let no_rois =
                pooled.new_zeros([0, pooled_size[1], resolution, resolution], (pooled.kind(), pooled.device()));
            let mask_logits = self.mask_head.forward(&no_rois, true);
            losses.insert("loss_box_reg".to_string(), deltas.sum(Kind::Float) * 0.0);
            losses.insert("loss_mask".to_string(), mask_logits.sum(Kind::Float) * 0.0);
            return Ok(losses);
        }
        // Class targets of the foreground slots; empty and background slots point at class 0 with weight 0.
        let fg_classes = take(&classes).masked_fill(&fg_positive.logical_not(), 0);
        let fg_deltas = take(&deltas);
        let fg_deltas = if self.box_config.cls_agnostic_bbox_reg {
            fg_deltas
        } else {
            let f = fg_deltas.size()[0];
            fg_deltas
                .view([f, -1, 4])
                .gather(1, &fg_classes.view([f, 1, 1]).expand([f, 1, 4], false), false)
                .squeeze_dim(1)
        };
        let fg_boxes: Vec<Tensor> = sampled.iter().zip(&slots).map(|(s, &n)| s.boxes.narrow(0, 0, n)).collect();
        let fg_gt_boxes: Vec<Tensor> = sampled.iter().zip(&slots).map(|(s, &n)| s.gt_boxes.narrow(0, 0, n)).collect();
        let keep = fg_positive.unsqueeze(1);
        let target_deltas = self.box_coder.encode(&Tensor::cat(&fg_boxes, 0), &Tensor::cat(&fg_gt_boxes, 0));
        let box_loss =
            masked_smooth_l1_sum(&fg_deltas, &target_deltas, &keep, self.box_config.smooth_l1_beta) / &num_sampled;
        losses.insert("loss_box_reg".to_string(), box_loss);

        // Mask loss on the foreground RoIs with targets rasterised inside each RoI box.
        let mask_size = 2 * self.mask_config.pooler_resolution;
        let mut targets_per_image = Vec::new();
        for ((s, target), (boxes, &count)) in sampled.iter().zip(targets).zip(fg_boxes.iter().zip(&slots)) {
            let target = &target.gt;
            targets_per_image.push(if target.is_empty() {
                Tensor::zeros([count, mask_size, mask_size], (Kind::Float, boxes.device()))
            } else {
                mask_targets(&target.masks, boxes, &s.gt_index.narrow(0, 0, count), mask_size, self.static_foreground)?
            });
        }
        let mask_targets = transfer::to_device(&Tensor::cat(&targets_per_image, 0), deltas.device());
        let mask_features = self.mask_pooler.pool(&rows, &fg_boxes);
        let mask_logits = self.mask_head.forward(&mask_features, true);
        let mask_logits = self.select_class_masks(&mask_logits, &fg_classes);
        // Mean over the foreground RoIs' pixels (in fixed slots, weighted; otherwise every RoI is foreground).
        let mask_loss = if self.static_foreground {
            let weight = fg_positive.to_kind(Kind::Float);
            let pixels = (weight.sum(Kind::Float) * (mask_size * mask_size) as f64).clamp_min(1.0);
            mask_logits.binary_cross_entropy_with_logits::<Tensor>(
                &mask_targets,
                Some(weight.view([-1, 1, 1])),
                None,
                Reduction::Sum,
            ) / pixels
        } else {
            mask_logits.binary_cross_entropy_with_logits::<Tensor>(&mask_targets, None, None, Reduction::Mean)
        };
        losses.insert("loss_mask".to_string(), mask_loss);
        Ok(losses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeadNorm;
    use crate::config::{BoxHeadConfig, MaskHeadConfig, RoiHeadsConfig};
    use crate::ops::LevelMapping;
    use crate::structures::{GtInstances, GtMasks};
    use tch::nn;
    use tch::Device;

    /// Heads with 3 classes and narrow GN heads, two pyramid maps, two ground-truth instances and six proposals
    /// around them (each jittered twice and once exactly), sampled in `batch_size` slots.
    fn fixture(
        batch_size: i64,
        positive_fraction: f64,
    ) -> (nn::VarStore, RoiHeads, [Tensor; 2], TrainingTargets, Proposals) {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let config = RoiHeadsConfig {
            num_classes: 3,
            batch_size_per_image: batch_size,
            positive_fraction,
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
            sampling_seed: Some(3),
        };
        let jitter =
            Tensor::from_slice(&[-4.0f32, 3.0, 5.0, -2.0, 6.0, -5.0, -3.0, 4.0, 0.0, 0.0, 0.0, 0.0]).view([3, 1, 4]);
        let proposals = Proposals {
            boxes: (target.boxes.unsqueeze(0) + jitter).reshape([-1, 4]),
            logits: Tensor::zeros([6], (Kind::Float, Device::Cpu)),
            valid: None,
        };
        (vs, heads, features, TrainingTargets::new(&target, Device::Cpu, None), proposals)
    }

    /// With static shapes the foreground runs in fixed, weighted slots: the losses and the gradients equal
    /// those of detectron2's way (only the sampled foreground), for the same sample.
    #[test]
    fn static_foreground_slots_give_the_same_losses_and_gradients() {
        // 16 slots with at most 8 foreground: some foreground slots are empty (6 proposals, 4 of them foreground).
        let (vs, mut heads, features, target, proposals) = fixture(16, 0.5);
        let mut results = Vec::new();
        for static_foreground in [false, true] {
            heads.static_foreground = static_foreground;
            vs.trainable_variables().iter().for_each(|p| p.shallow_clone().zero_grad());
            let losses = heads
                .forward_train(&features, std::slice::from_ref(&proposals), std::slice::from_ref(&target))
                .unwrap();
            let total = losses.values().map(|l| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
            total.backward();
            let values: Vec<f64> = losses.values().map(|l| l.double_value(&[])).collect();
            let grads: Vec<Tensor> = vs.trainable_variables().iter().map(|p| p.grad().copy()).collect();
            results.push((values, grads));
        }
        let ((dynamic, dynamic_grads), (fixed, fixed_grads)) = (&results[0], &results[1]);
        for (a, b) in dynamic.iter().zip(fixed) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-3), "losses differ: {dynamic:?} vs {fixed:?}");
        }
        assert!(dynamic[2] > 0.0, "the mask loss is computed");
        for (a, b) in dynamic_grads.iter().zip(fixed_grads) {
            let difference = (a - b).abs().max().double_value(&[]);
            assert!(difference <= 1e-5 * a.abs().max().double_value(&[]).max(1e-6), "gradients differ by {difference}");
        }
    }

    /// With fixed features and fixed RoIs (all of them sampled every step) the box classifier, the class-specific
    /// box regression and the mask head must fit their targets: every RoI-head loss falls.
    #[test]
    fn roi_head_losses_fall_on_fixed_rois() {
        let (vs, heads, features, target, proposals) = fixture(64, 1.0);
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
