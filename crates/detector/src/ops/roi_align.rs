//! RoIAlign (torchvision's `roi_align`, both `aligned` modes, fixed or adaptive sampling) over one map or a stacked
//! pyramid ([`PyramidRows`]; detectron2's multi-level pooler is [`super::RoiPooler`]).
//!
//! Construction: RoIAlign is linear in the input, so every output value is a weighted sum of input pixels. Every
//! sample point of every RoI follows torchvision's kernel exactly (same coordinate formula, the same validity test,
//! clamping and four bilinear taps) and contributes its four taps, with their weights divided by the bin's sample
//! count, to the bag of its output bin: the taps are built bin-major (RoI, bin, sample), so each bag is contiguous
//! and no sort is needed. `pool_rows` (src/ops/pool_rows.rs: an `embedding_bag` in sum mode, tap weights as
//! per-sample weights) then reduces the rows of the input laid out channels-last as `[N * H * W, C]`; on CUDA its
//! backward is the transposed reduction. It is dense, runs in every floating kind, and its memory, forward and
//! backward, is the output, the input gradient and lists as long as the taps, never taps times channels. Half and
//! bfloat16 inputs are computed in float32 and the result cast back, like torchvision's autocast rule. Everything
//! stays on the input's device; with the adaptive sampling ratio (`0`) the three sample counts that size the tap
//! lists are copied to the host in one transfer (one sync); a fixed ratio needs none.
//!
//! Measured with `embedding_bag`'s own backward, before the transposed one on CUDA (features `[2, 256, 200, 336]`, 1024
//! RoIs of 16-112 image pixels at scale 1/4, 7x7, aligned, forward / backward, mean of 3 after a warm-up), in the
//! same runs as the previous sparse COO matrix product (`_sparse_mm`, which has no fp16 CUDA kernel): 2 CPU
//! threads (shared machine, two runs), ratio 0: 541-769 / 814-819 ms vs 901-916 / 792-796 ms; ratio 2: 303-711 /
//! 387-798 ms vs 606-832 / 644-706 ms. H200, f32, ratio 0: 3.9 / 2.0 ms vs 4.8 / 2.7 ms; ratio 2: 2.9 / 1.6 ms vs
//! 3.8 / 2.3 ms (torchvision's kernel: 0.7 / 5.7-6.5 ms and 0.44 / 1.45 ms); fp16: 3.4-5.0 / 2.0-2.3 ms at ratio
//! 0. `embedding_bag` itself takes about 0.7 / 1.6 ms of that on the H200; the rest is building the taps.
//! Gathering the taps with `index_select` and summing them with `index_add` was 1.5-4x slower on both and
//! materialises taps x channels. (A `grid_sampler_2d` construction was 2-5x slower than torchvision on CPU: every
//! sample touches all planes.)

use tch::{Kind, Tensor};

use super::pool_rows::pool_rows;

/// Pyramid maps prepared for RoIAlign: every level's pixels as rows of one channels-last matrix (written with one
/// copy per level), and per level its scale, height, width and first row there (tiny device tensors indexed by
/// each RoI's level). Build it once per forward pass and pool the box and mask RoIs from it
/// ([`super::RoiPooler::pool`]): the copy is then paid once, not once per head.
pub struct PyramidRows {
    /// `[sum_l N * H_l * W_l, C]` in the computing precision.
    features: Tensor,
    /// `[L]` spatial scale per level, in the computing precision.
    scale: Tensor,
    /// `[L]` i64 map height per level.
    height: Tensor,
    /// `[L]` i64 map width per level.
    width: Tensor,
    /// `[L]` i64 row of `features` where each level starts.
    base: Tensor,
    /// Images per map.
    batch: i64,
    /// Kind of the original maps (the pooled output's).
    kind: Kind,
}

impl PyramidRows {
    /// The device of the maps.
    pub fn device(&self) -> tch::Device {
        self.features.device()
    }

    /// Stacks `maps` (`[N, C, H_l, W_l]`, the same N and C) with their spatial `scales`. Half and bfloat16 maps are
    /// stored in float32 (RoIAlign computes in float32 for them, as torchvision's autocast rule).
    pub fn new(maps: &[&Tensor], scales: &[f64]) -> PyramidRows {
        assert_eq!(maps.len(), scales.len(), "one scale per pyramid map");
        let first = maps[0];
        let device = first.device();
        let [batch, channels, ..] = first.size()[..] else {
            panic!("roi_align expects maps of shape [N, C, H, W], got {:?}", first.size())
        };
        let compute_kind = super::widened_kind(first.kind());
        let (mut heights, mut widths, mut bases) = (Vec::new(), Vec::new(), Vec::new());
        let mut total = 0;
        for map in maps {
            let [n, c, h, w] = map.size()[..] else { panic!("roi_align expects maps of shape [N, C, H, W]") };
            assert!(n == batch && c == channels, "pyramid maps differ in batch or channels: {:?}", map.size());
            heights.push(h);
            widths.push(w);
            bases.push(total);
            total += n * h * w;
        }
        let features = Tensor::empty([total, channels], (compute_kind, device));
        for ((map, &h), (&w, &base)) in maps.iter().zip(&heights).zip(widths.iter().zip(&bases)) {
            let mut slot = features.narrow(0, base, batch * h * w).view([batch, h, w, channels]);
            slot.copy_(&map.permute([0, 2, 3, 1]));
        }
        // One host-to-device copy for all the integer constants.
        let constants = transfer::upload(&Tensor::from_slice(&[heights, widths, bases].concat()), device).view([3, -1]);
        PyramidRows {
            features,
            scale: transfer::upload(&Tensor::from_slice(scales), device).to_kind(compute_kind),
            height: constants.get(0),
            width: constants.get(1),
            base: constants.get(2),
            batch,
            kind: first.kind(),
        }
    }
}

/// RoI geometry in the computing precision (the input's, float32 for half and bfloat16), following torchvision's
/// kernel step by step, with the map size and first row of each RoI's level.
struct RoiGeometry {
    batch_index: Tensor,
    start_x: Tensor,
    start_y: Tensor,
    bin_w: Tensor,
    bin_h: Tensor,
    /// `[K]` i64 height and width of the RoI's map.
    height: Tensor,
    width: Tensor,
    /// `[K]` i64 first row of the RoI's map in the stacked features.
    base: Tensor,
}

impl RoiGeometry {
    fn new(rois: &Tensor, level: &Tensor, levels: &PyramidRows, output_size: (i64, i64), aligned: bool) -> Self {
        let rois = transfer::to_device(&rois.detach(), levels.features.device()).to_kind(levels.features.kind());
        let scale = levels.scale.index_select(0, level);
        let offset = if aligned { 0.5 } else { 0.0 };
        let start_x = rois.select(1, 1) * &scale - offset;
        let start_y = rois.select(1, 2) * &scale - offset;
        let end_x = rois.select(1, 3) * &scale - offset;
        let end_y = rois.select(1, 4) * &scale - offset;
        let mut roi_w = end_x - &start_x;
        let mut roi_h = end_y - &start_y;
        if !aligned {
            // Legacy (aligned=False) RoIAlign forces malformed RoIs to be at least 1x1.
            roi_w = roi_w.clamp_min(1.0);
            roi_h = roi_h.clamp_min(1.0);
        }
        RoiGeometry {
            batch_index: rois.select(1, 0),
            start_x,
            start_y,
            bin_w: roi_w / output_size.1 as f64,
            bin_h: roi_h / output_size.0 as f64,
            height: levels.height.index_select(0, level),
            width: levels.width.index_select(0, level),
            base: levels.base.index_select(0, level),
        }
    }
}

/// Per-axis sampling of every RoI along one image axis: for each of the RoI's `bins * grid` sample coordinates
/// (bin-major), its two taps and their weights (bilinear weight x validity / grid).
struct AxisSamples {
    /// `[S, 2]` i64 pixel index of the low and high tap.
    taps: Tensor,
    /// `[S, 2]` weights of the low and high tap, including `1 / grid` and the validity of the coordinate.
    weights: Tensor,
    /// `[K]` i64 index of each RoI's first sample.
    first: Tensor,
}

impl AxisSamples {
    /// `count` samples at `start + bin * bin_size + (i + 0.5) * bin_size / grid` (torchvision's formula, in the
    /// geometry's precision) for `bins` bins of `grid` samples each (`grid` i64 `[K]`, `count = bins * sum(grid)`)
    /// on an axis of `size` pixels (i64 `[K]`: the RoI's map).
    fn new(start: &Tensor, bin_size: &Tensor, bins: i64, grid: &Tensor, size: &Tensor, count: i64) -> Self {
        let kind = start.kind();
        let device = start.device();
        let per_roi = grid * bins;
        let roi = Tensor::repeat_interleave(&per_roi, count);
        let first = per_roi.cumsum(0, Kind::Int64) - &per_roi;
        let local = Tensor::arange(count, (Kind::Int64, device)) - first.index_select(0, &roi);
        let roi_grid = grid.index_select(0, &roi);
        let bin = local.floor_divide(&roi_grid);
        let in_bin = local - &bin * &roi_grid;
        let roi_bin_size = bin_size.index_select(0, &roi);
        let coordinate = start.index_select(0, &roi)
            + bin.to_kind(kind) * &roi_bin_size
            + (in_bin.to_kind(kind) + 0.5) * &roi_bin_size / roi_grid.to_kind(kind);
        // torchvision: samples beyond [-1, size] contribute nothing; the rest are clamped into the map.
        let last = size.index_select(0, &roi) - 1;
        let valid = coordinate.ge(-1.0).logical_and(&coordinate.le_tensor(&(&last + 1).to_kind(kind)));
        let coordinate = coordinate.clamp_min(0.0);
        let low = coordinate.floor().to_kind(Kind::Int64);
        let at_edge = low.ge_tensor(&last);
        let low = low.minimum(&last);
        let low_value = low.to_kind(kind);
        let coordinate = coordinate.where_self(&at_edge.logical_not(), &low_value);
        let high = (&low + 1).minimum(&last);
        let fraction = coordinate - low_value;
        let scale = valid.to_kind(kind) / roi_grid.to_kind(kind);
        let weights = Tensor::stack(&[(fraction.neg() + 1.0) * &scale, fraction * scale], 1);
        AxisSamples { taps: Tensor::stack(&[low, high], 1), weights, first }
    }
}

/// Every bilinear tap of every output bin, grouped by output row `k * oh * ow + bin_y * ow + bin_x` (bin-major,
/// so each output row's taps are contiguous): `input_row[e]` (i64, row of the stacked channels-last maps) gets
/// `weight[e]` (torchvision's bilinear weight divided by the bin's sample count), and output row `r` sums the
/// entries `offsets[r]..offsets[r + 1]`.
struct BinTaps {
    /// `[E]` i64 row of the stacked channels-last maps.
    input_row: Tensor,
    /// `[E]` weight in the geometry's precision.
    weight: Tensor,
    /// `[K * oh * ow + 1]` i64 first entry of every output row, then `E`.
    offsets: Tensor,
}

impl BinTaps {
    /// Taps for RoIs with `grid_h x grid_w` samples per bin (i64 `[K]`). Sampling is separable, so the tap
    /// positions and weights are computed per axis and combined per 2-D sample. `fixed_grid` is the sampling ratio
    /// when it is the same for all RoIs: then every size is known on the host; otherwise the sample counts are
    /// read back from the device in one copy. `None` when there is no sample at all.
    fn new(
        geometry: &RoiGeometry,
        batch: i64,
        output_size: (i64, i64),
        grid: (&Tensor, &Tensor),
        fixed_grid: Option<i64>,
    ) -> Option<Self> {
        let (oh, ow) = output_size;
        let (grid_h, grid_w) = grid;
        let num_rois = geometry.start_x.size()[0];
        let device = geometry.start_x.device();
        let per_bin = grid_h * grid_w;
        let per_roi = &per_bin * (oh * ow);
        let (row_count, column_count, total) = match fixed_grid {
            Some(ratio) => (num_rois * oh * ratio, num_rois * ow * ratio, num_rois * oh * ow * ratio * ratio),
            None => {
                let counts = Tensor::stack(
                    &[grid_h.sum(Kind::Int64) * oh, grid_w.sum(Kind::Int64) * ow, per_roi.sum(Kind::Int64)],
                    0,
                );
                let counts = transfer::download_vec::<i64>(&counts).expect("i64 sample counts");
                (counts[0], counts[1], counts[2])
            }
        };
        if total == 0 {
            return None;
        }
        let rows_axis = AxisSamples::new(&geometry.start_y, &geometry.bin_h, oh, grid_h, &geometry.height, row_count);
        let columns_axis =
            AxisSamples::new(&geometry.start_x, &geometry.bin_w, ow, grid_w, &geometry.width, column_count);
        let first = per_roi.cumsum(0, Kind::Int64) - &per_roi;
        let roi = Tensor::repeat_interleave(&per_roi, total);
        let local = Tensor::arange(total, (Kind::Int64, device)) - first.index_select(0, &roi);
        let roi_per_bin = per_bin.index_select(0, &roi);
        let bin = local.floor_divide(&roi_per_bin);
        let in_bin = local - &bin * &roi_per_bin;
        let roi_grid_h = grid_h.index_select(0, &roi);
        let roi_grid_w = grid_w.index_select(0, &roi);
        let sample_y = in_bin.floor_divide(&roi_grid_w);
        let sample_x = in_bin - &sample_y * &roi_grid_w;
        let bin_y = bin.floor_divide_scalar(ow);
        let bin_x = bin - &bin_y * ow;
        let row_sample = rows_axis.first.index_select(0, &roi) + bin_y * roi_grid_h + sample_y;
        let column_sample = columns_axis.first.index_select(0, &roi) + bin_x * roi_grid_w + sample_x;
        // RoIs naming an image outside the batch contribute nothing.
        let image = geometry.batch_index.to_kind(Kind::Int64);
        let image_valid = image.ge(0).logical_and(&image.lt(batch)).to_kind(geometry.start_x.kind());
        let image_base = &geometry.base + image.clamp(0, (batch - 1).max(0)) * (&geometry.height * &geometry.width);
        let roi_width = geometry.width.index_select(0, &roi).unsqueeze(1);
        let row_base =
            image_base.index_select(0, &roi).unsqueeze(1) + rows_axis.taps.index_select(0, &row_sample) * roi_width;
        let input_row = row_base.unsqueeze(2) + columns_axis.taps.index_select(0, &column_sample).unsqueeze(1);
        let row_weights =
            rows_axis.weights.index_select(0, &row_sample) * image_valid.index_select(0, &roi).unsqueeze(1);
        let weight = row_weights.unsqueeze(2) * columns_axis.weights.index_select(0, &column_sample).unsqueeze(1);
        // The first entry of every output row (bag): its RoI's first sample plus the bins before it, 4 taps each.
        let bag = Tensor::arange(num_rois * oh * ow, (Kind::Int64, device));
        let bag_roi = bag.floor_divide_scalar(oh * ow);
        let bag_first =
            first.index_select(0, &bag_roi) + (bag - &bag_roi * (oh * ow)) * per_bin.index_select(0, &bag_roi);
        let offsets = Tensor::cat(&[bag_first, per_roi.sum(Kind::Int64).reshape([1])], 0) * 4;
        Some(BinTaps { input_row: input_row.reshape([-1]), weight: weight.reshape([-1]), offsets })
    }
}

/// RoIAlign with torchvision's semantics: `input` `[N, C, H, W]`, `rois` `[K, 5]` rows of
/// `(batch_index, x1, y1, x2, y2)` in image pixels (multiplied by `spatial_scale` to reach the map), output
/// `[K, C, oh, ow]`. `aligned = true` shifts by half a pixel (detectron2's ROIAlignV2); `sampling_ratio = 0`
/// uses `ceil(roi_size / output_size)` samples per bin. Differentiable with respect to `input` (not `rois`).
/// Half and bfloat16 inputs are computed in float32 and the result cast back (torchvision's autocast rule).
pub fn roi_align(
    input: &Tensor,
    rois: &Tensor,
    output_size: (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let level = Tensor::zeros([rois.size()[0]], (Kind::Int64, input.device()));
    let levels = PyramidRows::new(&[input], &[spatial_scale]);
    roi_align_levels(&levels, rois, &level, output_size, sampling_ratio, aligned)
}

/// [`roi_align`] over the stacked maps of `levels`: RoI `k` is pooled from level `level[k]` at its scale. One tap
/// construction and one reduction for every level, so a pyramid costs the operators of a single RoIAlign, with no
/// per-level host sync.
pub(super) fn roi_align_levels(
    levels: &PyramidRows,
    rois: &Tensor,
    level: &Tensor,
    output_size: (i64, i64),
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let channels = levels.features.size()[1];
    let (kind, device) = (levels.kind, levels.features.device());
    let (oh, ow) = output_size;
    let num_rois = rois.size()[0];
    if num_rois == 0 || levels.features.size()[0] == 0 {
        // An empty slice of the input keeps the autograd graph connected.
        let empty = levels.features.narrow(0, 0, 0).reshape([0, channels, oh, ow]).to_kind(kind);
        return if num_rois == 0 { empty } else { Tensor::zeros([num_rois, channels, oh, ow], (kind, device)) };
    }
    let level = transfer::to_device(level, device).to_kind(Kind::Int64);
    let geometry = RoiGeometry::new(rois, &level, levels, output_size, aligned);
    let fixed_grid = (sampling_ratio > 0).then_some(sampling_ratio);
    let (grid_h, grid_w) = if sampling_ratio > 0 {
        let grid = Tensor::full([num_rois], sampling_ratio, (Kind::Int64, device));
        (grid.shallow_clone(), grid)
    } else {
        // Exactly torchvision's ceil(roi_size / pooled_size): the bin sizes are that quotient. Empty RoIs
        // (aligned = true) get no samples and stay zero.
        (
            geometry.bin_h.ceil().to_kind(Kind::Int64).clamp_min(0),
            geometry.bin_w.ceil().to_kind(Kind::Int64).clamp_min(0),
        )
    };
    let Some(taps) = BinTaps::new(&geometry, levels.batch, output_size, (&grid_h, &grid_w), fixed_grid) else {
        return Tensor::zeros([num_rois, channels, oh, ow], (kind, device));
    };
    let pooled = pool_rows(&levels.features, &taps.input_row, &taps.weight, &taps.offsets);
    pooled.reshape([num_rois, oh, ow, channels]).permute([0, 3, 1, 2]).to_kind(kind).contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Half and bfloat16 inputs give the float32 result rounded to their kind, and a gradient of their kind.
    #[test]
    fn low_precision_inputs_are_computed_in_float() {
        tch::manual_seed(1);
        let boxes = Tensor::rand([20, 4], (Kind::Float, Device::Cpu)) * 120.0;
        let rois = Tensor::cat(
            &[
                Tensor::arange(20, (Kind::Float, Device::Cpu)).remainder(2.0).unsqueeze(1),
                boxes.narrow(1, 0, 2).minimum(&boxes.narrow(1, 2, 2)),
                boxes.narrow(1, 0, 2).maximum(&boxes.narrow(1, 2, 2)),
            ],
            1,
        );
        let input = Tensor::randn([2, 4, 24, 32], (Kind::Float, Device::Cpu));
        for kind in [Kind::Half, Kind::BFloat16] {
            let low = input.to_kind(kind).set_requires_grad(true);
            let expected = roi_align(&low.detach().to_kind(Kind::Float), &rois, (7, 7), 0.25, 0, true);
            let output = roi_align(&low, &rois, (7, 7), 0.25, 0, true);
            assert_eq!(output.kind(), kind);
            assert!(expected.abs().max().double_value(&[]) > 0.1, "trivial output");
            let difference = (output.to_kind(Kind::Float) - expected.to_kind(kind).to_kind(Kind::Float)).abs();
            assert_eq!(difference.max().double_value(&[]), 0.0, "{kind:?}: not the rounded float32 result");
            output.sum(Kind::Float).backward();
            assert_eq!(low.grad().kind(), kind);
        }
    }
}
