//! The vovdet trainer library behind the `trainer` binary: configuration, device selection, model analysis
//! and benchmarks (training, evaluation and checkpoints join as their issues land).

pub mod bench;
pub mod config;
pub mod convert;
pub mod device;
pub mod info;
pub mod solver;
pub mod checkpoint;
pub mod events;
pub mod coco_eval;
