//! Rank 0's training log: the console (detectron2's periodic line, a progress bar on a terminal), `metrics.jsonl`
//! and TensorBoard.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::evaluate::EvalOutcome;
use crate::events::{EventWriter, MetricsWriter};
use crate::op_count::SyncCounts;
use crate::solver::StepReport;

/// Rank 0's training log: console lines, `metrics.jsonl` and TensorBoard. The console shows a progress bar only
/// when standard error is an interactive terminal and `log.quiet` is off, with the log lines above it (or on
/// standard output when only that is redirected). Otherwise (`> run.log 2>&1`, nohup, SLURM, CI) there is no bar
/// and every line goes to standard output in full, so a redirected run's file holds all of them.
pub struct Logger {
    metrics: MetricsWriter,
    events: Option<EventWriter>,
    bar: Option<ProgressBar>,
    /// Training images skipped so far under `data.missing_images = "skip"` (logged as `skipped_images`).
    pub skipped_images: usize,
}

impl Logger {
    /// Opens rank 0's log in `output_dir` for a run of `max_iter` iterations starting at `start`: `metrics.jsonl`
    /// (cut back to `start` when resuming), TensorBoard events when `tensorboard` is set, and the progress bar
    /// (see [`Logger`]). `skipped_images` counts the training images skipped at load time.
    pub fn open(
        output_dir: &Path,
        start: u64,
        max_iter: u64,
        quiet: bool,
        tensorboard: bool,
        skipped_images: usize,
    ) -> anyhow::Result<Logger> {
        let metrics_path = output_dir.join("metrics.jsonl");
        let metrics = if start > 0 {
            MetricsWriter::open_resumed(&metrics_path, start)?
        } else {
            MetricsWriter::open(&metrics_path)?
        };
        let events = if tensorboard { Some(EventWriter::create(&output_dir.join("tensorboard"))?) } else { None };
        let bar = Logger::progress_bar(quiet, start, max_iter);
        Ok(Logger { metrics, events, bar, skipped_images })
    }

    /// The progress bar of a run of `max_iter` iterations starting at `start`, when there is one (see [`Logger`]).
    fn progress_bar(quiet: bool, start: u64, max_iter: u64) -> Option<ProgressBar> {
        if quiet || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(max_iter), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("valid template"),
        );
        bar.set_position(start);
        Some(bar)
    }

    /// Moves the progress bar (if any) to `iteration`.
    pub fn set_position(&self, iteration: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(iteration);
        }
    }

    /// Leaves the progress bar (if any) where it stands, for a run that stops early.
    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    /// Removes the progress bar (if any) of a run that finished.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Prints `text` (one line or several) in full.
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) if std::io::stdout().is_terminal() => bar.println(text),
            _ => println!("{text}"),
        }
    }

    /// Writes one iteration's losses, learning rate and timing to the console, metrics.jsonl and TensorBoard, and
    /// to metrics.jsonl the per-step `sync_counts` of the steps since the last line (`log.sync_counts`).
    #[allow(clippy::too_many_arguments)]
    pub fn iteration(
        &mut self,
        iteration: u64,
        max_iter: u64,
        losses: &BTreeMap<String, f64>,
        report: &StepReport,
        seconds: f64,
        data_time: f64,
        ims_per_batch: u64,
        max_memory_bytes: Option<u64>,
        sync_counts: Option<&[SyncCounts]>,
    ) -> anyhow::Result<()> {
        let total: f64 = losses.values().sum();
        let images_per_second = ims_per_batch as f64 / seconds;
        let mut record = serde_json::Map::new();
        record.insert("iteration".into(), json!(iteration));
        record.insert("total_loss".into(), json!(total));
        for (key, value) in losses {
            record.insert(key.clone(), json!(value));
        }
        record.insert("lr".into(), json!(report.lr));
        record.insert("time".into(), json!(seconds));
        record.insert("data_time".into(), json!(data_time));
        record.insert("images_per_second".into(), json!(images_per_second));
        if let Some(scale) = report.loss_scale {
            record.insert("loss_scale".into(), json!(scale));
        }
        if self.skipped_images > 0 {
            record.insert("skipped_images".into(), json!(self.skipped_images));
        }
        if let Some(bytes) = max_memory_bytes {
            record.insert("max_mem_mb".into(), json!(bytes as f64 / (1 << 20) as f64));
        }
        if let Some(steps) = sync_counts {
            // Arrays over the steps since the last line, in order; TensorBoard takes only the scalars.
            let per_step = |value: fn(&SyncCounts) -> u64| json!(steps.iter().map(value).collect::<Vec<_>>());
            record.insert("host_syncs".into(), per_step(|c| c.host_syncs));
            record.insert("synchronising_ops".into(), per_step(|c| c.synchronising_ops));
            record.insert("transfers".into(), per_step(|c| c.transfers));
            record.insert("blocking_transfers".into(), per_step(|c| c.blocking_transfers));
        }
        let eta_seconds = seconds * max_iter.saturating_sub(iteration) as f64;
        let timing = LineTiming { eta_seconds, seconds, data_time, max_memory_bytes };
        self.line(&iteration_line(iteration, total, losses, report.lr, &timing));
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {total:.3}"));
        }
        self.metrics.write(&serde_json::Value::Object(record.clone()))?;
        if let Some(events) = &mut self.events {
            let scalars: Vec<(String, f64)> = record
                .iter()
                .filter(|(k, _)| *k != "iteration")
                .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
                .collect();
            let pairs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            events.add_scalars(iteration, &pairs)?;
            events.flush()?;
        }
        Ok(())
    }

    /// Writes an evaluation's report to the console and its metrics (and pictures) to metrics.jsonl and
    /// TensorBoard.
    pub fn eval(&mut self, iteration: u64, outcome: &EvalOutcome) -> anyhow::Result<()> {
        self.line(outcome.report.trim_end());
        let mut record = serde_json::Map::new();
        record.insert("iteration".into(), json!(iteration));
        for (key, value) in &outcome.metrics {
            record.insert(key.clone(), json!(value));
        }
        self.metrics.write(&serde_json::Value::Object(record))?;
        if let Some(events) = &mut self.events {
            for (key, value) in &outcome.metrics {
                events.add_scalar(key, *value, iteration)?;
            }
            for (image_id, picture) in &outcome.pictures {
                events.add_image_rgb(
                    &format!("predictions/{image_id}"),
                    picture.width,
                    picture.height,
                    &picture.data,
                    iteration,
                )?;
            }
            events.flush()?;
        }
        Ok(())
    }
}

/// Timing part of an [`iteration_line`]: the estimated time left, seconds per iteration and per data fetch, and the
/// CUDA caching allocator's peak (absent on the CPU).
struct LineTiming {
    eta_seconds: f64,
    seconds: f64,
    data_time: f64,
    max_memory_bytes: Option<u64>,
}

/// One periodic console line in detectron2's layout: `eta: 0:41:10  iter: 220  total_loss: 1.234  loss_box_reg:
/// 0.1234  ...  lr: 0.02  time: 0.7300  data_time: 0.0020  max_mem: 1234M`.
fn iteration_line(iteration: u64, total: f64, losses: &BTreeMap<String, f64>, lr: f64, timing: &LineTiming) -> String {
    let eta = timing.eta_seconds.max(0.0).round() as u64;
    let mut line =
        format!("eta: {}:{:02}:{:02}  iter: {iteration}  total_loss: {total:.4}", eta / 3600, eta / 60 % 60, eta % 60);
    for (name, value) in losses {
        line.push_str(&format!("  {name}: {value:.4}"));
    }
    line.push_str(&format!("  lr: {lr:.6}  time: {:.4}  data_time: {:.4}", timing.seconds, timing.data_time));
    if let Some(bytes) = timing.max_memory_bytes {
        line.push_str(&format!("  max_mem: {:.0}M", bytes as f64 / (1 << 20) as f64));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iteration_lines_have_detectron2s_layout() {
        let losses: BTreeMap<String, f64> = [("loss_cls".to_string(), 0.5), ("loss_mask".to_string(), 0.25)].into();
        let timing = LineTiming { eta_seconds: 2470.4, seconds: 0.73, data_time: 0.002, max_memory_bytes: None };
        assert_eq!(
            iteration_line(220, 0.75, &losses, 0.02, &timing),
            "eta: 0:41:10  iter: 220  total_loss: 0.7500  loss_cls: 0.5000  loss_mask: 0.2500  lr: 0.020000  time: \
             0.7300  data_time: 0.0020"
        );
        let timing = LineTiming { eta_seconds: 90061.0, max_memory_bytes: Some(3 << 30), ..timing };
        let line = iteration_line(1, 1.0, &BTreeMap::new(), 0.001, &timing);
        assert!(line.starts_with("eta: 25:01:01  iter: 1  total_loss: 1.0000  lr: 0.001000"), "{line}");
        assert!(line.ends_with("  max_mem: 3072M"), "{line}");
    }
}
