//! The end-of-run agreement between ranks: after the last step (or an agreed stop) every rank waits at a
//! barrier, so that no rank leaves (and tears down the process group) while rank 0 still writes its final
//! checkpoint, evaluation or log lines. The per-iteration agreement (losses and the stop flag) is part of the
//! step ([`crate::engine::Trainer::run_step`]).

use anyhow::Context;

use crate::engine::{Hook, Trainer};

/// Waits for every rank at the end of training; runs last. See the module documentation.
pub struct RankBarrier;

/// What the ranks were doing at the barrier, for its error: `stopping` after an interruption, else `finishing`.
fn barrier_context(rank: usize, iteration: u64, interrupted: bool) -> String {
    let what = if interrupted { "stopping" } else { "finishing" };
    format!("rank {rank}: iteration {iteration}: {what}")
}

impl Hook for RankBarrier {
    fn after_train(&mut self, trainer: &mut Trainer) -> anyhow::Result<()> {
        let (rank, iteration, interrupted) = (trainer.group.rank(), trainer.iteration, trainer.interrupted);
        trainer.group.barrier().with_context(|| barrier_context(rank, iteration, interrupted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_errors_say_whether_the_run_stopped_or_finished() {
        assert_eq!(barrier_context(1, 40, true), "rank 1: iteration 40: stopping");
        assert_eq!(barrier_context(0, 90_000, false), "rank 0: iteration 90000: finishing");
    }
}
