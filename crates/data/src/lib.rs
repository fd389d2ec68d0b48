//! COCO datasets, masks, transforms and augmentation, batching, samplers, the parallel loader and the synthetic
//! dataset used as the built-in default.
//!
//! Flow: [`config::DataConfig`] / [`config::InputConfig`] (the `[data]` and `[input]` TOML sections) →
//! [`coco::CocoDataset::load_split`] → [`sampler::TrainSampler`] → [`loader::Loader`] yielding [`batch::Batch`],
//! each image made into the network's input by [`pixels`] (also used directly by `trainer predict`).
//! [`check::check`] backs `trainer data check`, [`synth::generate`] backs `trainer data synth`.

pub mod batch;
pub mod categories;
pub mod check;
pub mod coco;
mod coco_json;
pub mod config;
pub mod decode;
pub mod error;
pub mod loader;
pub mod pixels;
pub mod raster;
pub mod rng;
pub mod sample;
pub mod sampler;
pub mod synth;
pub mod transform;

pub use batch::{Batch, Target, TargetMasks};
pub use check::{check, CheckReport};
pub use coco::{CategoryMap, CocoDataset, LabelLayout, LoadOptions};
pub use config::{DataConfig, InputConfig, MissingImagePolicy, PixelFormat, ResizeStyle};
pub use error::DataError;
pub use loader::{Loader, LoaderOptions};
pub use sampler::{SamplerState, TrainSampler};
pub use synth::{generate as generate_synthetic, SynthOptions};
