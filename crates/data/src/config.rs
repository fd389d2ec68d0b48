//! Serde types for the `[data]` and `[input]` sections of the trainer TOML.
//!
//! Key paths are stable: `data.train.annotations`, `data.train.images`, `data.val.annotations`,
//! `data.val.images` (each a string or a list of equal length, concatenated in order). Unknown keys are errors so
//! that a typo never silently falls back to a default.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// One path or a list of paths; a list concatenates several datasets in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single path.
    One(PathBuf),
    /// Several paths, concatenated in order.
    Many(Vec<PathBuf>),
}

impl OneOrMany {
    /// The paths as a list (a single path gives a list of one).
    pub fn to_vec(&self) -> Vec<PathBuf> {
        match self {
            OneOrMany::One(path) => vec![path.clone()],
            OneOrMany::Many(paths) => paths.clone(),
        }
    }
}

/// A split (train or val): COCO instances JSON files and the image folders their `file_name`s are relative to.
/// Empty by default; a command that reads the split refuses an empty one, naming its keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// COCO instances JSON file(s).
    pub annotations: OneOrMany,
    /// Image root folder(s), one per annotation file.
    pub images: OneOrMany,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig { annotations: OneOrMany::Many(Vec::new()), images: OneOrMany::Many(Vec::new()) }
    }
}

impl SplitConfig {
    /// Pairs of (annotation file, image root), checking that both lists have the same length.
    pub fn sources(&self, split: &str) -> Result<Vec<(PathBuf, PathBuf)>, DataError> {
        let annotations = self.annotations.to_vec();
        let images = self.images.to_vec();
        if annotations.is_empty() && images.is_empty() {
            return Err(DataError::Config(format!(
                "data.{split} is not set: give data.{split}.annotations (COCO instances JSON) and data.{split}.images \
                 (their image folder), in the config or with --set"
            )));
        }
        if annotations.len() != images.len() || annotations.is_empty() {
            return Err(DataError::Config(format!(
                "data.{split}.annotations has {} entries but data.{split}.images has {}; they must be non-empty and \
                 of equal length",
                annotations.len(),
                images.len()
            )));
        }
        Ok(annotations.into_iter().zip(images).collect())
    }
}

/// What to do with an image whose file is missing, truncated or corrupt (does not decode completely), or disagrees
/// with the JSON size (`data.missing_images`; the name predates the other cases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingImagePolicy {
    /// Stop with an error naming the file and image id (default).
    #[default]
    Error,
    /// Drop the image with a warning naming it, and count it (printed at the start of training and logged as
    /// `skipped_images` in the metrics).
    Skip,
}

/// Most loader worker threads `data.num_workers` accepts. Batches do not depend on the worker count, so more
/// workers only add threads, memory and contention; thousands of threads exhaust the process instead.
pub const MAX_NUM_WORKERS: usize = 256;

/// Settings for generating the built-in synthetic dataset on first use (`[data.synth]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    /// Output folder (gets `annotations/instances_{train,val}.json`, `train/`, `val/`).
    pub out: PathBuf,
    /// Number of training images.
    pub train: usize,
    /// Number of validation images.
    pub val: usize,
    /// Image side in pixels (square images).
    pub size: u32,
    /// Seed; the same seed gives byte-identical files.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig { out: PathBuf::from("datasets/shapes"), train: 300, val: 50, size: 160, seed: 0 }
    }
}

/// The `[data]` section: where the datasets are and how they are loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training split.
    pub train: SplitConfig,
    /// Validation split.
    pub val: SplitConfig,
    /// Policy for missing, truncated, corrupt or wrongly sized images.
    pub missing_images: MissingImagePolicy,
    /// Accept `file_name`s that leave their image folder (absolute paths, `..` components). Off by default: a
    /// dataset from elsewhere cannot make the trainer read files outside the configured image roots.
    pub allow_outside_image_root: bool,
    /// Drop training images with no non-crowd annotation (detectron2 default: true).
    pub filter_empty: bool,
    /// Loader worker threads (0 loads in the calling thread; at most [`MAX_NUM_WORKERS`]).
    pub num_workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Batch landscape and portrait images separately.
    pub aspect_ratio_grouping: bool,
    /// Generate the synthetic dataset here when its annotation files are missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synth: Option<SynthConfig>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: SplitConfig::default(),
            val: SplitConfig::default(),
            missing_images: MissingImagePolicy::default(),
            allow_outside_image_root: false,
            filter_empty: true,
            num_workers: 4,
            prefetch: 4,
            aspect_ratio_grouping: true,
            synth: None,
        }
    }
}

/// Channel order of the normalised image tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PixelFormat {
    /// Red, green, blue (torchvision).
    #[default]
    Rgb,
    /// Blue, green, red (detectron2/Caffe2 weights).
    Bgr,
}

/// How images are resized, in training, evaluation and prediction alike: the rounding of the new size and the
/// interpolation of the pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeStyle {
    /// detectron2's `ResizeShortestEdge`: sizes rounded to the nearest integer; the 8-bit image resized bilinearly
    /// with antialiasing (PIL's `Image.resize(BILINEAR)`), then normalised.
    #[default]
    Detectron2,
    /// torchvision's `GeneralizedRCNNTransform`: a float32 scale factor, sizes floored; the image normalised first,
    /// then resized with `interpolate(mode="bilinear", align_corners=False)`.
    Torchvision,
}

/// How instance masks reach the detector (detectron2 `INPUT.MASK_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskFormat {
    /// Polygons, rasterised inside each foreground RoI on the host during the step (detectron2's default and its
    /// exact mask targets).
    #[default]
    Polygon,
    /// Full-image bitmaps rasterised once per image by the loader workers, cropped and resized per RoI with
    /// RoIAlign on the device: no host work or host read in the step, slightly different targets at mask edges.
    Bitmask,
}

/// Large-scale jitter (`[input.lsj]`): resize by a random scale of `size`, then a fixed `size` x `size` crop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LsjConfig {
    /// Use LSJ instead of the shorter-side resize for training.
    pub enabled: bool,
    /// Smallest scale of `size`.
    pub min_scale: f64,
    /// Largest scale of `size`.
    pub max_scale: f64,
    /// Target and crop size in pixels.
    pub size: u32,
}

impl Default for LsjConfig {
    fn default() -> Self {
        LsjConfig { enabled: false, min_scale: 0.1, max_scale: 2.0, size: 1024 }
    }
}

/// The `[input]` section: the one description of how an image becomes the network's input, used by training,
/// evaluation, prediction and benchmarks (detectron2 `INPUT.*` plus the pixel statistics): resize, augmentation,
/// normalisation and padding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// Shorter-side sizes for training; one is chosen uniformly per image.
    pub min_size_train: Vec<u32>,
    /// Longest side after the training resize.
    pub max_size_train: u32,
    /// Shorter side for evaluation and prediction.
    pub min_size_test: u32,
    /// Longest side for evaluation and prediction.
    pub max_size_test: u32,
    /// Size rounding and pixel interpolation of every resize.
    pub resize_style: ResizeStyle,
    /// Probability of a horizontal flip in training.
    pub flip_prob: f64,
    /// Large-scale jitter.
    pub lsj: LsjConfig,
    /// Channel order of the tensor.
    pub format: PixelFormat,
    /// Largest pixel value `pixel_mean` and `pixel_std` are expressed in: 255 (detectron2) or 1 (torchvision,
    /// whose images are divided by 255 first).
    pub value_range: f64,
    /// Per-channel mean in `value_range` units, in `format` order.
    pub pixel_mean: [f32; 3],
    /// Per-channel standard deviation in `value_range` units, in `format` order.
    pub pixel_std: [f32; 3],
    /// Batches are padded to a multiple of this.
    pub size_divisibility: u32,
    /// Polygon targets rasterised per RoI in the step, or full-image bitmaps from the loader.
    pub mask_format: MaskFormat,
    /// `[height, width]` sizes that training batches are padded to: each batch takes the smallest (by area) that
    /// holds it after `size_divisibility`, so a run sees a few fixed input shapes (for CUDA graphs and cached
    /// per-shape constants) instead of one per batch. Empty: detectron2's padding to the batch's own size.
    /// Evaluation always uses detectron2's padding.
    pub train_pad_buckets: Vec<[u32; 2]>,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            min_size_train: (640..=800).step_by(32).collect(),
            max_size_train: 1333,
            min_size_test: 800,
            max_size_test: 1333,
            resize_style: ResizeStyle::Detectron2,
            flip_prob: 0.5,
            lsj: LsjConfig::default(),
            format: PixelFormat::Rgb,
            value_range: 255.0,
            pixel_mean: [123.675, 116.28, 103.53],
            pixel_std: [58.395, 57.12, 57.375],
            size_divisibility: 32,
            mask_format: MaskFormat::Polygon,
            train_pad_buckets: Vec::new(),
        }
    }
}

impl InputConfig {
    /// Checks value ranges; errors name the offending key.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |key: &str, why: &str| Err(DataError::Config(format!("input.{key}: {why}")));
        if self.min_size_train.is_empty() || self.min_size_train.contains(&0) {
            return bad("min_size_train", "must be a non-empty list of positive sizes");
        }
        if self.max_size_train == 0 || self.max_size_test == 0 || self.min_size_test == 0 {
            return bad("max_size_train/min_size_test/max_size_test", "must be positive");
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            return bad("flip_prob", "must be in [0, 1]");
        }
        if self.pixel_std.iter().any(|s| *s <= 0.0) {
            return bad("pixel_std", "must be positive");
        }
        if self.value_range.is_nan() || self.value_range <= 0.0 {
            return bad("value_range", "must be positive (255 or 1)");
        }
        if self.size_divisibility == 0 {
            return bad("size_divisibility", "must be at least 1");
        }
        let lsj = &self.lsj;
        if lsj.enabled && !(lsj.min_scale > 0.0 && lsj.min_scale <= lsj.max_scale && lsj.size > 0) {
            return bad("lsj", "needs 0 < min_scale <= max_scale and size > 0");
        }
        self.validate_pad_buckets()
    }

    /// Every bucket is a positive multiple of `size_divisibility`, and the largest training image fits one in
    /// landscape and one in portrait (so no batch is left unbucketed).
    fn validate_pad_buckets(&self) -> Result<(), DataError> {
        if self.train_pad_buckets.is_empty() {
            return Ok(());
        }
        let divisibility = self.size_divisibility;
        if let Some(bucket) =
            self.train_pad_buckets.iter().find(|b| b.iter().any(|&side| side == 0 || side % divisibility != 0))
        {
            return Err(DataError::Config(format!(
                "input.train_pad_buckets: {bucket:?} is not a pair of positive multiples of input.size_divisibility \
                 = {divisibility}"
            )));
        }
        let round_up = |v: u32| v.div_ceil(divisibility) * divisibility;
        let (short, long) = if self.lsj.enabled {
            (self.lsj.size, self.lsj.size)
        } else {
            let largest_min = self.min_size_train.iter().copied().max().unwrap_or(0);
            (largest_min.min(self.max_size_train), self.max_size_train)
        };
        let (short, long) = (round_up(short), round_up(long));
        let fits = |[h, w]: [u32; 2]| self.train_pad_buckets.iter().any(|b| b[0] >= h && b[1] >= w);
        for needed in [[short, long], [long, short]] {
            if !fits(needed) {
                return Err(DataError::Config(format!(
                    "input.train_pad_buckets: no bucket holds a {}x{} batch (height x width), the largest a training \
                     image can take with input.min_size_train, max_size_train and size_divisibility; add one",
                    needed[0], needed[1]
                )));
            }
        }
        Ok(())
    }

    /// torchvision's `GeneralizedRCNNTransform` of its COCO detection models: RGB divided by 255, ImageNet mean
    /// and std, shorter side 800 (longer at most 1333) with torchvision's rounding and interpolation, padding to 32.
    pub fn torchvision() -> Self {
        InputConfig {
            resize_style: ResizeStyle::Torchvision,
            format: PixelFormat::Rgb,
            value_range: 1.0,
            pixel_mean: [0.485, 0.456, 0.406],
            pixel_std: [0.229, 0.224, 0.225],
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_buckets_must_hold_the_largest_training_batch_both_ways() {
        let input = |buckets: Vec<[u32; 2]>| InputConfig { train_pad_buckets: buckets, ..InputConfig::default() };
        // Shorter side up to 800, longer up to 1333 -> 1344 after rounding to 32.
        assert!(input(vec![[800, 1344], [1344, 800]]).validate().is_ok());
        assert!(input(vec![[1344, 1344]]).validate().is_ok());
        assert!(input(Vec::new()).validate().is_ok());
        let message = input(vec![[800, 1344]]).validate().unwrap_err().to_string();
        assert!(message.contains("input.train_pad_buckets") && message.contains("1344x800"), "{message}");
        let message = input(vec![[800, 1344], [1344, 800], [100, 0]]).validate().unwrap_err().to_string();
        assert!(message.contains("[100, 0]") && message.contains("size_divisibility"), "{message}");
        let lsj = InputConfig {
            lsj: LsjConfig { enabled: true, size: 1024, ..LsjConfig::default() },
            ..input(vec![[1024, 1024]])
        };
        assert!(lsj.validate().is_ok());
    }
}
