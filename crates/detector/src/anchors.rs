//! Anchor generator (detectron2 `DefaultAnchorGenerator`, with torchvision's variant as an option): cell anchors
//! of every size and aspect ratio centred on the origin, shifted to every feature-map cell. The cell anchors are
//! uploaded to a device once and kept there, so a training step copies nothing to build its anchors.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::config::AnchorConfig;

/// Anchors for every pyramid level.
#[derive(Debug)]
pub struct AnchorGenerator {
    cell_anchors: Vec<Vec<[f32; 4]>>,
    strides: Vec<i64>,
    offset: f64,
    strides_from_sizes: bool,
    /// The cell anchors of every level as `[A, 4]` tensors, per device they were uploaded to.
    on_device: Mutex<Vec<(Device, Vec<Tensor>)>>,
}

impl AnchorGenerator {
    /// Anchors for levels with the given nominal `strides` (one per entry of `config.sizes`).
    pub fn new(config: &AnchorConfig, strides: &[i64]) -> AnchorGenerator {
        let cell_anchors = config
            .sizes
            .iter()
            .map(|sizes| {
                if config.round_cell_anchors {
                    torchvision_cell_anchors(sizes, &config.aspect_ratios)
                } else {
                    detectron2_cell_anchors(sizes, &config.aspect_ratios)
                }
            })
            .collect();
        AnchorGenerator {
            cell_anchors,
            strides: strides.to_vec(),
            offset: config.offset,
            strides_from_sizes: config.strides_from_sizes,
            on_device: Mutex::new(Vec::new()),
        }
    }

    /// Anchors per cell (the same at every level).
    pub fn num_cell_anchors(&self) -> i64 {
        self.cell_anchors[0].len() as i64
    }

    /// Anchors `[H * W * A, 4]` per level, ordered by row, column, then cell anchor (the order of the RPN head's
    /// flattened outputs), for feature maps of `feature_sizes` (height, width) on a padded batch of `padded_size`.
    pub fn forward(&self, feature_sizes: &[(i64, i64)], padded_size: (i64, i64), device: Device) -> Vec<Tensor> {
        let cells = self.cells_on(device);
        feature_sizes
            .iter()
            .zip(&cells)
            .zip(&self.strides)
            .map(|((&(h, w), cell), &stride)| {
                let (stride_y, stride_x) = if self.strides_from_sizes {
                    (padded_size.0 / h.max(1), padded_size.1 / w.max(1))
                } else {
                    (stride, stride)
                };
                let opts = (Kind::Float, device);
                let xs = Tensor::arange(w, opts) * stride_x as f64 + self.offset * stride_x as f64;
                let ys = Tensor::arange(h, opts) * stride_y as f64 + self.offset * stride_y as f64;
                let grid = Tensor::meshgrid_indexing(&[&ys, &xs], "ij");
                let (shift_y, shift_x) = (grid[0].reshape([-1]), grid[1].reshape([-1]));
                let shifts = Tensor::stack(&[&shift_x, &shift_y, &shift_x, &shift_y], 1);
                (shifts.unsqueeze(1) + cell.unsqueeze(0)).reshape([-1, 4])
            })
            .collect()
    }

    /// The cell anchors of every level on `device`, uploaded at the first call for that device.
    fn cells_on(&self, device: Device) -> Vec<Tensor> {
        let mut cache = self.on_device.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, cells)) = cache.iter().find(|(d, _)| *d == device) {
            return cells.iter().map(Tensor::shallow_clone).collect();
        }
        let cells: Vec<Tensor> = self
            .cell_anchors
            .iter()
            .map(|cell| {
                let flat: Vec<f32> = cell.iter().flatten().copied().collect();
                transfer::upload(&Tensor::from_slice(&flat).view([-1, 4]), device)
            })
            .collect();
        cache.push((device, cells.iter().map(Tensor::shallow_clone).collect()));
        cells
    }
}

/// detectron2: for each size, for each ratio, `w = sqrt(size^2 / ratio)`, `h = ratio * w`, centred on 0.
fn detectron2_cell_anchors(sizes: &[f64], ratios: &[f64]) -> Vec<[f32; 4]> {
    let mut anchors = Vec::new();
    for &size in sizes {
        for &ratio in ratios {
            let w = (size * size / ratio).sqrt();
            let h = ratio * w;
            anchors.push([(-w / 2.0) as f32, (-h / 2.0) as f32, (w / 2.0) as f32, (h / 2.0) as f32]);
        }
    }
    anchors
}

/// torchvision: for each ratio, for each size, `w = size / sqrt(ratio)`, `h = size * sqrt(ratio)` in float32,
/// halved and rounded to integers.
fn torchvision_cell_anchors(sizes: &[f64], ratios: &[f64]) -> Vec<[f32; 4]> {
    let mut anchors = Vec::new();
    for &ratio in ratios {
        let h_ratio = (ratio as f32).sqrt();
        let w_ratio = 1.0 / h_ratio;
        for &size in sizes {
            let w = w_ratio * size as f32;
            let h = h_ratio * size as f32;
            anchors.push([
                (-w / 2.0).round_ties_even(),
                (-h / 2.0).round_ties_even(),
                (w / 2.0).round_ties_even(),
                (h / 2.0).round_ties_even(),
            ]);
        }
    }
    anchors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detectron2_anchors_match_the_reference_values() {
        let config = AnchorConfig::default();
        let generator = AnchorGenerator::new(&config, &[4, 8, 16, 32, 64]);
        let anchors = generator.forward(&[(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)], (8, 12), Device::Cpu);
        assert_eq!(anchors[0].size(), [2 * 3 * 3, 4]);
        // detectron2: size 32, ratio 0.5 gives w = 45.2548, h = 22.6274.
        let first: Vec<f32> = Vec::try_from(anchors[0].get(0)).unwrap();
        let expected = [-22.627417, -11.313708, 22.627417, 11.313708];
        for (a, b) in first.iter().zip(expected) {
            assert!((a - b).abs() < 1e-4, "{first:?}");
        }
        // The fourth anchor is cell (row 0, column 1): shifted by the stride in x.
        let fourth: Vec<f32> = Vec::try_from(anchors[0].get(3)).unwrap();
        assert!((fourth[0] - (4.0 - 22.627417)).abs() < 1e-4 && (fourth[1] + 11.313708).abs() < 1e-4);
        // Row 1 starts after 3 columns x 3 anchors.
        let row1: Vec<f32> = Vec::try_from(anchors[0].get(9)).unwrap();
        assert!((row1[1] - (4.0 - 11.313708)).abs() < 1e-4);
    }

    #[test]
    fn torchvision_anchors_are_rounded_and_use_integer_strides() {
        let config = AnchorConfig { round_cell_anchors: true, strides_from_sizes: true, ..Default::default() };
        let generator = AnchorGenerator::new(&config, &[4, 8, 16, 32, 64]);
        let anchors =
            generator.forward(&[(200, 200), (100, 100), (50, 50), (25, 25), (13, 13)], (800, 800), Device::Cpu);
        let first: Vec<f32> = Vec::try_from(anchors[0].get(0)).unwrap();
        assert_eq!(first, [-23.0, -11.0, 23.0, 11.0]);
        // P6 of an 800-pixel batch: 13 cells, stride 800 / 13 = 61 (not 64).
        let second_cell: Vec<f32> = Vec::try_from(anchors[4].get(3)).unwrap();
        let origin: Vec<f32> = Vec::try_from(anchors[4].get(0)).unwrap();
        assert_eq!(second_cell[0] - origin[0], 61.0);
    }
}
