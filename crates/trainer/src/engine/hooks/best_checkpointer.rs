//! The best-model hook: when rank 0 saved a checkpoint at the iteration of an evaluation, the checkpointer
//! compares that evaluation's `checkpoint.best_metric` with the best so far and copies the checkpoint to
//! `model_best` when it is better ([`crate::checkpoint::Checkpointer::update_best`]).

use std::collections::BTreeMap;
use std::path::Path;

use crate::engine::{Hook, Trainer};
use crate::evaluate::EvalOutcome;

/// Tracks the best checkpoint; runs after the evaluation and checkpoint hooks. See the module documentation.
pub struct BestCheckpointer;

/// The checkpoint and the metrics to rank it by after `iteration`: both must come from that iteration (an
/// evaluation without a checkpoint, or a checkpoint without an evaluation, ranks nothing).
fn candidate<'a>(
    iteration: u64,
    last_checkpoint: Option<&'a (u64, std::path::PathBuf)>,
    last_eval: Option<&'a (u64, EvalOutcome)>,
) -> Option<(&'a Path, &'a BTreeMap<String, f64>)> {
    match (last_checkpoint, last_eval) {
        (Some((saved_at, path)), Some((evaluated_at, outcome)))
            if *saved_at == iteration && *evaluated_at == iteration =>
        {
            Some((path, &outcome.metrics))
        }
        _ => None,
    }
}

impl Hook for BestCheckpointer {
    fn after_step(&mut self, trainer: &mut Trainer) -> anyhow::Result<()> {
        if !trainer.group.is_main() {
            return Ok(());
        }
        if let Some((path, metrics)) =
            candidate(trainer.iteration, trainer.last_checkpoint.as_ref(), trainer.last_eval.as_ref())
        {
            trainer.checkpointer.update_best(path, metrics)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn only_a_checkpoint_and_an_evaluation_of_the_same_iteration_are_ranked() {
        let outcome = EvalOutcome { metrics: [("segm/AP".to_string(), 0.3)].into(), ..EvalOutcome::default() };
        let eval = (20, outcome);
        let saved = (20, PathBuf::from("out/model_0000020"));
        let (path, metrics) = candidate(20, Some(&saved), Some(&eval)).expect("both at iteration 20");
        assert_eq!(path, Path::new("out/model_0000020"));
        assert_eq!(metrics["segm/AP"], 0.3);
        // An older evaluation, an older checkpoint, or either missing: nothing to rank.
        assert!(candidate(21, Some(&(21, PathBuf::from("out/model_0000021"))), Some(&eval)).is_none());
        assert!(candidate(21, Some(&saved), Some(&(21, EvalOutcome::default()))).is_none());
        assert!(candidate(20, None, Some(&eval)).is_none());
        assert!(candidate(20, Some(&saved), None).is_none());
    }
}
