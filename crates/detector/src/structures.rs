//! What goes in and out of the model: the padded image batch, per-image ground truth and per-image detections,
//! plus the input preprocessing (normalisation, test-time resize, padding).

use tch::{Device, Kind, Tensor};

use crate::config::{ChannelOrder, InputConfig, ResizeStyle};
use crate::DetectorError;

/// Instance masks of one image's ground truth, in the coordinates of the (resized) image in the batch.
#[derive(Debug)]
pub enum GtMasks {
    /// Per instance, per polygon part, flat `x0, y0, x1, y1, ...` pixel coordinates.
    Polygons(Vec<Vec<Vec<f64>>>),
    /// `[K, H, W]` u8 bitmaps (from RLE annotations), `H`, `W` the image size in the batch.
    Bitmaps(Tensor),
}

/// Ground truth of one image.
#[derive(Debug)]
pub struct GtInstances {
    /// `[K, 4]` float32 boxes, `(x1, y1, x2, y2)` in the pixels of the image in the batch.
    pub boxes: Tensor,
    /// `[K]` int64 class labels in `0..num_classes`.
    pub labels: Tensor,
    /// One mask per instance.
    pub masks: GtMasks,
    /// Seed for this image's RPN anchor and RoI proposal sampling (`None`: the global torch RNG as it stands).
    /// The trainer passes the sampler's per-image seed, so an image is sampled identically whichever rank, batch
    /// slot or micro-batch it lands in.
    pub sampling_seed: Option<u64>,
}

impl GtInstances {
    /// An image without annotations.
    pub fn empty(device: Device) -> GtInstances {
        GtInstances {
            boxes: Tensor::zeros([0, 4], (Kind::Float, device)),
            labels: Tensor::zeros([0], (Kind::Int64, device)),
            masks: GtMasks::Polygons(Vec::new()),
            sampling_seed: None,
        }
    }

    /// Number of instances.
    pub fn len(&self) -> i64 {
        self.boxes.size()[0]
    }

    /// Whether the image has no instances.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A padded batch of normalised images with the size of each image's content.
#[derive(Debug)]
pub struct ImageBatch {
    /// `[N, 3, H, W]` float32, zero beyond each image's content, `H` and `W` multiples of the size divisibility.
    pub images: Tensor,
    /// `(height, width)` of each image's content in `images`.
    pub image_sizes: Vec<(i64, i64)>,
}

/// Detections of one image.
#[derive(Debug)]
pub struct Detections {
    /// `[D, 4]` float32 `(x1, y1, x2, y2)` boxes in output-image pixels.
    pub boxes: Tensor,
    /// `[D]` float32 class scores, descending.
    pub scores: Tensor,
    /// `[D]` int64 class labels in `0..num_classes`.
    pub labels: Tensor,
    /// `[D, H, W]` bool masks at the output image's resolution.
    pub masks: Tensor,
}

/// Normalises images (`[3, H, W]` RGB, values 0..255, any float or u8 kind) with the config's channel order, range,
/// mean and std, and pads them into one zero-filled batch whose sides are multiples of `size_divisibility`.
pub fn preprocess(images: &[Tensor], input: &InputConfig, device: Device) -> Result<ImageBatch, DetectorError> {
    if images.is_empty() {
        return Err(DetectorError::Input("preprocess: no images".into()));
    }
    let mut image_sizes = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let size = image.size();
        if size.len() != 3 || size[0] != 3 || size[1] == 0 || size[2] == 0 {
            return Err(DetectorError::Input(format!("preprocess: image {i} has shape {size:?}, expected [3, H, W]")));
        }
        image_sizes.push((size[1], size[2]));
    }
    let (mean, std) = channel_stats(input, device);
    let scale = input.value_range / 255.0;
    let normalized: Vec<Tensor> = images
        .iter()
        .map(|image| {
            let mut x = image.to_device(device).to_kind(Kind::Float);
            if input.format == ChannelOrder::BGR {
                x = x.flip([0]);
            }
            (x * scale - &mean) / &std
        })
        .collect();
    Ok(pad_batch(&normalized, image_sizes, input.size_divisibility))
}

/// Per-channel mean and std `[3, 1, 1]` in the network's channel order.
fn channel_stats(input: &InputConfig, device: Device) -> (Tensor, Tensor) {
    let mean = Tensor::from_slice(&input.pixel_mean.map(|v| v as f32)).view([3, 1, 1]).to_device(device);
    let std = Tensor::from_slice(&input.pixel_std.map(|v| v as f32)).view([3, 1, 1]).to_device(device);
    (mean, std)
}

/// Pads already normalised `[3, h, w]` images into one zero-filled batch with sides rounded up to `divisibility`.
pub fn pad_batch(images: &[Tensor], image_sizes: Vec<(i64, i64)>, divisibility: i64) -> ImageBatch {
    let round_up = |v: i64| (v + divisibility - 1) / divisibility * divisibility;
    let max_h = round_up(image_sizes.iter().map(|s| s.0).max().unwrap_or(0));
    let max_w = round_up(image_sizes.iter().map(|s| s.1).max().unwrap_or(0));
    let device = images.first().map(|t| t.device()).unwrap_or(Device::Cpu);
    let batch = Tensor::zeros([images.len() as i64, 3, max_h, max_w], (Kind::Float, device));
    for (i, (image, &(h, w))) in images.iter().zip(&image_sizes).enumerate() {
        batch.get(i as i64).narrow(1, 0, h).narrow(2, 0, w).copy_(image);
    }
    ImageBatch { images: batch, image_sizes }
}

/// The test-time size of an `(height, width)` image: shorter side `min_size_test`, longer side at most
/// `max_size_test`, rounded as `resize_style` says.
pub fn test_size(input: &InputConfig, height: i64, width: i64) -> (i64, i64) {
    let (h, w) = (height as f64, width as f64);
    let (min_size, max_size) = (input.min_size_test as f64, input.max_size_test as f64);
    match input.resize_style {
        ResizeStyle::Detectron2 => {
            let scale = min_size / h.min(w);
            let (mut new_h, mut new_w) = if h < w { (min_size, scale * w) } else { (scale * h, min_size) };
            if new_h.max(new_w) > max_size {
                let shrink = max_size / new_h.max(new_w);
                new_h *= shrink;
                new_w *= shrink;
            }
            ((new_h + 0.5) as i64, (new_w + 0.5) as i64)
        }
        ResizeStyle::Torchvision => {
            let (short, long) = (h.min(w) as f32, h.max(w) as f32);
            // torchvision's scale is a float32 tensor and `interpolate` multiplies in float32 before flooring.
            let scale = (min_size as f32 / short).min(max_size as f32 / long);
            ((height as f32 * scale).floor() as i64, (width as f32 * scale).floor() as i64)
        }
    }
}

/// Resizes a `[3, H, W]` image (any kind, values kept) to its test size with bilinear interpolation
/// (`align_corners = false`), returned as float32.
pub fn resize_for_test(image: &Tensor, input: &InputConfig) -> Tensor {
    let size = image.size();
    let (h, w) = test_size(input, size[1], size[2]);
    image.to_kind(Kind::Float).unsqueeze(0).upsample_bilinear2d([h, w], false, None, None).squeeze_dim(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_padded_to_the_divisibility_and_normalised() {
        let input = InputConfig::default();
        let a = Tensor::full([3, 20, 30], 255.0, (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([3, 40, 10], (Kind::Float, Device::Cpu));
        let batch = preprocess(&[a, b], &input, Device::Cpu).unwrap();
        assert_eq!(batch.images.size(), [2, 3, 64, 32]);
        assert_eq!(batch.image_sizes, [(20, 30), (40, 10)]);
        // BGR: channel 0 is blue, (255 - 103.53) / 57.375.
        let v = batch.images.double_value(&[0, 0, 0, 0]);
        assert!((v - (255.0 - 103.53) / 57.375).abs() < 1e-5, "{v}");
        assert_eq!(batch.images.double_value(&[0, 0, 25, 0]), 0.0);
        assert!(preprocess(&[Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu))], &input, Device::Cpu).is_err());
    }

    #[test]
    fn test_sizes_follow_each_framework() {
        let d2 = InputConfig::default();
        assert_eq!(test_size(&d2, 480, 640), (800, 1067));
        assert_eq!(test_size(&d2, 480, 1280), (500, 1333));
        let tv = InputConfig { resize_style: ResizeStyle::Torchvision, ..Default::default() };
        // Values printed by torchvision 0.26's GeneralizedRCNNTransform.
        assert_eq!(test_size(&tv, 480, 640), (800, 1066));
        assert_eq!(test_size(&tv, 427, 640), (800, 1199));
        assert_eq!(test_size(&tv, 640, 480), (1066, 800));
        assert_eq!(test_size(&tv, 333, 500), (800, 1201));
    }
}
