//! The training engine, after detectron2's `engine/{train_loop,hooks}`: a [`Trainer`] that owns the model,
//! solver, loader and rank group and runs training steps, and the [`Hook`]s it calls before training, after every
//! step and after training (logging, evaluation, checkpoints, the best model, the signal stop and the final
//! rank barrier). [`crate::train::train`] builds both and runs them.

mod feed;
pub mod hooks;
mod logger;
mod step;
mod train_loop;

pub use feed::DeviceFeed;
pub use logger::Logger;
pub use step::{forward_backward, forward_backward_prepared, FailedStep, StepLog, StepLosses, StepRead};
pub use train_loop::{CheckpointInfo, Hook, TrainOutcome, Trainer};
