//! The fixed synthetic inputs of `trainer bench` ([`SyntheticInputs`]): the same numbers as
//! `scripts/bench_torchvision.py` draws, so that both sides measure identical inputs (checked by a checksum).

use data::config::MaskFormat;
use detector::ops::polygons_to_bitmask;
use detector::structures::{GtInstances, GtMasks, ImageBatch};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::layout::images_to_channels_last;

/// Ground-truth instances per synthetic training image.
pub const SYNTHETIC_INSTANCES: i64 = 4;

/// Synthetic pixels already at their input size, normalised and padded by the input pipeline (`[input]`).
pub fn image_batch(pixels: &[Tensor], config: &Config, device: Device) -> anyhow::Result<ImageBatch> {
    let (images, image_sizes) = data::pixels::preprocess(pixels, &config.input, device)?;
    Ok(ImageBatch { images, image_sizes })
}

/// Fixed synthetic inputs, deterministic from a seed: drawn in this order from torch's CPU generator after
/// `manual_seed(seed)`: pixels `randint(0, 256, [B, 3, H, W])` (u8 RGB), box parameters `rand([B, K, 4])` (`r`),
/// labels `randint(0, num_classes, [B, K])`. Box `k` of image `b` has width `(0.1 + 0.4 r2) W`, height
/// `(0.1 + 0.4 r3) H` and top-left corner `(r0 (W - width), r1 (H - height))`; its mask is the octagon inscribed
/// in the box (vertices at angles 0, 45, ..., 315 degrees on the box's inscribed ellipse), given as a polygon.
/// `scripts/bench_torchvision.py` follows the same recipe (rasterising the octagons for torchvision).
pub struct SyntheticInputs {
    /// `[3, H, W]` u8 pixels per image, on the host.
    pub pixels: Vec<Tensor>,
    /// The normalised, padded batch on the device (channels-last when the config's `channels_last` is set).
    pub batch: ImageBatch,
    /// Ground truth per image, on the device.
    pub targets: Vec<GtInstances>,
    /// Pixel sum plus box coordinate sum.
    pub checksum: f64,
}

impl SyntheticInputs {
    /// Draws `batch` images of `size` with [`SYNTHETIC_INSTANCES`] instances each: the image batch on `device`, the
    /// targets on the host (as the loader gives them; the model checks and uploads them).
    pub fn new(config: &Config, batch: i64, size: [i64; 2], seed: u64, device: Device) -> anyhow::Result<Self> {
        let [h, w] = size;
        let k = SYNTHETIC_INSTANCES;
        tch::manual_seed(seed as i64);
        let pixels = Tensor::randint(256, [batch, 3, h, w], (Kind::Uint8, Device::Cpu));
        let params = Vec::<f32>::try_from(Tensor::rand([batch, k, 4], (Kind::Float, Device::Cpu)).flatten(0, -1))?;
        // Targets stay on the host, as the loader's do: the model checks and uploads them.
        let labels = Tensor::randint(config.model.roi_heads.num_classes, [batch, k], (Kind::Int64, Device::Cpu));
        let (wf, hf) = (w as f64, h as f64);
        let mut checksum = pixels.sum(Kind::Double).double_value(&[]);
        let mut targets = Vec::with_capacity(batch as usize);
        for (image, image_params) in params.chunks_exact(4 * k as usize).enumerate() {
            let mut boxes = Vec::with_capacity(4 * k as usize);
            let mut polygons = Vec::with_capacity(k as usize);
            for r in image_params.chunks_exact(4) {
                let [r0, r1, r2, r3] = [0, 1, 2, 3].map(|i| r[i] as f64);
                let (bw, bh) = ((0.1 + 0.4 * r2) * wf, (0.1 + 0.4 * r3) * hf);
                let (x1, y1) = (r0 * (wf - bw), r1 * (hf - bh));
                let corners = [x1, y1, x1 + bw, y1 + bh];
                checksum += corners.iter().sum::<f64>();
                boxes.extend(corners.map(|v| v as f32));
                let (cx, cy) = (x1 + bw / 2.0, y1 + bh / 2.0);
                let octagon: Vec<f64> = (0..8)
                    .flat_map(|i| {
                        let angle = i as f64 * std::f64::consts::FRAC_PI_4;
                        [cx + bw / 2.0 * angle.cos(), cy + bh / 2.0 * angle.sin()]
                    })
                    .collect();
                polygons.push(vec![octagon]);
            }
            // As the loader makes them: bitmaps rasterised ahead of the step with `input.mask_format = "bitmask"`.
            let masks = match config.input.mask_format {
                MaskFormat::Polygon => GtMasks::Polygons(polygons),
                MaskFormat::Bitmask => {
                    let bitmaps: Vec<Tensor> = polygons.iter().map(|p| polygons_to_bitmask(p, h, w)).collect();
                    GtMasks::Bitmaps(Tensor::stack(&bitmaps, 0))
                }
            };
            targets.push(GtInstances {
                boxes: Tensor::from_slice(&boxes).view([k, 4]),
                labels: labels.get(image as i64),
                masks,
                // As in training: a fixed per-image sampling seed.
                sampling_seed: Some(image as u64),
            });
        }
        let pixels: Vec<Tensor> = pixels.unbind(0);
        let mut batch = image_batch(&pixels, config, device)?;
        if config.channels_last {
            batch = images_to_channels_last(batch);
        }
        Ok(SyntheticInputs { pixels, batch, targets, checksum })
    }
}
