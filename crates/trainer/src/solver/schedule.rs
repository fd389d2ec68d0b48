//! detectron2's learning-rate schedules: warm-up followed by multi-step or cosine decay.

use super::config::{LrSchedulerKind, SolverConfig, WarmupMethod};

/// fvcore's `ParamScheduler.WHERE_EPSILON`, used by detectron2's composite and multi-step schedulers.
const WHERE_EPSILON: f64 = 1e-6;

/// detectron2's learning-rate schedule: `LRMultiplier(WarmupParamScheduler(MultiStep|Cosine))` evaluated at
/// `where = iteration / max_iter`, with the same floating-point operations in the same order.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    base_lr: f64,
    kind: LrSchedulerKind,
    max_iter: u64,
    steps: Vec<u64>,
    gamma: f64,
    cosine_end: f64,
    warmup_length: f64,
    warmup_factor: f64,
    warmup_method: WarmupMethod,
}

impl LrSchedule {
    /// The schedule of a (validated) solver config.
    pub fn new(config: &SolverConfig) -> Self {
        LrSchedule {
            base_lr: config.base_lr,
            kind: config.lr_scheduler,
            max_iter: config.max_iter,
            steps: config.steps.iter().copied().filter(|&s| s <= config.max_iter).collect(),
            gamma: config.gamma,
            cosine_end: config.base_lr_end / config.base_lr,
            warmup_length: (config.warmup_iters as f64 / config.max_iter as f64).min(1.0),
            warmup_factor: config.warmup_factor,
            warmup_method: config.warmup_method,
        }
    }

    /// The decay schedule without warm-up at `where` in [0, 1].
    fn main_schedule(&self, at: f64) -> f64 {
        match self.kind {
            LrSchedulerKind::Multistep => {
                let epoch = ((at + WHERE_EPSILON) * self.max_iter as f64) as u64;
                let index = self.steps.partition_point(|&milestone| milestone <= epoch);
                self.gamma.powf(index as f64)
            }
            LrSchedulerKind::Cosine => {
                let (start, end) = (1.0, self.cosine_end);
                end + 0.5 * (start - end) * (1.0 + (std::f64::consts::PI * at).cos())
            }
        }
    }

    /// The LR multiplier at `iteration` (the LR used by the optimizer step that finishes that iteration).
    pub fn multiplier(&self, iteration: u64) -> f64 {
        let at = iteration as f64 / self.max_iter as f64;
        if at + WHERE_EPSILON > self.warmup_length {
            return self.main_schedule(at);
        }
        let start = self.warmup_factor * self.main_schedule(0.0);
        match self.warmup_method {
            WarmupMethod::Constant => start,
            WarmupMethod::Linear => {
                let end = self.main_schedule(self.warmup_length);
                let progress = at / self.warmup_length;
                end * progress + start * (1.0 - progress)
            }
        }
    }

    /// The learning rate at `iteration`.
    pub fn lr(&self, iteration: u64) -> f64 {
        self.base_lr * self.multiplier(iteration)
    }
}
