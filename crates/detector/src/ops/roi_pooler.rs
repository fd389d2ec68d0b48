//! detectron2's multi-level `ROIPooler` over [`super::roi_align()`]: each box is pooled from the pyramid level its
//! size maps to, all levels in one RoIAlign over the stacked maps.

use tch::{Kind, Tensor};

use super::roi_align::{roi_align_levels, PyramidRows};

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
    /// All levels are pooled by one RoIAlign over the stacked maps (no per-level host sync).
    pub fn forward(&self, features: &[Tensor], boxes_per_image: &[Tensor]) -> Tensor {
        self.pool(&self.stack(features), boxes_per_image)
    }

    /// `features` (one map per scale of this pooler) stacked for [`RoiPooler::pool`]; poolers over the same maps
    /// and scales (the box and mask heads') can share it and pay the copy once.
    pub fn stack(&self, features: &[Tensor]) -> PyramidRows {
        let maps: Vec<&Tensor> = features.iter().collect();
        PyramidRows::new(&maps, &self.scales)
    }

    /// [`RoiPooler::forward`] from maps stacked beforehand with [`RoiPooler::stack`] (this pooler's scales).
    pub fn pool(&self, rows: &PyramidRows, boxes_per_image: &[Tensor]) -> Tensor {
        let device = rows.device();
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
        let level = if self.scales.len() == 1 {
            Tensor::zeros([rois.size()[0]], (Kind::Int64, device))
        } else {
            self.assign_levels(&rois.narrow(1, 1, 4))
        };
        roi_align_levels(rows, &rois, &level, self.output_size, self.sampling_ratio, self.aligned)
    }
}
