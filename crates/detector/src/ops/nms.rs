//! Non-maximum suppression with torchvision's semantics: candidates are visited by decreasing score (a stable
//! sort, so equal scores keep their input order), and a box is suppressed when its IoU with an already kept box is
//! strictly greater than the threshold. The sort runs on the tensor's device. On the CPU the greedy keep loop runs
//! over the boxes in score order, in their own precision (f32 or f64) so that IoU ties round as in torchvision's
//! CPU kernel. On CUDA, as torchvision's CUDA kernel does, the device computes which later box every box would
//! suppress (IoU above the threshold, as bits: one byte per 8 boxes), that bit matrix is copied to the host once,
//! and the sequential greedy scan ORs the rows of kept boxes: O(n^2) parallel work on the device and O(kept x n/8)
//! bytes on the host instead of O(n^2) IoUs on the host.

use tch::{Kind, Tensor};

/// Greedy suppression over boxes already sorted by decreasing score. Boxes are `[x1, y1, x2, y2]` rows in `coords`;
/// returns positions (in sorted order) of the kept boxes. `groups`, when given, restricts suppression to boxes
/// of the same group: each group is suppressed on its own (the same kept set as comparing group ids inside one
/// loop, in O(sum of squared group sizes) instead of O(total squared): 90 classes x 1000 boxes at inference).
fn greedy_keep<T>(coords: &[T], groups: Option<&[i64]>, iou_threshold: f64) -> Vec<usize>
where
    T: Copy + PartialOrd + std::ops::Sub<Output = T> + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
    T: std::ops::Add<Output = T> + Default + Into<f64>,
{
    let Some(groups) = groups else {
        return greedy_keep_one_group(coords, iou_threshold);
    };
    // Positions of each group in sorted order (a BTreeMap keeps the grouping deterministic).
    let mut members: std::collections::BTreeMap<i64, Vec<usize>> = std::collections::BTreeMap::new();
    for (position, &group) in groups.iter().enumerate() {
        members.entry(group).or_default().push(position);
    }
    let mut keep = Vec::new();
    for positions in members.values() {
        let group_coords: Vec<T> = positions.iter().flat_map(|&p| coords[4 * p..4 * p + 4].iter().copied()).collect();
        keep.extend(greedy_keep_one_group(&group_coords, iou_threshold).into_iter().map(|k| positions[k]));
    }
    keep.sort_unstable();
    keep
}

/// [`greedy_keep`] without groups.
fn greedy_keep_one_group<T>(coords: &[T], iou_threshold: f64) -> Vec<usize>
where
    T: Copy + PartialOrd + std::ops::Sub<Output = T> + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
    T: std::ops::Add<Output = T> + Default + Into<f64>,
{
    let max = |a: T, b: T| if b > a { b } else { a };
    let min = |a: T, b: T| if b < a { b } else { a };
    let count = coords.len() / 4;
    let areas: Vec<T> =
        (0..count).map(|i| (coords[4 * i + 2] - coords[4 * i]) * (coords[4 * i + 3] - coords[4 * i + 1])).collect();
    let zero = T::default();
    let mut suppressed = vec![false; count];
    let mut keep = Vec::new();
    for i in 0..count {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let (ix1, iy1, ix2, iy2) = (coords[4 * i], coords[4 * i + 1], coords[4 * i + 2], coords[4 * i + 3]);
        for j in i + 1..count {
            if suppressed[j] {
                continue;
            }
            let width = max(zero, min(ix2, coords[4 * j + 2]) - max(ix1, coords[4 * j]));
            let height = max(zero, min(iy2, coords[4 * j + 3]) - max(iy1, coords[4 * j + 1]));
            let intersection = width * height;
            // Same expression as torchvision's kernel, computed in T and compared in f64 like its `double`
            // threshold; 0/0 (two empty boxes) is NaN and never suppresses.
            let iou = intersection / (areas[i] + areas[j] - intersection);
            if iou.into() > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Runs the greedy loop on a host copy of `boxes` sorted by `scores` and returns kept input indices (i64, on the
/// boxes' device) by decreasing score.
fn nms_impl(boxes: &Tensor, scores: &Tensor, groups: Option<&Tensor>, iou_threshold: f64) -> Tensor {
    let device = boxes.device();
    if boxes.size()[0] == 0 {
        return Tensor::zeros([0], (Kind::Int64, device));
    }
    let order = scores.sort_stable(true, 0, true).1;
    if device.is_cuda() && groups.is_none() {
        let kept_positions = suppression_matrix_keep(&boxes.index_select(0, &order), iou_threshold);
        return order.index_select(0, &transfer::upload(&kept_positions, device));
    }
    let sorted_boxes = transfer::download(&boxes.index_select(0, &order)).contiguous();
    let sorted_groups = groups.map(|g| {
        transfer::download_vec::<i64>(&g.index_select(0, &order).to_kind(Kind::Int64))
            .expect("int64 host copy of the NMS groups")
    });
    let kept_positions = if sorted_boxes.kind() == Kind::Double {
        let coords = Vec::<f64>::try_from(sorted_boxes.flatten(0, -1)).expect("f64 host copy of the NMS boxes");
        greedy_keep(&coords, sorted_groups.as_deref(), iou_threshold)
    } else {
        let coords = Vec::<f32>::try_from(sorted_boxes.to_kind(Kind::Float).flatten(0, -1))
            .expect("f32 host copy of the NMS boxes");
        greedy_keep(&coords, sorted_groups.as_deref(), iou_threshold)
    };
    let kept_positions: Vec<i64> = kept_positions.into_iter().map(|p| p as i64).collect();
    let kept_positions = transfer::upload(&Tensor::from_slice(&kept_positions), order.device());
    order.index_select(0, &kept_positions)
}

/// Rows of the suppression matrix computed per device call (bounds the temporary IoU block to rows x N floats).
const SUPPRESSION_ROWS_PER_BLOCK: i64 = 2048;

/// Greedy NMS over `sorted` boxes (by decreasing score) through a bit matrix computed on their device: bit `j` of
/// row `i` is set when `j > i` and IoU(i, j) > `iou_threshold` (compared in the boxes' precision, as torchvision's
/// CUDA kernel). Returns kept positions (i64, on the CPU) in sorted order.
fn suppression_matrix_keep(sorted: &Tensor, iou_threshold: f64) -> Tensor {
    let count = sorted.size()[0];
    let device = sorted.device();
    let row_bytes = (count + 7) / 8;
    let padded = row_bytes * 8;
    let columns = Tensor::arange(padded, (Kind::Int64, device));
    let bit_values = transfer::upload(&Tensor::from_slice(&[1u8, 2, 4, 8, 16, 32, 64, 128]), device);
    let mut blocks = Vec::new();
    let mut start = 0;
    while start < count {
        let rows = SUPPRESSION_ROWS_PER_BLOCK.min(count - start);
        let iou = super::boxes::box_iou(&sorted.narrow(0, start, rows), sorted);
        let above = iou.gt(iou_threshold).constant_pad_nd([0, padded - count]);
        let row_index = Tensor::arange_start(start, start + rows, (Kind::Int64, device)).unsqueeze(1);
        let later = columns.unsqueeze(0).gt_tensor(&row_index);
        let bits = above.logical_and(&later).to_kind(Kind::Uint8).view([rows, row_bytes, 8]) * &bit_values;
        blocks.push(bits.sum_dim_intlist(2, false, Kind::Uint8));
        start += rows;
    }
    let bytes =
        transfer::download_vec::<u8>(&Tensor::cat(&blocks, 0)).expect("u8 host copy of the NMS suppression matrix");
    let row_bytes = row_bytes as usize;
    let mut suppressed = vec![0u8; row_bytes];
    let mut keep: Vec<i64> = Vec::new();
    for i in 0..count as usize {
        if suppressed[i / 8] & (1 << (i % 8)) != 0 {
            continue;
        }
        keep.push(i as i64);
        for (mask, row) in suppressed.iter_mut().zip(&bytes[i * row_bytes..(i + 1) * row_bytes]) {
            *mask |= row;
        }
    }
    Tensor::from_slice(&keep)
}

/// Non-maximum suppression of `boxes` `[N, 4]` (xyxy) with `scores` `[N]`: returns the kept indices (i64, on the
/// input's device) by decreasing score, exactly as `torchvision.ops.nms`. See the module docs for where the
/// host copy happens.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    nms_impl(boxes, scores, None, iou_threshold)
}

/// Largest `boxes.numel()` for which torchvision's `batched_nms` uses its coordinate-offset trick (CPU / CUDA).
/// (The offset trick also keeps CUDA inputs on the suppression-matrix path.)
const OFFSET_TRICK_MAX_NUMEL_CPU: i64 = 4000;
const OFFSET_TRICK_MAX_NUMEL_CUDA: i64 = 100_000;

/// Per-group NMS (boxes of different `groups` never suppress each other), exactly as
/// `torchvision.ops.batched_nms`: up to 4000 box coordinates on CPU (100000 on CUDA) it offsets each group's boxes
/// by `group * (max_coordinate + 1)` and runs one NMS (stable order for equal scores); for larger inputs it
/// compares group ids inside the greedy loop on the original coordinates (torchvision's per-class loop, same kept
/// set) and orders the kept boxes like torchvision, with libtorch's default sort by decreasing score, whose order
/// among equal scores is not guaranteed stable. Returns kept indices (i64) by decreasing score.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, groups: &Tensor, iou_threshold: f64) -> Tensor {
    if boxes.numel() == 0 {
        return Tensor::zeros([0], (Kind::Int64, boxes.device()));
    }
    let limit = if boxes.device().is_cuda() { OFFSET_TRICK_MAX_NUMEL_CUDA } else { OFFSET_TRICK_MAX_NUMEL_CPU };
    if boxes.numel() as i64 > limit {
        // torchvision's per-class path: the kept set, in index order, re-sorted by its (unstable) score sort.
        let kept = nms_impl(boxes, scores, Some(groups), iou_threshold).sort(0, false).0;
        let order = scores.index_select(0, &kept).sort(0, true).1;
        return kept.index_select(0, &order);
    }
    let max_coordinate = boxes.max();
    let offsets = groups.to_kind(boxes.kind()) * (max_coordinate + 1.0);
    let shifted = boxes + offsets.unsqueeze(1);
    nms_impl(&shifted, scores, None, iou_threshold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The CUDA suppression-matrix path keeps exactly what the greedy loop keeps (run here on CPU tensors).
    #[test]
    fn suppression_matrix_matches_the_greedy_loop() {
        tch::manual_seed(4);
        for (count, threshold) in [(1usize, 0.5), (7, 0.5), (300, 0.7), (2500, 0.5), (3000, 0.3)] {
            let n = count as i64;
            let centres = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 200.0;
            let sizes = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 60.0 + 1.0;
            let boxes = Tensor::cat(&[&centres - &sizes / 2.0, &centres + &sizes / 2.0], 1);
            // Some exact duplicates and ties in score.
            let boxes = Tensor::cat(&[boxes.shallow_clone(), boxes.narrow(0, 0, n.min(5))], 0);
            let scores = (Tensor::rand([boxes.size()[0]], (Kind::Float, Device::Cpu)) * 20.0).floor();
            let order = scores.sort_stable(true, 0, true).1;
            let sorted = boxes.index_select(0, &order);
            let coords = Vec::<f32>::try_from(sorted.flatten(0, -1)).unwrap();
            let expected: Vec<i64> = greedy_keep(&coords, None, threshold).into_iter().map(|p| p as i64).collect();
            let got = Vec::<i64>::try_from(suppression_matrix_keep(&sorted, threshold)).unwrap();
            assert_eq!(got, expected, "{count} boxes at IoU {threshold}");
        }
    }
}
