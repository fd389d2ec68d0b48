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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// COCO instances JSON file(s).
    pub annotations: OneOrMany,
    /// Image root folder(s), one per annotation file.
    pub images: OneOrMany,
}

impl SplitConfig {
    /// Pairs of (annotation file, image root), checking that both lists have the same length.
    pub fn sources(&self, split: &str) -> Result<Vec<(PathBuf, PathBuf)>, DataError> {
        let annotations = self.annotations.to_vec();
        let images = self.images.to_vec();
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
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    /// Output folder (gets `annotations/instances_{train,val}.json`, `train/`, `val/`).
    pub out: PathBuf,
    /// Number of training images.
    #[serde(default = "default_synth_train")]
    pub train: usize,
    /// Number of validation images.
    #[serde(default = "default_synth_val")]
    pub val: usize,
    /// Image side in pixels (square images).
    #[serde(default = "default_synth_size")]
    pub size: u32,
    /// Seed; the same seed gives byte-identical files.
    #[serde(default)]
    pub seed: u64,
}

fn default_synth_train() -> usize {
    300
}
fn default_synth_val() -> usize {
    50
}
fn default_synth_size() -> u32 {
    160
}

/// The `[data]` section: where the datasets are and how they are loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training split.
    pub train: SplitConfig,
    /// Validation split.
    pub val: SplitConfig,
    /// Policy for missing, truncated, corrupt or wrongly sized images.
    #[serde(default)]
    pub missing_images: MissingImagePolicy,
    /// Accept `file_name`s that leave their image folder (absolute paths, `..` components). Off by default: a
    /// dataset from elsewhere cannot make the trainer read files outside the configured image roots.
    #[serde(default)]
    pub allow_outside_image_root: bool,
    /// Drop training images with no non-crowd annotation (detectron2 default: true).
    #[serde(default = "default_true")]
    pub filter_empty: bool,
    /// Loader worker threads (0 loads in the calling thread; at most [`MAX_NUM_WORKERS`]).
    #[serde(default = "default_num_workers")]
    pub num_workers: usize,
    /// Batches prepared ahead of the consumer.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Batch landscape and portrait images separately.
    #[serde(default = "default_true")]
    pub aspect_ratio_grouping: bool,
    /// Generate the synthetic dataset here when its annotation files are missing.
    #[serde(default)]
    pub synth: Option<SynthConfig>,
}

fn default_true() -> bool {
    true
}
fn default_num_workers() -> usize {
    4
}
fn default_prefetch() -> usize {
    4
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

/// Large-scale jitter (`[input.lsj]`): resize by a random scale of `size`, then a fixed `size` x `size` crop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LsjConfig {
    /// Use LSJ instead of the shorter-side resize for training.
    #[serde(default)]
    pub enabled: bool,
    /// Smallest scale of `size`.
    #[serde(default = "default_lsj_min")]
    pub min_scale: f64,
    /// Largest scale of `size`.
    #[serde(default = "default_lsj_max")]
    pub max_scale: f64,
    /// Target and crop size in pixels.
    #[serde(default = "default_lsj_size")]
    pub size: u32,
}

fn default_lsj_min() -> f64 {
    0.1
}
fn default_lsj_max() -> f64 {
    2.0
}
fn default_lsj_size() -> u32 {
    1024
}

impl Default for LsjConfig {
    fn default() -> Self {
        LsjConfig {
            enabled: false,
            min_scale: default_lsj_min(),
            max_scale: default_lsj_max(),
            size: default_lsj_size(),
        }
    }
}

/// The `[input]` section: resize, augmentation and normalisation (detectron2 `INPUT.*` and pixel statistics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Shorter-side sizes for training; one is chosen uniformly per image.
    #[serde(default = "default_min_size_train")]
    pub min_size_train: Vec<u32>,
    /// Longest side after the training resize.
    #[serde(default = "default_max_size")]
    pub max_size_train: u32,
    /// Shorter side for evaluation.
    #[serde(default = "default_min_size_test")]
    pub min_size_test: u32,
    /// Longest side for evaluation.
    #[serde(default = "default_max_size")]
    pub max_size_test: u32,
    /// Probability of a horizontal flip in training.
    #[serde(default = "default_flip_prob")]
    pub flip_prob: f64,
    /// Large-scale jitter.
    #[serde(default)]
    pub lsj: LsjConfig,
    /// Channel order of the tensor.
    #[serde(default)]
    pub format: PixelFormat,
    /// Per-channel mean in 0-255 units, in `format` order.
    #[serde(default = "default_pixel_mean")]
    pub pixel_mean: [f32; 3],
    /// Per-channel standard deviation in 0-255 units, in `format` order.
    #[serde(default = "default_pixel_std")]
    pub pixel_std: [f32; 3],
    /// Batches are padded to a multiple of this.
    #[serde(default = "default_size_divisibility")]
    pub size_divisibility: u32,
}

fn default_min_size_train() -> Vec<u32> {
    (640..=800).step_by(32).collect()
}
fn default_max_size() -> u32 {
    1333
}
fn default_min_size_test() -> u32 {
    800
}
fn default_flip_prob() -> f64 {
    0.5
}
fn default_pixel_mean() -> [f32; 3] {
    [123.675, 116.28, 103.53]
}
fn default_pixel_std() -> [f32; 3] {
    [58.395, 57.12, 57.375]
}
fn default_size_divisibility() -> u32 {
    32
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            min_size_train: default_min_size_train(),
            max_size_train: default_max_size(),
            min_size_test: default_min_size_test(),
            max_size_test: default_max_size(),
            flip_prob: default_flip_prob(),
            lsj: LsjConfig::default(),
            format: PixelFormat::default(),
            pixel_mean: default_pixel_mean(),
            pixel_std: default_pixel_std(),
            size_divisibility: default_size_divisibility(),
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
        if self.size_divisibility == 0 {
            return bad("size_divisibility", "must be at least 1");
        }
        let lsj = &self.lsj;
        if lsj.enabled && !(lsj.min_scale > 0.0 && lsj.min_scale <= lsj.max_scale && lsj.size > 0) {
            return bad("lsj", "needs 0 < min_scale <= max_scale and size > 0");
        }
        Ok(())
    }
}
