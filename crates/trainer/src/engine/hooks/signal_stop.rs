//! The signal stop: SIGINT (Ctrl-C) or SIGTERM sets a flag that each rank reports in the step's agreement
//! ([`crate::engine::Trainer::run_step`]); once the ranks have agreed to stop before the last iteration, rank 0
//! saves a checkpoint of the last finished step and logs where, and the run ends as interrupted.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::engine::{Hook, Trainer};

/// Set by the signal handler; read once per step.
static STOP: AtomicBool = AtomicBool::new(false);

/// Saves and stops once the ranks agree to stop; see the module documentation.
pub struct SignalStop;

impl SignalStop {
    /// Installs the SIGINT/SIGTERM handler (once per process) and clears an earlier request; returns the hook
    /// and the flag the trainer's steps report.
    pub fn install() -> (SignalStop, &'static AtomicBool) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // A second handler cannot be installed in the same process (tests); the first one keeps working.
            let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst));
        });
        STOP.store(false, Ordering::SeqCst);
        (SignalStop, &STOP)
    }
}

/// Whether the run stops after `iteration` completed steps of `max_iter`: when the ranks agreed to, unless the
/// run is finished anyway (it then ends normally, with its final checkpoint).
fn stops(stop_agreed: bool, iteration: u64, max_iter: u64) -> bool {
    stop_agreed && iteration < max_iter
}

impl Hook for SignalStop {
    fn after_step(&mut self, trainer: &mut Trainer) -> anyhow::Result<()> {
        if !stops(trainer.stop_agreed, trainer.iteration, trainer.max_iter) {
            return Ok(());
        }
        // All ranks agreed on this iteration; the sampler state is the one after the last finished step.
        if trainer.logger.is_some() {
            let path = trainer.save_checkpoint()?;
            if let Some(logger) = &trainer.logger {
                logger.line(&format!("interrupted: saved {} at iteration {}", path.display(), trainer.iteration));
                logger.abandon();
            }
        }
        trainer.interrupted = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agreed_stop_ends_the_run_unless_it_is_finished() {
        assert!(stops(true, 3, 10));
        assert!(!stops(false, 3, 10));
        assert!(!stops(true, 10, 10), "the last iteration ends normally");
    }

    #[test]
    fn installing_clears_an_earlier_request() {
        let (_, flag) = SignalStop::install();
        flag.store(true, Ordering::SeqCst);
        let (_, flag) = SignalStop::install();
        assert!(!flag.load(Ordering::SeqCst));
    }
}
