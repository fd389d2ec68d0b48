//! Pixels to network input: the one implementation of the resize, the normalisation and the padding that
//! training, evaluation, `trainer predict` and the benchmarks all use, as the `[input]` section describes them.
//!
//! With `resize_style = "detectron2"` the 8-bit image is resized (PIL's antialiased bilinear) and then normalised;
//! with `"torchvision"` it is normalised first and resized with `interpolate(mode="bilinear")`, as torchvision's
//! `GeneralizedRCNNTransform` does. Either way the geometry (sizes, crop, flip) is the [`Geometry`] that the
//! targets follow. The detectron2 style runs no parallel libtorch operator (table lookups and memory copies), so the
//! loader's worker threads do not compete with the training thread's OpenMP team; the torchvision style's resize
//! is a libtorch operator (its preset is for evaluation and prediction).

use tch::{Device, Kind, Tensor};

use crate::config::{InputConfig, PixelFormat, ResizeStyle};
use crate::decode::RgbImage;
use crate::error::DataError;
use crate::transform::Geometry;

/// The per-channel normalisation of `[input]`: output channel `c` of an RGB pixel `p` (values 0..255) is
/// `(p[source[c]] / (255 / value_range) - pixel_mean[c]) / pixel_std[c]`, computed in float32.
#[derive(Debug, Clone, Copy)]
pub struct Normalization {
    /// BGR output reads the RGB channels in reverse.
    bgr: bool,
    /// `255 / value_range`: 1 for detectron2's 0-255 statistics, 255 for torchvision's 0-1 ones.
    divisor: f32,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Normalization {
    /// The normalisation `input` describes.
    pub fn new(input: &InputConfig) -> Self {
        Normalization {
            bgr: input.format == PixelFormat::Bgr,
            divisor: (255.0 / input.value_range) as f32,
            mean: input.pixel_mean,
            std: input.pixel_std,
        }
    }

    /// The RGB channel output channel `c` reads.
    fn source(&self, c: usize) -> usize {
        if self.bgr {
            2 - c
        } else {
            c
        }
    }

    /// An 8-bit RGB image normalised into a `[3, H, W]` float32 CPU tensor (one 256-entry table per channel, each
    /// entry the float32 arithmetic of [`Normalization::tensor`]).
    pub fn image(&self, image: &RgbImage) -> Tensor {
        let (h, w) = (image.height as usize, image.width as usize);
        let plane = h * w;
        let tables: [Vec<f32>; 3] =
            std::array::from_fn(|c| (0..256).map(|v| (v as f32 / self.divisor - self.mean[c]) / self.std[c]).collect());
        let out = Tensor::empty([3, h as i64, w as i64], (Kind::Float, Device::Cpu));
        // SAFETY: `out` is a freshly allocated, contiguous CPU float tensor of exactly `3 * plane` elements, owned
        // here and not aliased while `buffer` lives; every element is written below before the tensor is read.
        let buffer: &mut [f32] = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, 3 * plane) };
        let (plane0, rest) = buffer.split_at_mut(plane);
        let (plane1, plane2) = rest.split_at_mut(plane);
        let [t0, t1, t2] = &tables;
        let [s0, s1, s2] = [0, 1, 2].map(|c| self.source(c));
        for (i, px) in image.data.chunks_exact(3).enumerate() {
            plane0[i] = t0[px[s0] as usize];
            plane1[i] = t1[px[s1] as usize];
            plane2[i] = t2[px[s2] as usize];
        }
        out
    }

    /// A `[3, H, W]` RGB tensor with values 0..255 (any kind) normalised as float32 on its own device.
    pub fn tensor(&self, image: &Tensor) -> Tensor {
        let device = image.device();
        let mut x = image.to_kind(Kind::Float);
        if self.bgr {
            x = x.flip([0]);
        }
        let mean = transfer::to_device(&Tensor::from_slice(&self.mean).view([3, 1, 1]), device);
        let std = transfer::to_device(&Tensor::from_slice(&self.std).view([3, 1, 1]), device);
        (x / f64::from(self.divisor) - mean) / std
    }
}

/// An 8-bit RGB image as a `[3, H, W]` uint8 tensor.
pub fn rgb_tensor(image: &RgbImage) -> Tensor {
    Tensor::from_slice(&image.data).view([image.height as i64, image.width as i64, 3]).permute([2, 0, 1])
}

/// The network input of one image: `image` resized, cropped and flipped as `geometry` says (in `input`'s resize
/// style) and normalised, as a `[3, h, w]` float32 CPU tensor.
pub fn prepare(image: &RgbImage, geometry: &Geometry, input: &InputConfig) -> Result<Tensor, DataError> {
    let normalization = Normalization::new(input);
    match input.resize_style {
        ResizeStyle::Detectron2 => Ok(normalization.image(&geometry.apply_image(image)?)),
        ResizeStyle::Torchvision => {
            let (height, width) = geometry.resized;
            let mut x = normalization
                .tensor(&rgb_tensor(image))
                .unsqueeze(0)
                .upsample_bilinear2d([i64::from(height), i64::from(width)], false, None, None)
                .squeeze_dim(0);
            if let Some(c) = geometry.crop {
                x = x.narrow(1, c.y0.into(), c.height.into()).narrow(2, c.x0.into(), c.width.into());
            }
            if geometry.flip {
                x = x.flip([2]);
            }
            Ok(x.contiguous())
        }
    }
}

/// The test-time input of one image ([`Geometry::test`], then [`prepare`]), with its geometry: what evaluation
/// feeds the model for a dataset image and `trainer predict` for an image file.
pub fn prepare_test(image: &RgbImage, input: &InputConfig) -> Result<(Tensor, Geometry), DataError> {
    let geometry = Geometry::test(input, image.height, image.width);
    Ok((prepare(image, &geometry, input)?, geometry))
}

/// Zero-pads `[3, h, w]` float images into one `[N, 3, H, W]` float32 CPU batch whose sides are the largest ones
/// rounded up to a multiple of `divisibility`; returns it with each image's `(h, w)`.
///
/// The copy is plain memory work, no parallel libtorch operator: the loader's worker threads call this while the
/// training thread runs the model, and such an operator there would start a second OpenMP team on the same cores
/// (measured on the 2-core CI machine: about 0.6 s per demo step when padding used `zeros` and `copy_`, 0.38-0.51 s
/// with this copy, the same as before the pipeline existed).
pub fn pad(images: &[Tensor], divisibility: u32) -> (Tensor, Vec<(i64, i64)>) {
    pad_to_bucket(images, divisibility, &[])
}

/// [`pad`], then to the smallest (by area) of `buckets` (`[height, width]`, `input.train_pad_buckets`) that
/// holds the padded batch; a batch no bucket holds keeps its own padded size.
pub fn pad_to_bucket(images: &[Tensor], divisibility: u32, buckets: &[[u32; 2]]) -> (Tensor, Vec<(i64, i64)>) {
    let divisibility = i64::from(divisibility.max(1));
    let sizes: Vec<(i64, i64)> = images.iter().map(|t| (t.size()[1], t.size()[2])).collect();
    let round_up = |v: i64| (v + divisibility - 1) / divisibility * divisibility;
    let (max_h, max_w) = (
        round_up(sizes.iter().map(|s| s.0).max().unwrap_or(0)),
        round_up(sizes.iter().map(|s| s.1).max().unwrap_or(0)),
    );
    let (max_h, max_w) = buckets
        .iter()
        .map(|&[h, w]| (i64::from(h), i64::from(w)))
        .filter(|&(h, w)| h >= max_h && w >= max_w)
        .min_by_key(|&(h, w)| (h * w, h))
        .unwrap_or((max_h, max_w));
    let (max_h, max_w) = (max_h as usize, max_w as usize);
    let plane = max_h * max_w;
    let batch = Tensor::empty([images.len() as i64, 3, max_h as i64, max_w as i64], (Kind::Float, Device::Cpu));
    // SAFETY: `batch` is a freshly allocated, contiguous CPU float tensor of exactly this many elements, owned here
    // and not aliased while `buffer` lives; every element is written below (pixels or zero padding).
    let buffer: &mut [f32] =
        unsafe { std::slice::from_raw_parts_mut(batch.data_ptr() as *mut f32, images.len() * 3 * plane) };
    for ((image, &(h, w)), out) in images.iter().zip(&sizes).zip(buffer.chunks_exact_mut(3 * plane)) {
        let (h, w) = (h as usize, w as usize);
        // Shallow views when the image already is a contiguous CPU float32 tensor (the pipeline's output).
        let image = image.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        // SAFETY: `image` is a contiguous CPU float tensor of `3 * h * w` elements that outlives `pixels`.
        let pixels: &[f32] = unsafe { std::slice::from_raw_parts(image.data_ptr() as *const f32, 3 * h * w) };
        for (source, target) in pixels.chunks_exact(h * w).zip(out.chunks_exact_mut(plane)) {
            for (row, target_row) in source.chunks_exact(w).zip(target.chunks_exact_mut(max_w)) {
                target_row[..w].copy_from_slice(row);
                target_row[w..].fill(0.0);
            }
            target[h * max_w..].fill(0.0);
        }
    }
    (batch, sizes)
}

/// Normalises images that are already at their input size (`[3, H, W]` RGB, values 0..255, any kind) and pads
/// them into one batch ([`pad`]) on `device`; for benchmarks and tests that make their own pixels.
pub fn preprocess(
    images: &[Tensor],
    input: &InputConfig,
    device: Device,
) -> Result<(Tensor, Vec<(i64, i64)>), DataError> {
    if images.is_empty() {
        return Err(DataError::Loader("preprocess: no images".into()));
    }
    let normalization = Normalization::new(input);
    let mut normalized = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let size = image.size();
        if size.len() != 3 || size[0] != 3 || size[1] == 0 || size[2] == 0 {
            return Err(DataError::Loader(format!("preprocess: image {i} has shape {size:?}, expected [3, H, W]")));
        }
        normalized.push(normalization.tensor(&transfer::to_device(image, Device::Cpu)));
    }
    let (batch, sizes) = pad(&normalized, input.size_divisibility);
    Ok((transfer::to_device(&batch, device), sizes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResizeStyle;

    fn gradient(width: u32, height: u32) -> RgbImage {
        let data = (0..width * height * 3).map(|i| (i * 7 % 256) as u8).collect();
        RgbImage { width, height, data }
    }

    #[test]
    fn table_and_tensor_normalisations_agree_bit_for_bit() {
        let image = gradient(13, 9);
        for input in [
            InputConfig { format: PixelFormat::Bgr, pixel_mean: [103.53, 116.28, 123.675], ..Default::default() },
            InputConfig::torchvision(),
        ] {
            let normalization = Normalization::new(&input);
            let table = normalization.image(&image);
            let tensor = normalization.tensor(&rgb_tensor(&image));
            assert_eq!(table.size(), [3, 9, 13]);
            assert!(table.equal(&tensor), "{input:?}");
        }
    }

    #[test]
    fn torchvision_style_normalises_then_resizes_then_flips() {
        let image = gradient(20, 10);
        let input = InputConfig { min_size_test: 5, max_size_test: 100, ..InputConfig::torchvision() };
        let (x, geometry) = prepare_test(&image, &input).unwrap();
        assert_eq!(geometry.resized, (5, 10));
        let expected = Normalization::new(&input)
            .tensor(&rgb_tensor(&image))
            .unsqueeze(0)
            .upsample_bilinear2d([5, 10], false, None, None)
            .squeeze_dim(0);
        assert!(x.equal(&expected));
        let flipped = Geometry { flip: true, ..geometry };
        assert!(prepare(&image, &flipped, &input).unwrap().equal(&expected.flip([2])));
        assert_eq!(input.resize_style, ResizeStyle::Torchvision);
    }

    #[test]
    fn padding_rounds_up_and_fills_zeros() {
        let a = Tensor::ones([3, 5, 7], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([3, 9, 2], (Kind::Float, Device::Cpu));
        let (batch, sizes) = pad(&[a.shallow_clone(), b.shallow_clone()], 4);
        assert_eq!(batch.size(), [2, 3, 12, 8]);
        assert_eq!(sizes, [(5, 7), (9, 2)]);
        assert_eq!(batch.sum(Kind::Float).double_value(&[]), (3 * (35 + 18)) as f64);
        // Buckets: the smallest that holds the 12x8 batch; none holds it, its own size.
        let images = [a, b];
        let (bucketed, _) = pad_to_bucket(&images, 4, &[[16, 16], [12, 12], [8, 16], [20, 8]]);
        assert_eq!(bucketed.size(), [2, 3, 12, 12]);
        assert_eq!(bucketed.sum(Kind::Float).double_value(&[]), (3 * (35 + 18)) as f64);
        assert_eq!(pad_to_bucket(&images, 4, &[[8, 16]]).0.size(), [2, 3, 12, 8]);
        assert!(preprocess(
            &[Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu))],
            &InputConfig::default(),
            Device::Cpu
        )
        .is_err());
    }
}
