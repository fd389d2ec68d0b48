//! Collation: samples become one zero-padded batch of their normalised images plus per-image targets.

use tch::{Device, Tensor};

use crate::config::InputConfig;
use crate::error::DataError;
use crate::pixels::pad;
use crate::sample::Sample;
use crate::transform::InstanceMask;

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
    /// Uploads the image and target tensors to `device` (counted by the `transfer` crate), each through pinned
    /// memory with a non-blocking copy on CUDA, so the host queues the step's work without waiting for them.
    pub fn to_device(self, device: Device) -> Batch {
        let images = transfer::upload(&self.images, device);
        let targets = self
            .targets
            .into_iter()
            .map(|t| Target {
                boxes: transfer::upload(&t.boxes, device),
                labels: transfer::upload(&t.labels, device),
                masks: t
                    .masks
                    .into_iter()
                    .map(|m| match m {
                        TargetMask::Bitmap(b) => TargetMask::Bitmap(transfer::upload(&b, device)),
                        polygons => polygons,
                    })
                    .collect(),
                annotation_ids: t.annotation_ids,
            })
            .collect();
        Batch { images, targets, ..self }
    }
}

/// Builds a batch: pads the samples' normalised images into one `[N, 3, H, W]` tensor (sides rounded up to
/// `input.size_divisibility`) and converts the targets to tensors.
pub fn collate(samples: Vec<Sample>, input: &InputConfig) -> Result<Batch, DataError> {
    if samples.is_empty() {
        return Err(DataError::Loader("cannot collate an empty batch".into()));
    }
    let (images, image_sizes) =
        pad(&samples.iter().map(|s| s.image.shallow_clone()).collect::<Vec<_>>(), input.size_divisibility);
    let mut batch = Batch {
        images,
        image_sizes,
        original_sizes: Vec::with_capacity(samples.len()),
        image_ids: Vec::with_capacity(samples.len()),
        scales: Vec::with_capacity(samples.len()),
        flipped: Vec::with_capacity(samples.len()),
        targets: Vec::with_capacity(samples.len()),
        sample_seeds: Vec::new(),
    };
    for sample in samples {
        let (h, w) = sample.geometry.output_size();
        let (oh, ow) = sample.geometry.original;
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
    Ok(batch)
}
