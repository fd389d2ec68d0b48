//! Region proposal network (detectron2 `RPN` with `StandardRPNHead`): shared 3x3 conv(s) + ReLU, objectness and
//! box-delta 1x1 convs per level; anchor labelling with low-quality matches and balanced sampling for the losses;
//! proposal selection by per-level top-k, clipping, removal of small boxes, per-level NMS and per-image top-k.
//!
//! Host syncs: the proposal filter and NMS read small index sets to the host once per image (`nonzero` and the
//! greedy scan of `ops::nms`), except in training with `static_shapes` (fixed-size proposals, NMS on the
//! device); the anchor sampler and the losses stay on the device.

use std::collections::BTreeMap;

use std::sync::Arc;

use backbone::layers::{Conv2d, ConvInit, ConvOpts};
use backbone::BatchStatsReducer;
use tch::{nn, Kind, Reduction, Tensor};

use crate::anchors::AnchorGenerator;
use crate::config::{AnchorConfig, RpnConfig};
use crate::layers::ConvUnit;
use crate::losses::masked_smooth_l1_sum;
use crate::ops::{
    batched_nms, box_iou, clip_boxes, max_positives, nms_sweeps, nonempty, sample_balanced, BoxCoder, Matcher,
};
use crate::structures::TrainingTargets;
use crate::DetectorError;

/// Proposals of one image, detached from the graph.
#[derive(Debug)]
pub struct Proposals {
    /// `[P, 4]` float32 boxes in image pixels, clipped to the image.
    pub boxes: Tensor,
    /// `[P]` objectness logits, descending (in training, in anchor order).
    pub logits: Tensor,
    /// `[P]` bool with `static_shapes` (training): which slots hold a proposal (the others hold zero boxes);
    /// `None` when every row is a proposal.
    pub valid: Option<Tensor>,
}

/// The RPN: head, anchors, box coder and anchor matcher.
#[derive(Debug)]
pub struct Rpn {
    convs: Vec<ConvUnit>,
    objectness_logits: Conv2d,
    anchor_deltas: Conv2d,
    anchor_generator: AnchorGenerator,
    box_coder: BoxCoder,
    matcher: Matcher,
    config: RpnConfig,
    /// With `static_shapes`: the sweeps of the device NMS of fixed-size training proposals.
    static_nms_sweeps: Option<i64>,
}

impl Rpn {
    /// Builds the head under `path` (`conv.*`, or `conv.conv0.*`, `conv.conv1.*`, ... as detectron2 names more
    /// than one; `objectness_logits.*`, `anchor_deltas.*`) for pyramid levels of `channels` channels at
    /// `strides`; `reducer` serves a SyncBN `config.norm`.
    pub fn new(
        path: &nn::Path,
        config: &RpnConfig,
        anchors: &AnchorConfig,
        (channels, strides): (i64, &[i64]),
        reducer: Option<Arc<dyn BatchStatsReducer>>,
    ) -> Result<Rpn, DetectorError> {
        let anchor_generator = AnchorGenerator::new(anchors, strides);
        let a = anchor_generator.num_cell_anchors();
        let opts = |kernel: i64| ConvOpts {
            bias: true,
            init: ConvInit::Normal(0.01),
            padding: Some(kernel / 2),
            ..Default::default()
        };
        let [low, high] = config.iou_thresholds;
        let norm = config.norm.spec(config.gn_groups, reducer);
        let conv_path = path.sub("conv");
        let convs = (0..config.num_conv)
            .map(|i| {
                let p = if config.num_conv == 1 { conv_path.clone() } else { conv_path.sub(format!("conv{i}")) };
                ConvUnit::new(&p, (channels, channels, 3), ConvInit::Normal(0.01), norm.as_ref(), true)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rpn {
            convs,
            objectness_logits: Conv2d::new(&path.sub("objectness_logits"), channels, a, 1, opts(1)),
            anchor_deltas: Conv2d::new(&path.sub("anchor_deltas"), channels, 4 * a, 1, opts(1)),
            anchor_generator,
            box_coder: BoxCoder::new(config.bbox_reg_weights),
            matcher: Matcher::new(vec![low, high], vec![0, -1, 1], true)?,
            config: config.clone(),
            static_nms_sweeps: None,
        })
    }

    /// Fixed-size training proposals with NMS on the device in `nms_sweeps` sweeps (`static_shapes`), or
    /// detectron2's lists cut on the host (`None`, the default).
    pub fn with_static_shapes(self, nms_sweeps: Option<i64>) -> Rpn {
        Rpn { static_nms_sweeps: nms_sweeps, ..self }
    }

    /// Proposals for every image and, when `targets` is given (training), the losses `loss_rpn_cls` and
    /// `loss_rpn_loc`. `features` are the pyramid levels `[N, C, H_l, W_l]`; `padded_size` is the batch's
    /// `(H, W)` and `image_sizes` each image's content size.
    pub fn forward(
        &self,
        features: &[Tensor],
        padded_size: (i64, i64),
        image_sizes: &[(i64, i64)],
        targets: Option<&[TrainingTargets]>,
    ) -> (Vec<Proposals>, BTreeMap<String, Tensor>) {
        let n = features[0].size()[0];
        let mut logits = Vec::with_capacity(features.len());
        let mut deltas = Vec::with_capacity(features.len());
        let train = targets.is_some();
        for feature in features {
            let t = self.convs.iter().fold(feature.shallow_clone(), |x, conv| conv.forward(&x, train));
            let l = self.objectness_logits.forward(&t);
            let d = self.anchor_deltas.forward(&t);
            let s = d.size();
            logits.push(l.permute([0, 2, 3, 1]).reshape([n, -1]));
            deltas.push(d.view([n, -1, 4, s[2], s[3]]).permute([0, 3, 4, 1, 2]).reshape([n, -1, 4]));
        }
        let feature_sizes: Vec<(i64, i64)> = features.iter().map(|f| (f.size()[2], f.size()[3])).collect();
        let anchors = self.anchor_generator.forward(&feature_sizes, padded_size, features[0].device());
        let training = targets.is_some();
        let proposals = tch::no_grad(|| self.select_proposals(&anchors, &logits, &deltas, image_sizes, training));
        let mut losses = BTreeMap::new();
        if let Some(targets) = targets {
            let (cls, loc) = self.losses(&anchors, &logits, &deltas, targets);
            losses.insert("loss_rpn_cls".to_string(), cls);
            losses.insert("loss_rpn_loc".to_string(), loc);
        }
        (proposals, losses)
    }

    /// detectron2 `find_top_rpn_proposals`: per level the top `pre_nms_topk` logits, decoded; per image clipped,
    /// non-finite and small boxes removed, NMS per level, the best `post_nms_topk` kept.
    ///
    /// In training the kept proposals are put in anchor order instead of score order. The RoI sampler picks
    /// random positions in this list, so with score order two proposals whose scores differ by float rounding
    /// (a batch of 2 vs two batches of 1, another GPU) could swap and change the whole sample; in anchor order
    /// the sample only changes when the kept set does. Which proposals are kept is unchanged.
    fn select_proposals(
        &self,
        anchors: &[Tensor],
        logits: &[Tensor],
        deltas: &[Tensor],
        image_sizes: &[(i64, i64)],
        training: bool,
    ) -> Vec<Proposals> {
        let (pre_nms_topk, post_nms_topk) = if training {
            (self.config.pre_nms_topk_train, self.config.post_nms_topk_train)
        } else {
            (self.config.pre_nms_topk_test, self.config.post_nms_topk_test)
        };
        let n = logits[0].size()[0];
        let device = logits[0].device();
        let mut level_deltas = Vec::new();
        let mut level_anchors = Vec::new();
        let mut level_scores = Vec::new();
        let mut level_ids = Vec::new();
        let mut anchor_ids = Vec::new();
        let mut first_anchor = 0;
        let mut level_sizes = Vec::new();
        for (level, ((anchors, logits), deltas)) in anchors.iter().zip(logits).zip(deltas).enumerate() {
            let k = pre_nms_topk.min(logits.size()[1]);
            level_sizes.push(k);
            let (scores, index) = logits.topk(k, 1, true, true);
            anchor_ids.push(&index + first_anchor);
            first_anchor += logits.size()[1];
            level_deltas.push(deltas.gather(1, &index.unsqueeze(2).expand([n, k, 4], false), false));
            level_anchors.push(anchors.index_select(0, &index.reshape([-1])).view([n, k, 4]));
            level_scores.push(scores);
            level_ids.push(Tensor::full([k], level as i64, (Kind::Int64, device)));
        }
        // One decode for every level and image (elementwise, so the same boxes as decoding level by level).
        let deltas = Tensor::cat(&level_deltas, 1);
        let selected = deltas.size()[1];
        let boxes = self
            .box_coder
            .decode(&deltas.reshape([-1, 4]), &Tensor::cat(&level_anchors, 1).reshape([-1, 4]))
            .view([n, selected, 4]);
        let scores = Tensor::cat(&level_scores, 1);
        let level_ids = Tensor::cat(&level_ids, 0);
        let anchor_ids = Tensor::cat(&anchor_ids, 1);
        if let Some(sweeps) = self.static_nms_sweeps.filter(|_| training) {
            return self.fixed_size_proposals(&boxes, &scores, &anchor_ids, &level_sizes, image_sizes, sweeps);
        }
        image_sizes
            .iter()
            .enumerate()
            .map(|(i, &(h, w))| {
                let boxes = clip_boxes(&boxes.get(i as i64), h, w);
                let scores = scores.get(i as i64);
                let finite = boxes.isfinite().all_dim(1, false).logical_and(&scores.isfinite());
                let keep = nonempty(&boxes, self.config.min_size).logical_and(&finite).nonzero().squeeze_dim(1);
                let (boxes, scores, levels, ids) = (
                    boxes.index_select(0, &keep),
                    scores.index_select(0, &keep),
                    level_ids.index_select(0, &keep),
                    anchor_ids.get(i as i64).index_select(0, &keep),
                );
                let keep = batched_nms(&boxes, &scores, &levels, self.config.nms_thresh);
                let mut keep = keep.narrow(0, 0, post_nms_topk.min(keep.size()[0]));
                if training {
                    let order = ids.index_select(0, &keep).argsort(0, false);
                    keep = keep.index_select(0, &order);
                }
                Proposals { boxes: boxes.index_select(0, &keep), logits: scores.index_select(0, &keep), valid: None }
            })
            .collect()
    }

    /// Training proposals with `static_shapes`: the same selection as [`Rpn::select_proposals`] in
    /// fixed-size tensors. The decoded `boxes` `[N, M, 4]` with their `scores` `[N, M]` and `anchor_ids` come level
    /// after level (`level_sizes` boxes each); boxes that are not finite or too small are marked invalid, NMS runs
    /// per image and level on the device ([`nms_sweeps`]), and the `post_nms_topk_train` best kept boxes fill
    /// each image's slots in anchor order, the slots beyond the kept boxes marked invalid (zero boxes).
    fn fixed_size_proposals(
        &self,
        boxes: &Tensor,
        scores: &Tensor,
        anchor_ids: &Tensor,
        level_sizes: &[i64],
        image_sizes: &[(i64, i64)],
        sweeps: i64,
    ) -> Vec<Proposals> {
        let (n, total) = (scores.size()[0], scores.size()[1]);
        let clipped: Vec<Tensor> =
            image_sizes.iter().enumerate().map(|(i, &(h, w))| clip_boxes(&boxes.get(i as i64), h, w)).collect();
        let boxes = Tensor::stack(&clipped, 0);
        let valid = boxes
            .isfinite()
            .all_dim(2, false)
            .logical_and(&scores.isfinite())
            .logical_and(&nonempty(&boxes.view([-1, 4]), self.config.min_size).view([n, total]));
        // One NMS problem per image and level, each padded with invalid boxes to the largest level.
        let widest = level_sizes.iter().copied().max().unwrap_or(0);
        let (mut level_boxes, mut level_scores, mut level_valid) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        for &size in level_sizes {
            let pad = |t: &Tensor| {
                let mut shape = t.size();
                shape[1] = widest - size;
                Tensor::cat(&[t.narrow(1, start, size), t.new_zeros(shape.as_slice(), (t.kind(), t.device()))], 1)
            };
            level_boxes.push(pad(&boxes));
            level_scores.push(pad(scores));
            level_valid.push(pad(&valid));
            start += size;
        }
        let levels = level_sizes.len() as i64;
        let swept = nms_sweeps(
            &Tensor::stack(&level_boxes, 1).view([n * levels, widest, 4]),
            &Tensor::stack(&level_scores, 1).view([n * levels, widest]),
            &Tensor::stack(&level_valid, 1).view([n * levels, widest]),
            self.config.nms_thresh,
            sweeps,
        );
        crate::diagnostics::add("rpn_nms_unconverged", &swept.unconverged);
        let keep = swept.keep.view([n, levels, widest]);
        let keep = Tensor::cat(
            &level_sizes
                .iter()
                .enumerate()
                .map(|(l, &size)| keep.select(1, l as i64).narrow(1, 0, size))
                .collect::<Vec<_>>(),
            1,
        );
        // The best kept boxes, then in anchor order (the slots without a kept box last).
        let slots = self.config.post_nms_topk_train.min(total);
        let best = scores.masked_fill(&keep.logical_not(), f64::NEG_INFINITY).topk(slots, 1, true, true).1;
        let kept = keep.gather(1, &best, false);
        let anchor_order =
            anchor_ids.gather(1, &best, false).masked_fill(&kept.logical_not(), i64::MAX).argsort(1, false);
        let order = best.gather(1, &anchor_order, false);
        let kept = keep.gather(1, &order, false);
        let boxes = boxes
            .gather(1, &order.unsqueeze(2).expand([n, slots, 4], false), false)
            .masked_fill(&kept.logical_not().unsqueeze(2), 0.0);
        let logits = scores.gather(1, &order, false);
        (0..n).map(|i| Proposals { boxes: boxes.get(i), logits: logits.get(i), valid: Some(kept.get(i)) }).collect()
    }

    /// Objectness (binary cross-entropy) and box (smooth-L1) losses over `batch_size_per_image` sampled anchors
    /// per image, both summed and divided by `batch_size_per_image * N` (detectron2's normaliser).
    fn losses(
        &self,
        anchors: &[Tensor],
        logits: &[Tensor],
        deltas: &[Tensor],
        targets: &[TrainingTargets],
    ) -> (Tensor, Tensor) {
        let anchors = Tensor::cat(anchors, 0);
        let logits = Tensor::cat(logits, 1);
        let deltas = Tensor::cat(deltas, 1);
        let device = anchors.device();
        // Sampling is per image (fixed-size slots, see `ops::sample_balanced`); the losses are computed once over
        // the samples of all images, empty slots weighted 0.
        let (mut sampled_logits, mut objectness_targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        let (mut slot_deltas, mut slot_anchors, mut slot_gt, mut slot_positive) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let positive_slots = max_positives(self.config.batch_size_per_image, self.config.positive_fraction);
        for (i, target) in targets.iter().enumerate() {
            let gt_boxes = transfer::to_device(&target.gt.boxes, device).to_kind(Kind::Float);
            let (matched, labels) = tch::no_grad(|| {
                let iou = box_iou(&gt_boxes, &anchors);
                self.matcher.match_valid(&iou, target.valid.as_ref())
            });
            let sample = sample_balanced(
                &labels,
                self.config.batch_size_per_image,
                self.config.positive_fraction,
                0,
                target.gt.sampling_seed,
            );
            sampled_logits.push(logits.get(i as i64).index_select(0, &sample.index));
            objectness_targets.push(sample.positive.to_kind(Kind::Float));
            weights.push(sample.valid.to_kind(Kind::Float));
            if !target.gt.is_empty() {
                // Every positive lies in the first `positive_slots` slots.
                let count = positive_slots.min(sample.len());
                let index = sample.index.narrow(0, 0, count);
                slot_positive.push(sample.positive.narrow(0, 0, count));
                slot_gt.push(gt_boxes.index_select(0, &matched.index_select(0, &index)));
                slot_anchors.push(anchors.index_select(0, &index));
                slot_deltas.push(deltas.get(i as i64).index_select(0, &index));
            }
        }
        let cls_loss = Tensor::cat(&sampled_logits, 0).binary_cross_entropy_with_logits::<Tensor>(
            &Tensor::cat(&objectness_targets, 0),
            Some(Tensor::cat(&weights, 0)),
            None,
            Reduction::Sum,
        );
        let loc_loss = if slot_deltas.is_empty() {
            deltas.sum(Kind::Float) * 0.0
        } else {
            let keep = Tensor::cat(&slot_positive, 0).unsqueeze(1);
            let predicted = Tensor::cat(&slot_deltas, 0);
            let target_deltas = self.box_coder.encode(&Tensor::cat(&slot_anchors, 0), &Tensor::cat(&slot_gt, 0));
            masked_smooth_l1_sum(&predicted, &target_deltas, &keep, self.config.smooth_l1_beta)
        };
        let normalizer = (self.config.batch_size_per_image * targets.len() as i64) as f64;
        (cls_loss / normalizer, loc_loss / normalizer)
    }
}
