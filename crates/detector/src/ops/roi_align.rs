//! RoIAlign (torchvision's `roi_align`, both `aligned` modes, fixed or adaptive sampling) and detectron2's
//! multi-level `ROIPooler`.
//!
//! Construction: RoIAlign is linear in the input, so it is computed as one sparse matrix product. Every sample
//! point of every RoI follows torchvision's kernel exactly (same coordinate formula in the input's precision, the
//! same validity test, clamping and four bilinear taps), and contributes its four tap weights, divided by the
//! bin's sample count, to a sparse `[K * oh * ow, N * H * W]` matrix, which multiplies the input laid out as
//! `[N * H * W, C]`. libtorch's sparse-dense product has a backward pass for the dense side, which gives the input
//! gradient. All of it stays on the input's device; with the adaptive sampling ratio (`0`), three scalars (sample
//! counts, needed to size the sample lists) are copied to the host; a fixed ratio needs no host transfer. Memory is proportional to the
//! number of samples, not to samples times channels. (A `grid_sampler_2d` construction was measured 2-5x slower
//! than torchvision on CPU because every sample touches all channel planes; this one is on par.)

use tch::{Kind, Tensor};

/// RoI geometry in the input's precision, following torchvision's kernel step by step.
struct RoiGeometry {
    batch_index: Tensor,
    start_x: Tensor,
    start_y: Tensor,
    bin_w: Tensor,
    bin_h: Tensor,
}

impl RoiGeometry {
    fn new(rois: &Tensor, like: &Tensor, output_size: (i64, i64), spatial_scale: f64, aligned: bool) -> Self {
        let rois = rois.detach().to_device(like.device()).to_kind(like.kind());
        let offset = if aligned { 0.5 } else { 0.0 };
        let start_x = rois.select(1, 1) * spatial_scale - offset;
        let start_y = rois.select(1, 2) * spatial_scale - offset;
        let end_x = rois.select(1, 3) * spatial_scale - offset;
        let end_y = rois.select(1, 4) * spatial_scale - offset;
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
        }
    }
}

/// Per-axis sampling of every RoI along one image axis: for each of the RoI's `bins * grid` sample coordinates,
/// its two taps and their weights (bilinear weight x validity / grid), and its bin.
struct AxisSamples {
    /// `[S, 2]` i64 pixel index of the low and high tap.
    taps: Tensor,
    /// `[S, 2]` weights of the low and high tap, including `1 / grid` and the validity of the coordinate.
    weights: Tensor,
    /// `[S]` i64 bin index along this axis.
    bin: Tensor,
    /// `[K]` i64 index of each RoI's first sample.
    first: Tensor,
}

impl AxisSamples {
    /// Samples at `start + bin * bin_size + (i + 0.5) * bin_size / grid` (torchvision's formula, in the
    /// geometry's precision) for `bins` bins of `grid` samples each (`grid` i64 `[K]`, all equal to `fixed_grid`
    /// when given, which avoids copying the sample count to the host) on an axis of `size` pixels.
    fn new(start: &Tensor, bin_size: &Tensor, bins: i64, grid: &Tensor, size: i64, fixed_grid: Option<i64>) -> Self {
        let kind = start.kind();
        let device = start.device();
        let per_roi = grid * bins;
        let count = match fixed_grid {
            Some(ratio) => start.size()[0] * bins * ratio,
            None => per_roi.sum(Kind::Int64).int64_value(&[]),
        };
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
        // torchvision's bilinear_interpolate: empty outside [-1, size], clamp below at 0, `low = floor`, and at or
        // past the last pixel both taps are the last pixel.
        let valid = coordinate.ge(-1.0).logical_and(&coordinate.le(size as f64));
        let coordinate = coordinate.clamp_min(0.0);
        let low = coordinate.floor().to_kind(Kind::Int64);
        let at_edge = low.ge(size - 1);
        let low = low.clamp_max(size - 1);
        let low_value = low.to_kind(kind);
        let coordinate = coordinate.where_self(&at_edge.logical_not(), &low_value);
        let high = (&low + 1).clamp_max(size - 1);
        let fraction = coordinate - low_value;
        let scale = valid.to_kind(kind) / roi_grid.to_kind(kind);
        let weights = Tensor::stack(&[(fraction.neg() + 1.0) * &scale, fraction * scale], 1);
        AxisSamples { taps: Tensor::stack(&[low, high], 1), weights, bin, first }
    }
}

/// Sparse `[K * oh * ow, N * H * W]` RoIAlign matrix for RoIs with `grid_h x grid_w` samples per bin (i64 `[K]`):
/// torchvision's samples and bilinear weights divided by the sample count. Sampling is separable, so the tap
/// positions and weights are computed per axis and combined per 2-D sample by broadcasting. `fixed_grid` is the
/// sampling ratio when it is the same for all RoIs. `None` when there is no sample at all.
fn sampling_matrix(
    geometry: &RoiGeometry,
    input_shape: (i64, i64, i64),
    output_size: (i64, i64),
    grid: (&Tensor, &Tensor),
    fixed_grid: Option<i64>,
) -> Option<Tensor> {
    let (batch, height, width) = input_shape;
    let (oh, ow) = output_size;
    let (grid_h, grid_w) = grid;
    let num_rois = geometry.start_x.size()[0];
    let device = geometry.start_x.device();
    let rows_axis = AxisSamples::new(&geometry.start_y, &geometry.bin_h, oh, grid_h, height, fixed_grid);
    let columns_axis = AxisSamples::new(&geometry.start_x, &geometry.bin_w, ow, grid_w, width, fixed_grid);
    // 2-D samples of a RoI: every row sample with every column sample, row-sample major.
    let row_samples = grid_h * oh;
    let column_samples = grid_w * ow;
    let per_roi = &row_samples * &column_samples;
    let total = match fixed_grid {
        Some(ratio) => num_rois * oh * ow * ratio * ratio,
        None => per_roi.sum(Kind::Int64).int64_value(&[]),
    };
    if total == 0 {
        return None;
    }
    let roi = Tensor::repeat_interleave(&per_roi, total);
    let local = Tensor::arange(total, (Kind::Int64, device))
        - (per_roi.cumsum(0, Kind::Int64) - &per_roi).index_select(0, &roi);
    let roi_columns = column_samples.index_select(0, &roi);
    let row_local = local.floor_divide(&roi_columns);
    let column_local = local - &row_local * &roi_columns;
    let row_sample = rows_axis.first.index_select(0, &roi) + row_local;
    let column_sample = columns_axis.first.index_select(0, &roi) + column_local;
    // RoIs naming an image outside the batch contribute nothing.
    let image = geometry.batch_index.to_kind(Kind::Int64);
    let image_valid = image.ge(0).logical_and(&image.lt(batch)).to_kind(geometry.start_x.kind());
    let image_base = image.clamp(0, (batch - 1).max(0)) * (height * width);
    let row_base =
        (image_base.index_select(0, &roi)).unsqueeze(1) + rows_axis.taps.index_select(0, &row_sample) * width;
    let columns = row_base.unsqueeze(2) + columns_axis.taps.index_select(0, &column_sample).unsqueeze(1);
    let row_weights = rows_axis.weights.index_select(0, &row_sample) * image_valid.index_select(0, &roi).unsqueeze(1);
    let values = row_weights.unsqueeze(2) * columns_axis.weights.index_select(0, &column_sample).unsqueeze(1);
    let output_row = roi * (oh * ow)
        + rows_axis.bin.index_select(0, &row_sample) * ow
        + columns_axis.bin.index_select(0, &column_sample);
    let rows = output_row.unsqueeze(1).expand([total, 4], false).reshape([-1]);
    let indices = Tensor::stack(&[rows, columns.reshape([-1])], 0);
    Some(Tensor::sparse_coo_tensor_indices_size(
        &indices,
        &values.reshape([-1]),
        [num_rois * oh * ow, batch * height * width],
        (geometry.start_x.kind(), device),
        false,
    ))
}

/// RoIAlign with torchvision's semantics: `input` `[N, C, H, W]`, `rois` `[K, 5]` rows of
/// `(batch_index, x1, y1, x2, y2)` in image pixels (multiplied by `spatial_scale` to reach the map), output
/// `[K, C, oh, ow]`. `aligned = true` shifts by half a pixel (detectron2's ROIAlignV2); `sampling_ratio = 0`
/// uses `ceil(roi_size / output_size)` samples per bin. Differentiable with respect to `input` (not `rois`).
pub fn roi_align(
    input: &Tensor,
    rois: &Tensor,
    output_size: (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let [batch, channels, height, width] = input.size()[..] else {
        panic!("roi_align expects an input of shape [N, C, H, W], got {:?}", input.size())
    };
    let (oh, ow) = output_size;
    let num_rois = rois.size()[0];
    // Channels last: each matrix row gathers whole channel vectors.
    let features = input.permute([0, 2, 3, 1]).reshape([batch * height * width, channels]);
    if num_rois == 0 || features.size()[0] == 0 {
        // An empty slice of the input keeps the autograd graph connected.
        let empty = features.flatten(0, -1).narrow(0, 0, 0).reshape([0, channels, oh, ow]);
        return if num_rois == 0 {
            empty
        } else {
            Tensor::zeros([num_rois, channels, oh, ow], (input.kind(), input.device()))
        };
    }
    let geometry = RoiGeometry::new(rois, input, output_size, spatial_scale, aligned);
    let fixed_grid = (sampling_ratio > 0).then_some(sampling_ratio);
    let (grid_h, grid_w) = if sampling_ratio > 0 {
        let grid = Tensor::full([num_rois], sampling_ratio, (Kind::Int64, input.device()));
        (grid.shallow_clone(), grid)
    } else {
        // Exactly torchvision's ceil(roi_size / pooled_size): the bin sizes are that quotient. Empty RoIs
        // (aligned = true) get no samples and stay zero.
        (
            geometry.bin_h.ceil().to_kind(Kind::Int64).clamp_min(0),
            geometry.bin_w.ceil().to_kind(Kind::Int64).clamp_min(0),
        )
    };
    let Some(matrix) = sampling_matrix(&geometry, (batch, height, width), output_size, (&grid_h, &grid_w), fixed_grid)
    else {
        return Tensor::zeros([num_rois, channels, oh, ow], (input.kind(), input.device()));
    };
    let pooled = Tensor::internal_sparse_mm(&matrix, &features);
    pooled.reshape([num_rois, oh, ow, channels]).permute([0, 3, 1, 2]).contiguous()
}

/// How [`RoiPooler`] maps a box to a pyramid level: `floor(canonical_level + log2(sqrt(area) / canonical_size))`,
/// differing only in where the epsilon that guards exact powers of two goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelMapping {
    /// detectron2 `assign_boxes_to_levels`: `log2(size / canonical + f64::EPSILON)`.
    Detectron2,
    /// torchvision `LevelMapper`: `log2(size / canonical) + 1e-6`.
    Torchvision,
}

/// detectron2's `ROIPooler` with RoIAlign: pools each box from the pyramid level chosen by its size (a box of
/// `canonical_box_size` pixels goes to `canonical_level`, levels clamped to the available maps).
#[derive(Debug, Clone, PartialEq)]
pub struct RoiPooler {
    output_size: (i64, i64),
    scales: Vec<f64>,
    sampling_ratio: i64,
    aligned: bool,
    canonical_box_size: f64,
    canonical_level: i64,
    min_level: i64,
    max_level: i64,
    level_mapping: LevelMapping,
}

impl RoiPooler {
    /// A pooler over feature maps with the given `scales` (1 / stride, finest first, e.g. `[1/4, 1/8, 1/16,
    /// 1/32]`); the finest and coarsest levels are `round(-log2(scale))`. Uses detectron2's level mapping.
    pub fn new(
        output_size: (i64, i64),
        scales: Vec<f64>,
        sampling_ratio: i64,
        aligned: bool,
        canonical_box_size: f64,
        canonical_level: i64,
    ) -> Self {
        let level_of = |scale: f64| (-scale.log2()).round() as i64;
        let min_level = scales.first().map_or(0, |&s| level_of(s));
        let max_level = scales.last().map_or(0, |&s| level_of(s));
        RoiPooler {
            output_size,
            scales,
            sampling_ratio,
            aligned,
            canonical_box_size,
            canonical_level,
            min_level,
            max_level,
            level_mapping: LevelMapping::Detectron2,
        }
    }

    /// The same pooler with another level mapping (torchvision's `MultiScaleRoIAlign` for the parity preset).
    pub fn with_level_mapping(mut self, level_mapping: LevelMapping) -> Self {
        self.level_mapping = level_mapping;
        self
    }

    /// Output size `(oh, ow)` of every pooled box.
    pub fn output_size(&self) -> (i64, i64) {
        self.output_size
    }

    /// Level index (0 = finest map) of every box `[K, 4]`, as i64 on the boxes' device.
    pub fn assign_levels(&self, boxes: &Tensor) -> Tensor {
        let sizes = super::boxes::box_area(boxes).sqrt();
        let levels = match self.level_mapping {
            LevelMapping::Detectron2 => {
                (sizes / self.canonical_box_size + f64::EPSILON).log2() + self.canonical_level as f64
            }
            LevelMapping::Torchvision => (sizes / self.canonical_box_size).log2() + self.canonical_level as f64 + 1e-6,
        };
        let levels = levels.floor().clamp(self.min_level as f64, self.max_level as f64);
        levels.to_kind(Kind::Int64) - self.min_level
    }

    /// Pools `boxes_per_image[i]` (`[K_i, 4]` xyxy image pixels) from image `i` of every map in `features`
    /// (`[N, C, H_l, W_l]`, one per scale). Returns `[sum K_i, C, oh, ow]` in the order of the concatenated boxes.
    /// With several levels, finding each level's boxes costs one device-to-host sync per level.
    pub fn forward(&self, features: &[Tensor], boxes_per_image: &[Tensor]) -> Tensor {
        let first = &features[0];
        let device = first.device();
        let rois: Vec<Tensor> = boxes_per_image
            .iter()
            .enumerate()
            .map(|(image, boxes)| {
                let boxes = boxes.to_device(device);
                let index = Tensor::full([boxes.size()[0], 1], image as f64, (boxes.kind(), device));
                Tensor::cat(&[index, boxes], 1)
            })
            .collect();
        let rois = Tensor::cat(&rois, 0);
        let (oh, ow) = self.output_size;
        if features.len() == 1 {
            return roi_align(first, &rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned);
        }
        let levels = self.assign_levels(&rois.narrow(1, 1, 4));
        let num_rois = rois.size()[0];
        let mut output = Tensor::zeros([num_rois, first.size()[1], oh, ow], (first.kind(), device));
        for (level, (feature, &scale)) in features.iter().zip(&self.scales).enumerate() {
            let index = levels.eq(level as i64).nonzero().squeeze_dim(1);
            if index.size()[0] == 0 {
                continue;
            }
            let pooled = roi_align(
                feature,
                &rois.index_select(0, &index),
                self.output_size,
                scale,
                self.sampling_ratio,
                self.aligned,
            );
            let _ = output.index_copy_(0, &index, &pooled);
        }
        output
    }
}
