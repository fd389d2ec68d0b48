//! The training engine, after detectron2's `engine/{train_loop,hooks}`: a [`Trainer`] that owns the model,
//! solver, loader and rank group and runs training steps, and the [`Hook`]s it calls before training, after every
//! step and after training (logging, evaluation, checkpoints, the best model, the signal stop and the final
//! rank barrier). [`crate::train::train`] builds both and runs them.

pub mod hooks;
mod logger;
mod train_loop;

pub use logger::Logger;
pub use train_loop::{forward_backward, read_step, CheckpointInfo, Hook, StepLosses, TrainOutcome, Trainer};
