//! The checkpoint hook: rank 0 saves a checkpoint whenever the checkpointer says one is due
//! ([`crate::checkpoint::Checkpointer::is_due`]: every `checkpoint.period` iterations and at the last one).

use crate::checkpoint::Checkpointer;
use crate::engine::{Hook, Trainer};

/// Saves due checkpoints on rank 0; see the module documentation.
pub struct PeriodicCheckpointer;

/// Whether a rank (`main`: rank 0) saves after `iteration` completed steps of `max_iter`: rank 0 only, when due.
fn saves(main: bool, checkpointer: &Checkpointer, iteration: u64, max_iter: u64) -> bool {
    main && checkpointer.is_due(iteration, max_iter)
}

impl Hook for PeriodicCheckpointer {
    /// Every rank reads before a checkpoint, so that a failed step stops the run before it is saved.
    fn needs_read(&self, trainer: &Trainer, iteration: u64) -> bool {
        trainer.checkpointer.is_due(iteration, trainer.max_iter)
    }

    fn after_step(&mut self, trainer: &mut Trainer) -> anyhow::Result<()> {
        if saves(trainer.group.is_main(), &trainer.checkpointer, trainer.iteration, trainer.max_iter) {
            trainer.save_checkpoint()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::checkpoint::CheckpointConfig;

    #[test]
    fn rank_0_saves_every_period_and_at_the_end() {
        let config = CheckpointConfig { period: 4, ..CheckpointConfig::default() };
        let checkpointer = Checkpointer::new(Path::new("unused"), &config);
        let saved: Vec<u64> = (1..=10).filter(|&i| saves(true, &checkpointer, i, 10)).collect();
        assert_eq!(saved, [4, 8, 10]);
        assert!((1..=10).all(|i| !saves(false, &checkpointer, i, 10)), "only rank 0 saves");
        let end_only = Checkpointer::new(Path::new("unused"), &CheckpointConfig { period: 0, ..config });
        assert_eq!((1..=10).filter(|&i| saves(true, &end_only, i, 10)).collect::<Vec<_>>(), [10]);
    }
}
