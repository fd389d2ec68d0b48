//! The hooks of a training run, each one job, in the order [`crate::train::train`] runs them after a step:
//! the EMA update, logging, evaluation, periodic checkpoints, the best model, the signal stop, and the final rank
//! barrier.

mod best_checkpointer;
mod ema;
mod eval;
mod periodic_checkpointer;
mod periodic_writer;
mod rank_barrier;
mod signal_stop;

pub use best_checkpointer::BestCheckpointer;
pub use ema::EmaUpdater;
pub use eval::EvalHook;
pub use periodic_checkpointer::PeriodicCheckpointer;
pub use periodic_writer::PeriodicWriter;
pub use rank_barrier::RankBarrier;
pub use signal_stop::SignalStop;
