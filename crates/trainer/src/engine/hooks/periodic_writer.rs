//! The periodic log hook: every `log.period` iterations and at the last one, rank 0 writes the losses, learning
//! rate and timing (averaged over the iterations since the previous line) to the console, `metrics.jsonl` and
//! TensorBoard through the trainer's [`crate::engine::Logger`], and keeps the progress bar moving.

use std::time::Instant;

use tch::Device;

use crate::engine::{Hook, Trainer};

/// Writes the periodic iteration line; see the module documentation.
pub struct PeriodicWriter {
    /// `log.period` (0 is treated as 1).
    period: u64,
    /// Total images per step (for images per second).
    ims_per_batch: u64,
    /// Training images skipped while loading the split (the loader adds the ones it skips).
    skipped_at_load: usize,
    /// Start of the current timing window.
    window_start: Instant,
    /// Seconds spent waiting for data in the current window.
    data_seconds: f64,
    /// Steps in the current window.
    window_iters: u64,
}

impl PeriodicWriter {
    /// A writer every `period` iterations for steps of `ims_per_batch` images, on a split that skipped
    /// `skipped_at_load` images when loaded.
    pub fn new(period: u64, ims_per_batch: u64, skipped_at_load: usize) -> Self {
        PeriodicWriter {
            period,
            ims_per_batch,
            skipped_at_load,
            window_start: Instant::now(),
            data_seconds: 0.0,
            window_iters: 0,
        }
    }

    /// Whether the line of `iteration` (completed steps) is written in a run of `max_iter`.
    fn is_due(&self, iteration: u64, max_iter: u64) -> bool {
        iteration.is_multiple_of(self.period.max(1)) || iteration == max_iter
    }
}

impl Hook for PeriodicWriter {
    fn needs_read(&self, trainer: &Trainer, iteration: u64) -> bool {
        self.is_due(iteration, trainer.max_iter)
    }

    fn before_train(&mut self, _trainer: &mut Trainer) -> anyhow::Result<()> {
        self.window_start = Instant::now();
        Ok(())
    }

    fn after_step(&mut self, trainer: &mut Trainer) -> anyhow::Result<()> {
        self.window_iters += 1;
        self.data_seconds += trainer.data_seconds;
        let iteration = trainer.iteration;
        // Due iterations were read ([`Hook::needs_read`]), so the trainer's losses and report are this step's.
        let due = self.is_due(iteration, trainer.max_iter) && trainer.last_read == Some(iteration);
        let Some(logger) = &mut trainer.logger else { return Ok(()) };
        logger.set_position(iteration);
        if due {
            let seconds = self.window_start.elapsed().as_secs_f64() / self.window_iters as f64;
            let data_time = self.data_seconds / self.window_iters as f64;
            // CUDA: the caching allocator's peak since the start, as detectron2's `max_mem`.
            let max_memory = match trainer.device {
                Device::Cuda(index) => {
                    crate::memory::cuda_memory_stats(index).ok().map(|s| s.peak_allocated_bytes as u64)
                }
                _ => None,
            };
            logger.skipped_images = self.skipped_at_load + trainer.feed.skipped();
            let report = trainer.report.as_ref().expect("a step ran");
            let sync_counts = trainer.sync_counts.as_mut().map(std::mem::take);
            logger.iteration(
                iteration,
                trainer.max_iter,
                &trainer.losses,
                report,
                seconds,
                data_time,
                self.ims_per_batch,
                max_memory,
                sync_counts.as_deref(),
            )?;
            self.window_start = Instant::now();
            self.data_seconds = 0.0;
            self.window_iters = 0;
        }
        Ok(())
    }

    fn after_train(&mut self, trainer: &mut Trainer) -> anyhow::Result<()> {
        if let Some(logger) = trainer.logger.as_ref().filter(|_| !trainer.interrupted) {
            logger.finish();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_due_every_period_and_at_the_last_iteration() {
        let writer = PeriodicWriter::new(20, 16, 0);
        let due: Vec<u64> = (1..=50).filter(|&i| writer.is_due(i, 50)).collect();
        assert_eq!(due, [20, 40, 50]);
        // A period of 0 logs every iteration rather than dividing by zero.
        let every = PeriodicWriter::new(0, 16, 0);
        assert!((1..=5).all(|i| every.is_due(i, 5)));
    }
}
