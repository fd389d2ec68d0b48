//! RoIAlign (torchvision's `roi_align`, both `aligned` modes, fixed or adaptive sampling) built on libtorch's
//! `grid_sampler_2d`, which gives the backward pass for free; and detectron2's multi-level `ROIPooler`.
//!
//! Construction: the images of the batch are stacked vertically into one tall map, each image padded by one
//! replicated pixel on every side so that bilinear taps never mix two images and rounding at the borders stays
//! exact. Every sample point of every RoI becomes one grid point: coordinates follow torchvision's kernel (same
//! formula, computed in the input's precision), points outside `[-1, H] x [-1, W]` are sent far outside the map
//! (zero padding makes them contribute 0), the rest are clamped to the image as torchvision does, and the samples
//! of each bin are averaged. The grid itself is normalised in f64. A fixed sampling ratio uses one dense grid and
//! `avg_pool2d`, with no device-to-host transfer; the adaptive ratio (`0`, `ceil(roi_size / output_size)` samples
//! per bin and RoI) uses one flat list of samples summed per bin with `index_add`, after copying one scalar (the
//! total sample count) to the host.

use tch::{Kind, Tensor};

/// Bilinear interpolation (`0`) and zero padding (`0`) in libtorch's `grid_sampler_2d` enumerations.
const BILINEAR: i64 = 0;
const ZERO_PADDING: i64 = 0;
/// Normalised coordinate of samples that torchvision treats as empty: far enough outside the (padded) map that
/// every bilinear tap reads the zero padding.
const OUTSIDE: f64 = -3.0;

/// One image batch prepared for sampling: `[1, C, N * (H + 2), W + 2]`.
struct StackedInput {
    map: Tensor,
    height: i64,
    width: i64,
    channels: i64,
}

impl StackedInput {
    fn new(input: &Tensor) -> Self {
        let [batch, channels, height, width] = input.size()[..] else {
            panic!("roi_align expects an input of shape [N, C, H, W], got {:?}", input.size())
        };
        let padded = input.pad([1, 1, 1, 1], "replicate", None);
        let map = padded.permute([1, 0, 2, 3]).reshape([1, channels, batch * (height + 2), width + 2]);
        StackedInput { map, height, width, channels }
    }

    /// Grid of normalised `(x, y)` points for sample coordinates `x`, `y` (same shape) of RoIs in images
    /// `batch_index` (broadcast to that shape): torchvision's validity test and clamping, then the shift into the
    /// stacked, padded map.
    fn grid(&self, x: &Tensor, y: &Tensor, batch_index: &Tensor) -> Tensor {
        let (height, width) = (self.height, self.width);
        let valid =
            y.ge(-1.0).logical_and(&y.le(height as f64)).logical_and(&x.ge(-1.0)).logical_and(&x.le(width as f64));
        let row = y.clamp(0.0, (height - 1) as f64).to_kind(Kind::Double)
            + batch_index.to_kind(Kind::Double) * (height + 2) as f64
            + 1.0;
        let column = x.clamp(0.0, (width - 1) as f64).to_kind(Kind::Double) + 1.0;
        let size = self.map.size();
        let norm_y = (row * (2.0 / (size[2] - 1) as f64) - 1.0).where_scalarother(&valid, OUTSIDE);
        let norm_x = (column * (2.0 / (size[3] - 1) as f64) - 1.0).where_scalarother(&valid, OUTSIDE);
        Tensor::stack(&[norm_x, norm_y], -1).to_kind(self.map.kind())
    }
}

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

/// Sample coordinates `[K, bins * grid]` along one axis: `start + bin * size + (i + 0.5) * size / grid`.
fn sample_positions(start: &Tensor, bin_size: &Tensor, bins: i64, grid: i64) -> Tensor {
    let options = (start.kind(), start.device());
    let bin_index = Tensor::arange(bins, options).repeat_interleave_self_int(grid, 0, None);
    let in_bin = (Tensor::arange(grid, options) + 0.5).repeat([bins]);
    let bin_size = bin_size.unsqueeze(1);
    start.unsqueeze(1) + bin_index.unsqueeze(0) * &bin_size + in_bin.unsqueeze(0) * &bin_size / grid as f64
}

/// Fixed `sampling_ratio x sampling_ratio` samples per bin: one dense grid, averaged with `avg_pool2d`.
fn align_fixed(stacked: &StackedInput, geometry: &RoiGeometry, output_size: (i64, i64), ratio: i64) -> Tensor {
    let (oh, ow) = output_size;
    let count = geometry.start_x.size()[0];
    let y = sample_positions(&geometry.start_y, &geometry.bin_h, oh, ratio);
    let x = sample_positions(&geometry.start_x, &geometry.bin_w, ow, ratio);
    let shape = [count, oh * ratio, ow * ratio];
    let grid = stacked.grid(
        &x.unsqueeze(1).expand(shape, false),
        &y.unsqueeze(2).expand(shape, false),
        &geometry.batch_index.view([count, 1, 1]),
    );
    let samples = stacked.map.grid_sampler_2d(
        &grid.reshape([1, count * oh * ratio, ow * ratio, 2]),
        BILINEAR,
        ZERO_PADDING,
        true,
    );
    let samples = samples.reshape([stacked.channels, count, oh * ratio, ow * ratio]).permute([1, 0, 2, 3]);
    samples.avg_pool2d([ratio, ratio], [ratio, ratio], [0, 0], false, true, None)
}

/// Adaptive sampling: `ceil(bin_h) x ceil(bin_w)` samples per bin, different for every RoI, as one flat list of
/// samples (bin-major within each RoI) summed per bin with `index_add`. RoIs with a non-positive grid (empty boxes
/// with `aligned = true`) get no samples and stay zero, as in torchvision.
fn align_adaptive(stacked: &StackedInput, geometry: &RoiGeometry, output_size: (i64, i64)) -> Tensor {
    let (oh, ow) = output_size;
    let bins = oh * ow;
    let count = geometry.start_x.size()[0];
    let device = geometry.start_x.device();
    let int64 = (Kind::Int64, device);
    // Exactly torchvision's ceil(roi_size / pooled_size): bin sizes are that quotient.
    let grid_h = geometry.bin_h.ceil().to_kind(Kind::Int64).clamp_min(0);
    let grid_w = geometry.bin_w.ceil().to_kind(Kind::Int64).clamp_min(0);
    let per_bin = &grid_h * &grid_w;
    let per_roi = &per_bin * bins;
    let total = per_roi.sum(Kind::Int64).int64_value(&[]);
    let kind = geometry.start_x.kind();
    let pooled = if total == 0 {
        Tensor::zeros([stacked.channels, count * bins], (stacked.map.kind(), device))
    } else {
        let roi = Tensor::repeat_interleave(&per_roi, total);
        let first_sample = per_roi.cumsum(0, Kind::Int64) - &per_roi;
        let local = Tensor::arange(total, int64) - first_sample.index_select(0, &roi);
        let samples_per_bin = per_bin.index_select(0, &roi);
        let bin = local.floor_divide(&samples_per_bin);
        let in_bin = local - &bin * &samples_per_bin;
        let gw = grid_w.index_select(0, &roi);
        let gh = grid_h.index_select(0, &roi);
        let iy = in_bin.floor_divide(&gw);
        let ix = in_bin - &iy * &gw;
        let ph = bin.floor_divide_scalar(ow);
        let pw = &bin - &ph * ow;
        let bin_h = geometry.bin_h.index_select(0, &roi);
        let bin_w = geometry.bin_w.index_select(0, &roi);
        let y = geometry.start_y.index_select(0, &roi)
            + ph.to_kind(kind) * &bin_h
            + (iy.to_kind(kind) + 0.5) * &bin_h / gh.to_kind(kind);
        let x = geometry.start_x.index_select(0, &roi)
            + pw.to_kind(kind) * &bin_w
            + (ix.to_kind(kind) + 0.5) * &bin_w / gw.to_kind(kind);
        let grid = stacked.grid(&x, &y, &geometry.batch_index.index_select(0, &roi));
        let samples = stacked.map.grid_sampler_2d(&grid.reshape([1, total, 1, 2]), BILINEAR, ZERO_PADDING, true);
        let samples = samples.reshape([stacked.channels, total]);
        let target = roi * bins + bin;
        let sums =
            Tensor::zeros([stacked.channels, count * bins], (samples.kind(), device)).index_add(1, &target, &samples);
        let divisor = per_bin.clamp_min(1).to_kind(samples.kind()).repeat_interleave_self_int(bins, 0, None);
        sums / divisor
    };
    pooled.reshape([stacked.channels, count, oh, ow]).permute([1, 0, 2, 3])
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
    let (oh, ow) = output_size;
    let num_rois = rois.size()[0];
    let stacked = StackedInput::new(input);
    if num_rois == 0 {
        // An empty slice of the input keeps the autograd graph connected.
        return stacked.map.flatten(0, -1).narrow(0, 0, 0).reshape([0, stacked.channels, oh, ow]);
    }
    let geometry = RoiGeometry::new(rois, input, output_size, spatial_scale, aligned);
    if sampling_ratio > 0 {
        align_fixed(&stacked, &geometry, output_size, sampling_ratio)
    } else {
        align_adaptive(&stacked, &geometry, output_size)
    }
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
