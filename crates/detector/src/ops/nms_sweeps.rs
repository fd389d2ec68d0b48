//! Greedy non-maximum suppression without a host read: many independent NMS problems (one per image and pyramid
//! level) solved at once on the device, in a fixed number of parallel sweeps.
//!
//! Sorted by decreasing score, greedy NMS keeps box `j` exactly when it is valid and no kept box before it
//! suppresses it (IoU above the threshold). That rule has one solution (each box depends only on earlier ones), and
//! the sweep `keep <- valid and not (some kept box suppresses it)`, started from all valid boxes, reaches it after
//! as many sweeps as the longest chain of boxes that each suppress the next, plus one; every sweep after that
//! changes nothing. Each sweep is one batched matrix-vector product over the `[B, K, K]` suppression matrix, so
//! the work has a fixed shape and never waits for the host. One extra sweep checks convergence: the problems
//! whose last sweep still changed something are counted on the device, for the caller to read when it reads its
//! other values; their result is then not yet greedy NMS's.

use tch::{Kind, Tensor};

use super::boxes::box_iou;

/// The result of [`nms_sweeps`].
#[derive(Debug)]
pub struct SweptNms {
    /// `[B, K]` bool: the box is kept, in the input's positions.
    pub keep: Tensor,
    /// 0-dim i64: how many of the `B` problems had not converged after the sweeps.
    pub unconverged: Tensor,
}

/// NMS of each row of `boxes` `[B, K, 4]` (xyxy) by `scores` `[B, K]`, over the boxes marked in `valid` `[B, K]`
/// (the others are neither kept nor suppress anything), with `sweeps` sweeps. Equal scores keep their input order
/// (a stable sort) and a box is suppressed when its IoU with a kept box is strictly greater than `iou_threshold`,
/// as `torchvision.ops.nms`, so a converged row keeps exactly what [`super::nms()`] keeps on the valid boxes.
pub fn nms_sweeps(boxes: &Tensor, scores: &Tensor, valid: &Tensor, iou_threshold: f64, sweeps: i64) -> SweptNms {
    let [batch, count] = scores.size()[..] else { panic!("nms_sweeps expects [B, K] scores, got {:?}", scores.size()) };
    let device = scores.device();
    let order = scores.masked_fill(&valid.logical_not(), f64::NEG_INFINITY).sort_stable(true, 1, true).1;
    let sorted_boxes = boxes.gather(1, &order.unsqueeze(2).expand([batch, count, 4], false), false);
    let sorted_valid = valid.gather(1, &order, false);
    let later = Tensor::ones([count, count], (Kind::Bool, device)).triu(1);
    let suppresses = box_iou(&sorted_boxes, &sorted_boxes).gt(iou_threshold).logical_and(&later);
    let kind = if device.is_cuda() { Kind::Half } else { Kind::Float };
    // Suppressor counts stay exact in half precision: 0 or at least 1, and any count up to 2048 is representable.
    let suppresses = suppresses.to_kind(kind);
    let sweep = |keep: &Tensor| {
        let suppressed = keep.to_kind(kind).unsqueeze(1).bmm(&suppresses).squeeze_dim(1).gt(0.0);
        sorted_valid.logical_and(&suppressed.logical_not())
    };
    let mut keep = sorted_valid.shallow_clone();
    for _ in 0..sweeps {
        keep = sweep(&keep);
    }
    let unconverged = sweep(&keep).ne_tensor(&keep).any_dim(1, false).sum(Kind::Int64);
    let keep = Tensor::zeros([batch, count], (Kind::Bool, device)).scatter(1, &order, &keep);
    SweptNms { keep, unconverged }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// `[n, 4]` boxes in clusters (many overlapping at the threshold) with scores that tie often.
    fn clustered(n: i64) -> (Tensor, Tensor) {
        let centres = (Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 8.0).floor() * 25.0;
        let sizes = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 30.0 + 20.0;
        let jitter = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 6.0;
        let boxes = Tensor::cat(&[&centres + &jitter - &sizes / 2.0, centres + jitter + sizes / 2.0], 1);
        (boxes, (Tensor::rand([n], (Kind::Float, Device::Cpu)) * 50.0).floor())
    }

    /// Enough sweeps reproduce greedy NMS (`ops::nms` on the valid boxes) exactly, row by row, and report
    /// convergence; too few report the rows that had not converged.
    #[test]
    fn sweeps_equal_greedy_nms_once_converged() {
        tch::manual_seed(5);
        let (rows, count) = (4, 400);
        let (boxes, scores): (Vec<Tensor>, Vec<Tensor>) = (0..rows).map(|_| clustered(count)).unzip();
        let (boxes, scores) = (Tensor::stack(&boxes, 0), Tensor::stack(&scores, 0));
        let valid = Tensor::rand([rows, count], (Kind::Float, Device::Cpu)).gt(0.1);
        for threshold in [0.3, 0.7] {
            let exact = nms_sweeps(&boxes, &scores, &valid, threshold, count);
            assert_eq!(exact.unconverged.int64_value(&[]), 0);
            for row in 0..rows {
                let valid_index = valid.get(row).nonzero().squeeze_dim(1);
                let kept = super::super::nms(
                    &boxes.get(row).index_select(0, &valid_index),
                    &scores.get(row).index_select(0, &valid_index),
                    threshold,
                );
                let expected = Tensor::zeros([count], (Kind::Bool, Device::Cpu)).index_fill(
                    0,
                    &valid_index.index_select(0, &kept),
                    1,
                );
                assert!(exact.keep.get(row).equal(&expected), "row {row} at IoU {threshold}");
            }
            // The sweeps needed here: the longest suppression chain plus one.
            let needed = (0..=count)
                .find(|&s| nms_sweeps(&boxes, &scores, &valid, threshold, s).keep.equal(&exact.keep))
                .unwrap();
            eprintln!("IoU {threshold}: {needed} sweeps for {count} clustered boxes per row");
            assert!(needed > 1, "the case has chains to resolve");
            let short = nms_sweeps(&boxes, &scores, &valid, threshold, needed - 1);
            assert!(short.unconverged.int64_value(&[]) > 0, "an unfinished row is reported");
        }
    }
}
