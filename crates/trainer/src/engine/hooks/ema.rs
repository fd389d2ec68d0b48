//! The EMA hook: moves the exponential moving average of the weights ([`crate::solver::ModelEma`]) towards the
//! new weights after every step, before any other hook evaluates or saves them. Every rank updates its own copy
//! from identical weights (the gradients are averaged), so the ranks keep identical averages.

use crate::engine::{Hook, Trainer};

/// Updates [`Trainer::ema`] after every step; see the module documentation.
pub struct EmaUpdater;

impl Hook for EmaUpdater {
    fn after_step(&mut self, trainer: &mut Trainer) -> anyhow::Result<()> {
        if let Some(ema) = &mut trainer.ema {
            ema.update()?;
        }
        Ok(())
    }
}
