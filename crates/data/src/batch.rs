//! Collation: samples become one normalised, zero-padded image tensor plus per-image targets.

use tch::{Device, Kind, Tensor};

use crate::config::{InputConfig, PixelFormat};
use crate::error::DataError;
use crate::transform::{InstanceMask, Sample};

/// A mask target of one instance.
#[derive(Debug)]
pub enum TargetMask {
    /// Polygon parts (flat `x, y` lists) in resized pixels.
    Polygons(Vec<Vec<f64>>),
    /// `[H, W]` u8 bitmap (0/1) of the whole resized image, for RLE annotations.
    Bitmap(Tensor),
}

/// Targets of one image.
#[derive(Debug)]
pub struct Target {
    /// `[K, 4]` f32 boxes `x0, y0, x1, y1` in resized pixels.
    pub boxes: Tensor,
    /// `[K]` i64 contiguous labels.
    pub labels: Tensor,
    /// One mask per instance (empty when the dataset has no masks).
    pub masks: Vec<TargetMask>,
    /// COCO annotation ids, one per instance.
    pub annotation_ids: Vec<u64>,
}

/// A batch ready for the detector.
#[derive(Debug)]
pub struct Batch {
    /// `[N, 3, H, W]` f32, normalised with the configured mean/std in the configured channel order, zero-padded to
    /// a multiple of `size_divisibility`.
    pub images: Tensor,
    /// Per image (height, width) after resize (and crop), before padding.
    pub image_sizes: Vec<(i64, i64)>,
    /// Per image original (height, width).
    pub original_sizes: Vec<(i64, i64)>,
    /// Per image COCO id.
    pub image_ids: Vec<u64>,
    /// Per image resize factors (height, width): resized over original.
    pub scales: Vec<(f64, f64)>,
    /// Per image: whether it was flipped horizontally.
    pub flipped: Vec<bool>,
    /// Per image targets.
    pub targets: Vec<Target>,
    /// Per image seed from the training sampler (for the detector's per-image RPN/RoI sampling, so results do not
    /// depend on how images are split across ranks and micro-batches); empty for batches collated outside a
    /// training loader.
    pub sample_seeds: Vec<u64>,
}

impl Batch {
    /// Moves the image and target tensors to `device`; on CUDA the images go through pinned memory with a
    /// non-blocking copy.
    pub fn to_device(self, device: Device) -> Batch {
        let images = if device.is_cuda() {
            self.images.pin_memory(device).to_device_(device, Kind::Float, true, false)
        } else {
            self.images.to_device(device)
        };
        let targets = self
            .targets
            .into_iter()
            .map(|t| Target {
                boxes: t.boxes.to_device(device),
                labels: t.labels.to_device(device),
                masks: t
                    .masks
                    .into_iter()
                    .map(|m| match m {
                        TargetMask::Bitmap(b) => TargetMask::Bitmap(b.to_device(device)),
                        polygons => polygons,
                    })
                    .collect(),
                annotation_ids: t.annotation_ids,
            })
            .collect();
        Batch { images, targets, ..self }
    }
}

fn round_up(v: u32, multiple: u32) -> u32 {
    v.div_ceil(multiple) * multiple
}

/// Builds a batch: normalises each image into a zero-padded `[N, 3, H, W]` buffer and converts targets to tensors.
pub fn collate(samples: Vec<Sample>, input: &InputConfig) -> Result<Batch, DataError> {
    if samples.is_empty() {
        return Err(DataError::Loader("cannot collate an empty batch".into()));
    }
    let div = input.size_divisibility;
    let pad_h = round_up(samples.iter().map(|s| s.image.height).max().unwrap_or(0), div) as usize;
    let pad_w = round_up(samples.iter().map(|s| s.image.width).max().unwrap_or(0), div) as usize;
    let plane = pad_h * pad_w;
    let images = Tensor::empty([samples.len() as i64, 3, pad_h as i64, pad_w as i64], (Kind::Float, Device::Cpu));
    // SAFETY: `images` is a freshly allocated, contiguous CPU float tensor of exactly this many elements, owned
    // here and not aliased until it is moved into the batch after the last write through `buffer`. Every element
    // is written below (pixels or zero padding) before the tensor is read.
    let buffer: &mut [f32] =
        unsafe { std::slice::from_raw_parts_mut(images.data_ptr() as *mut f32, samples.len() * 3 * plane) };
    // Per output channel: the source channel in the RGB pixels and a 256-entry table of normalised values.
    let channel_source: [usize; 3] = match input.format {
        PixelFormat::Rgb => [0, 1, 2],
        PixelFormat::Bgr => [2, 1, 0],
    };
    let tables: [Vec<f32>; 3] =
        std::array::from_fn(|c| (0..256).map(|v| (v as f32 - input.pixel_mean[c]) / input.pixel_std[c]).collect());
    let mut batch = Batch {
        images: Tensor::new(),
        image_sizes: Vec::with_capacity(samples.len()),
        original_sizes: Vec::with_capacity(samples.len()),
        image_ids: Vec::with_capacity(samples.len()),
        scales: Vec::with_capacity(samples.len()),
        flipped: Vec::with_capacity(samples.len()),
        targets: Vec::with_capacity(samples.len()),
        sample_seeds: Vec::new(),
    };
    for (n, sample) in samples.into_iter().enumerate() {
        let (h, w) = (sample.image.height as usize, sample.image.width as usize);
        let image_buffer = &mut buffer[n * 3 * plane..(n + 1) * 3 * plane];
        let (plane0, rest) = image_buffer.split_at_mut(plane);
        let (plane1, plane2) = rest.split_at_mut(plane);
        let [t0, t1, t2] = &tables;
        let [s0, s1, s2] = channel_source;
        for y in 0..h {
            let src = &sample.image.data[y * w * 3..(y + 1) * w * 3];
            let row = y * pad_w..(y + 1) * pad_w;
            let (r0, r1, r2) = (&mut plane0[row.clone()], &mut plane1[row.clone()], &mut plane2[row]);
            for (x, px) in src.chunks_exact(3).enumerate() {
                r0[x] = t0[px[s0] as usize];
                r1[x] = t1[px[s1] as usize];
                r2[x] = t2[px[s2] as usize];
            }
            for r in [r0, r1, r2] {
                r[w..].fill(0.0);
            }
        }
        for p in [plane0, plane1, plane2] {
            p[h * pad_w..].fill(0.0);
        }
        let (oh, ow) = sample.geometry.original;
        batch.image_sizes.push((h as i64, w as i64));
        batch.original_sizes.push((oh as i64, ow as i64));
        batch.image_ids.push(sample.image_id);
        batch.scales.push(sample.geometry.scale());
        batch.flipped.push(sample.geometry.flip);
        let t = sample.targets;
        let k = t.boxes.len() as i64;
        let flat_boxes: Vec<f32> = t.boxes.iter().flatten().copied().collect();
        let masks = t
            .masks
            .into_iter()
            .map(|m| match m {
                InstanceMask::Polygons(p) => TargetMask::Polygons(p),
                InstanceMask::Bitmap(b) => TargetMask::Bitmap(Tensor::from_slice(&b).view([h as i64, w as i64])),
            })
            .collect();
        batch.targets.push(Target {
            boxes: Tensor::from_slice(&flat_boxes).view([k, 4]),
            labels: Tensor::from_slice(&t.labels),
            masks,
            annotation_ids: t.annotation_ids,
        });
    }
    batch.images = images;
    Ok(batch)
}
