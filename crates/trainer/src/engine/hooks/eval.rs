//! The evaluation hook: every `eval.period` iterations and, with `eval.at_end`, after the last one, every rank
//! evaluates its shard of the validation split, with the EMA weights swapped in when `eval.use_ema` is set (rank 0
//! computes the COCO metrics and writes the results under `output_dir/inference`); rank 0 logs the report and
//! metrics, and the outcome is kept on the trainer for the best-model hook and the run's outcome.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use data::coco::CocoDataset;

use crate::coco_eval::GroundTruth;
use crate::config::{Config, EvalConfig};
use crate::engine::{Hook, Trainer};
use crate::evaluate::evaluate;

/// Evaluates periodically; see the module documentation.
pub struct EvalHook<'a> {
    config: &'a Config,
    val_set: Arc<CocoDataset>,
    /// The validation ground truth, on rank 0 only.
    gt: Option<GroundTruth>,
    results_dir: PathBuf,
}

impl<'a> EvalHook<'a> {
    /// Evaluates `val_set` as `config` says (rank 0 passes the ground truth `gt`, the other ranks `None`).
    pub fn new(config: &'a Config, val_set: Arc<CocoDataset>, gt: Option<GroundTruth>) -> Self {
        let results_dir = config.output_dir.join("inference");
        EvalHook { config, val_set, gt, results_dir }
    }
}

/// Whether an evaluation runs after `iteration` completed steps of `max_iter`.
fn is_due(eval: &EvalConfig, iteration: u64, max_iter: u64) -> bool {
    (eval.period > 0 && iteration.is_multiple_of(eval.period)) || (iteration == max_iter && eval.at_end)
}

impl Hook for EvalHook<'_> {
    /// Evaluations follow a read, so that a failed step stops the run before the model is evaluated.
    fn needs_read(&self, trainer: &Trainer, iteration: u64) -> bool {
        is_due(&self.config.eval, iteration, trainer.max_iter)
    }

    fn after_step(&mut self, trainer: &mut Trainer) -> anyhow::Result<()> {
        let iteration = trainer.iteration;
        if !is_due(&self.config.eval, iteration, trainer.max_iter) {
            return Ok(());
        }
        let rank = trainer.group.rank();
        let run = || {
            evaluate(
                &trainer.model,
                self.config,
                self.val_set.clone(),
                self.gt.as_ref(),
                trainer.device,
                Some(&self.results_dir),
                &trainer.group,
            )
        };
        let outcome = match trainer.ema.as_ref().filter(|_| self.config.eval.use_ema) {
            Some(ema) => {
                if trainer.group.is_main() {
                    log::info!("evaluating the EMA of the weights (eval.use_ema)");
                }
                ema.with_weights(run)?
            }
            None => run(),
        }
        .with_context(|| format!("rank {rank}: iteration {iteration}: evaluation"))?;
        if let Some(logger) = &mut trainer.logger {
            logger.eval(iteration, &outcome)?;
        }
        trainer.last_eval = Some((iteration, outcome));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluations_follow_the_period_and_the_end() {
        let config = |period, at_end| EvalConfig { period, at_end, ..EvalConfig::default() };
        let due = |eval: &EvalConfig| (1..=10).filter(|&i| is_due(eval, i, 10)).collect::<Vec<_>>();
        assert_eq!(due(&config(4, true)), [4, 8, 10]);
        assert_eq!(due(&config(4, false)), [4, 8]);
        assert_eq!(due(&config(0, true)), [10]);
        assert_eq!(due(&config(0, false)), Vec::<u64>::new());
        assert_eq!(due(&config(5, true)), [5, 10]);
    }
}
