//! Collation: samples become one zero-padded batch of their normalised images plus per-image targets.

use tch::{Device, Tensor};

use crate::config::{InputConfig, MaskFormat};
use crate::error::DataError;
use crate::pixels::pad_to_bucket;
use crate::raster::rasterize_polygons;
use crate::sample::Sample;
use crate::transform::InstanceMask;

/// The mask targets of one image, all of one kind.
#[derive(Debug)]
pub enum TargetMasks {
    /// Per instance, its polygon parts (flat `x, y` lists) in resized pixels; empty when the dataset has no masks.
    Polygons(Vec<Vec<Vec<f64>>>),
    /// `[K, H, W]` u8 bitmaps (0/1) of the whole resized image: with `input.mask_format = "bitmask"`, and for
    /// images with an RLE annotation (their polygon instances are rasterised too).
    Bitmaps(Tensor),
}

impl TargetMasks {
    /// Builds one image's targets from its instance masks: bitmaps when `format` asks for them or when any
    /// instance is already a bitmap (every polygon rasterised with `raster`), else polygons.
    fn new(masks: Vec<InstanceMask>, format: MaskFormat, (height, width): (usize, usize)) -> TargetMasks {
        let any_bitmap = masks.iter().any(|m| matches!(m, InstanceMask::Bitmap(_)));
        if masks.is_empty() || (format == MaskFormat::Polygon && !any_bitmap) {
            let polygons = masks.into_iter().map(|m| if let InstanceMask::Polygons(p) = m { p } else { vec![] });
            return TargetMasks::Polygons(polygons.collect());
        }
        let count = masks.len() as i64;
        let mut pixels = Vec::with_capacity(masks.len() * height * width);
        for mask in masks {
            match mask {
                InstanceMask::Bitmap(bitmap) => pixels.extend_from_slice(&bitmap),
                InstanceMask::Polygons(parts) => pixels.extend(rasterize_polygons(&parts, height, width)),
            }
        }
        TargetMasks::Bitmaps(Tensor::from_slice(&pixels).view([count, height as i64, width as i64]))
    }
}

/// Targets of one image.
#[derive(Debug)]
pub struct Target {
    /// `[K, 4]` f32 boxes `x0, y0, x1, y1` in resized pixels.
    pub boxes: Tensor,
    /// `[K]` i64 contiguous labels.
    pub labels: Tensor,
    /// One mask per instance (no polygons when the dataset has no masks).
    pub masks: TargetMasks,
    /// COCO annotation ids, one per instance.
    pub annotation_ids: Vec<u64>,
}

/// A batch ready for the detector.
#[derive(Debug)]
pub struct Batch {
    /// `[N, 3, H, W]` f32, normalised with the configured mean/std in the configured channel order, zero-padded to
    /// a multiple of `size_divisibility` (training batches: to a `train_pad_buckets` size when set).
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
    /// Uploads the images to `device` (counted by the `transfer` crate) through pinned memory with a non-blocking
    /// copy on CUDA, so the host queues the step's work without waiting for them. The targets stay on the host:
    /// the detector checks them there for free and uploads what its losses need (`GtInstances::to_device`), and
    /// evaluation never needs them on the device.
    pub fn images_to_device(self, device: Device) -> Batch {
        Batch { images: transfer::upload(&self.images, device), ..self }
    }
}

/// Builds a batch: pads the samples' normalised images into one `[N, 3, H, W]` tensor (sides rounded up to
/// `input.size_divisibility`, then for training batches (`train`) to the smallest of `input.train_pad_buckets`
/// that holds them) and converts the targets to tensors.
pub fn collate(samples: Vec<Sample>, input: &InputConfig, train: bool) -> Result<Batch, DataError> {
    if samples.is_empty() {
        return Err(DataError::Loader("cannot collate an empty batch".into()));
    }
    let buckets: &[[u32; 2]] = if train { &input.train_pad_buckets } else { &[] };
    let (images, image_sizes) = pad_to_bucket(
        &samples.iter().map(|s| s.image.shallow_clone()).collect::<Vec<_>>(),
        input.size_divisibility,
        buckets,
    );
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
        let masks = TargetMasks::new(t.masks, input.mask_format, (h as usize, w as usize));
        batch.targets.push(Target {
            boxes: Tensor::from_slice(&flat_boxes).view([k, 4]),
            labels: Tensor::from_slice(&t.labels),
            masks,
            annotation_ids: t.annotation_ids,
        });
    }
    Ok(batch)
}
