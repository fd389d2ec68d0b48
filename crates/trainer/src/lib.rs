//! The vovdet trainer library behind the `trainer` binary: configuration, device selection, the training loop with
//! exact resume, solver, checkpoints, logging, COCO evaluation, model analysis, conversion and benchmarks.

pub mod autocast;
pub mod bench;
pub mod checkpoint;
mod checkpoint_error;
mod coco_error;
pub mod coco_eval;
mod coco_gt;
mod coco_results;
pub mod config;
pub mod convert;
pub mod datasets;
pub mod device;
pub mod distributed;
mod durable;
pub mod engine;
pub mod evaluate;
pub mod events;
pub mod gradients;
pub mod info;
pub mod layout;
pub mod manifest;
pub mod memory;
pub mod model;
pub mod notices;
pub mod op_count;
pub mod panics;
pub mod placement;
pub mod predict;
pub mod report;
mod shim;
pub mod solver;
pub mod sync_debug;
pub mod synthetic;
pub mod train;
pub mod visualize;
pub mod weights;
