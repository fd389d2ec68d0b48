//! COCO datasets, masks, transforms and augmentation, batching, samplers, the parallel loader and the synthetic
//! dataset used as the built-in default.
//!
//! Flow: [`config::DataConfig`] / [`config::InputConfig`] (the `[data]` and `[input]` TOML sections) →
//! [`coco::CocoDataset::load_split`] → [`sampler::TrainSampler`] → [`loader::Loader`] yielding [`batch::Batch`].
//! [`coco::check`] backs `trainer data check`, [`synth::generate`] backs `trainer data synth`.

pub mod batch;
pub mod check;
pub mod coco;
mod coco_json;
pub mod config;
pub mod decode;
pub mod error;
pub mod loader;
pub mod rng;
pub mod sampler;
pub mod synth;
pub mod transform;

pub use batch::{Batch, Target, TargetMask};
pub use coco::{check, load_train, load_val, CategoryMap, CheckReport, CocoDataset, LoadOptions};
pub use config::{DataConfig, InputConfig, MissingImagePolicy, PixelFormat};
pub use error::DataError;
pub use loader::{Loader, LoaderOptions};
pub use sampler::{SamplerState, TrainSampler};
pub use synth::{generate as generate_synthetic, SynthOptions};
