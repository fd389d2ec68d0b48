//! The pieces of a training step that `trainer train` ([`crate::engine::Trainer`]) and `trainer bench train`
//! share: one micro-batch of forward and backward ([`forward_backward`], losses left on the device), and the
//! [`StepLog`], the device record of the steps since the last host read. Steps read nothing on the host; the log
//! is read when a hook needs its values (a log line, a checkpoint, an evaluation, a stop), in one copy, and that
//! read is where a failed step (non-finite loss or gradients; its update was skipped on the device) stops the
//! run, naming the first failed iteration.

use std::collections::BTreeMap;

use detector::structures::{GtInstances, ImageBatch, TrainingTargets};
use detector::MaskRcnn;
use tch::{Device, Kind, Tensor};

use crate::autocast::autocast;
use crate::panics;
use crate::solver::{check_losses, AmpDtype, DeviceStep, SolverError, StepReport, StepValues};

/// The losses of forward passes, still on the device: their names and a `[L]` float64 tensor of their values
/// (float64 holds any loss dtype exactly), detached from the graph, with the model's device counters of the same
/// passes (`detector::diagnostics`).
#[derive(Debug)]
pub struct StepLosses {
    /// Loss names, in name order.
    pub names: Vec<String>,
    /// Their values, in the same order.
    pub values: Tensor,
    /// Counter names, in name order.
    pub counter_names: Vec<String>,
    /// `[C]` float64 counter values, in the same order.
    pub counters: Tensor,
}

impl StepLosses {
    fn of(losses: &BTreeMap<String, Tensor>, counters: BTreeMap<String, Tensor>) -> StepLosses {
        let stack = |values: Vec<Tensor>, device| {
            let values: Vec<Tensor> =
                values.iter().map(|v| transfer::to_device(&v.detach(), device).to_kind(Kind::Double)).collect();
            if values.is_empty() {
                Tensor::zeros([0], (Kind::Double, device))
            } else {
                Tensor::stack(&values, 0)
            }
        };
        let device = losses.values().next().map_or(Device::Cpu, Tensor::device);
        StepLosses {
            names: losses.keys().cloned().collect(),
            values: stack(losses.values().map(Tensor::shallow_clone).collect(), device),
            counter_names: counters.keys().cloned().collect(),
            counters: stack(counters.into_values().collect(), device),
        }
    }

    /// These losses and counters plus `other`'s (another micro-batch of the same model), on the device.
    pub fn plus(&self, other: &StepLosses) -> StepLosses {
        StepLosses {
            names: self.names.clone(),
            values: &self.values + &other.values,
            counter_names: self.counter_names.clone(),
            counters: &self.counters + &other.counters,
        }
    }

    /// The loss values by name, read on the host (one copy).
    pub fn read(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let values = transfer::download_vec::<f64>(&self.values)?;
        Ok(self.names.iter().cloned().zip(values).collect())
    }
}

/// One micro-batch of training: the targets checked and uploaded ([`MaskRcnn::prepare_targets`], host work),
/// then [`forward_backward_prepared`]. Returns the losses on the device (no host read); a libtorch panic becomes
/// an error.
pub fn forward_backward(
    model: &MaskRcnn,
    images: &ImageBatch,
    targets: &[GtInstances],
    amp: Option<AmpDtype>,
    loss_multiplier: &Tensor,
) -> anyhow::Result<StepLosses> {
    let prepared = panics::catch(|| model.prepare_targets(images, targets))??;
    forward_backward_prepared(model, images, &prepared, amp, loss_multiplier)
}

/// The device half of a micro-batch, on targets from [`MaskRcnn::prepare_targets`]: the forward pass (under
/// autocast in `amp`'s dtype when set; the solver's fp16 loss scaler handles the gradients), then backward of the
/// summed losses times `loss_multiplier` (a 0-dim tensor on the device,
/// [`crate::solver::Solver::loss_multiplier`]). With `[model.static_shapes]` it dispatches the same operators on
/// the same shapes for every batch of one padded size (what a CUDA graph captures). Returns the losses on the
/// device; a libtorch panic becomes an error.
pub fn forward_backward_prepared(
    model: &MaskRcnn,
    images: &ImageBatch,
    targets: &[TrainingTargets],
    amp: Option<AmpDtype>,
    loss_multiplier: &Tensor,
) -> anyhow::Result<StepLosses> {
    panics::catch(|| -> anyhow::Result<StepLosses> {
        let losses = autocast(images.images.device(), amp, || model.forward_prepared(images, targets))??;
        let values = StepLosses::of(&losses, detector::diagnostics::take());
        (total_loss(&losses) * loss_multiplier).backward();
        Ok(values)
    })?
}

/// Sum of named losses as one scalar tensor.
fn total_loss(losses: &BTreeMap<String, Tensor>) -> Tensor {
    let mut terms = losses.values();
    let first = terms.next().expect("the model returns at least one loss").shallow_clone();
    terms.fold(first, |acc, l| acc + l)
}

/// The first failed step since a read, as the device recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedStep {
    /// Steps completed before it ([`crate::solver::Solver::iteration`] at its start).
    pub completed: u64,
    /// Its loss terms (means over its micro-batches).
    pub losses: BTreeMap<String, f64>,
    /// Its gradient norm.
    pub grad_norm: f64,
}

impl FailedStep {
    /// The error that stops the run: the first non-finite loss term, or else the gradient norm.
    pub fn error(&self) -> SolverError {
        match check_losses(self.completed, self.losses.iter().map(|(k, v)| (k.as_str(), *v))) {
            Err(error) => error,
            Ok(()) => SolverError::NonFiniteGradients { iteration: self.completed + 1, norm: self.grad_norm },
        }
    }
}

/// What one read of the [`StepLog`] gives.
#[derive(Debug)]
pub struct StepRead {
    /// The steps this read covers, `(first, last)`, numbered from 1 as the log lines number them.
    pub steps: (u64, u64),
    /// The last step's loss terms, averaged over its micro-batches.
    pub losses: BTreeMap<String, f64>,
    /// The last step's solver report.
    pub report: StepReport,
    /// Each model counter (`detector::diagnostics`), summed over the micro-batches of the steps since the read
    /// before.
    pub counters: BTreeMap<String, f64>,
    /// Steps since the read before whose update the fp16 scaler skipped.
    pub scaler_skips: u64,
    /// Steps since the read before that failed (their updates were skipped).
    pub failures: u64,
    /// The first of them.
    pub first_failure: Option<FailedStep>,
}

/// Accumulators on the device, all float64.
struct Accumulators {
    /// `[L + StepValues::COUNT]`: the last step's mean losses, then its [`DeviceStep::values`].
    last: Tensor,
    /// `[C]` model counters summed since the read.
    counters: Tensor,
    /// `[2]`: scaler-skipped and failed steps since the read.
    tallies: Tensor,
    /// `[1 + L + StepValues::COUNT]`: the completed-steps count and `last` of the first failed step.
    first_failure: Tensor,
    /// The iteration of the first step recorded since the read ([`DeviceStep::iteration`]).
    first_iteration: u64,
}

/// The device record of the steps since the last host read; see the module documentation. Recording a step
/// reads nothing; [`StepLog::read`] copies everything in one transfer and starts a new record.
#[derive(Default)]
pub struct StepLog {
    loss_names: Vec<String>,
    counter_names: Vec<String>,
    accumulators: Option<Accumulators>,
    /// The last recorded step (its iteration and learning rate).
    last_step: Option<(u64, f64)>,
}

impl StepLog {
    /// An empty log.
    pub fn new() -> Self {
        StepLog::default()
    }

    /// Records a step: its losses summed over `accumulate` micro-batches and its solver step.
    pub fn record(&mut self, losses: &StepLosses, accumulate: u64, step: &DeviceStep) {
        let device = losses.values.device();
        let means = &losses.values / accumulate as f64;
        let last = Tensor::cat(&[means, transfer::to_device(&step.values, device)], 0);
        let failed = last.narrow(0, losses.names.len() as i64 + 2, 1);
        let scaler_skipped = last.narrow(0, losses.names.len() as i64 + 1, 1);
        let accumulators = self.accumulators.get_or_insert_with(|| {
            self.loss_names = losses.names.clone();
            self.counter_names = losses.counter_names.clone();
            Accumulators {
                last: last.zeros_like(),
                counters: losses.counters.zeros_like(),
                tallies: Tensor::zeros([2], (Kind::Double, device)),
                first_failure: Tensor::zeros([1 + last.size()[0]], (Kind::Double, device)),
                first_iteration: step.iteration,
            }
        });
        let first = failed.logical_and(&accumulators.tallies.narrow(0, 1, 1).eq(0.0));
        let row =
            Tensor::cat(&[Tensor::full([1], step.iteration as f64, (Kind::Double, device)), last.shallow_clone()], 0);
        accumulators.first_failure = row.where_self(&first, &accumulators.first_failure);
        accumulators.tallies = &accumulators.tallies + Tensor::cat(&[scaler_skipped, failed], 0);
        accumulators.counters = &accumulators.counters + &losses.counters;
        accumulators.last = last;
        self.last_step = Some((step.iteration, step.lr));
    }

    /// Reads everything recorded since the last read in one copy and starts a new record; `None` when nothing
    /// was recorded.
    pub fn read(&mut self) -> Result<Option<StepRead>, SolverError> {
        let (Some(accumulators), Some((iteration, lr))) = (self.accumulators.take(), self.last_step.take()) else {
            return Ok(None);
        };
        let all = Tensor::cat(
            &[&accumulators.last, &accumulators.counters, &accumulators.tallies, &accumulators.first_failure],
            0,
        );
        let host = transfer::download_vec::<f64>(&all)?;
        let losses_count = self.loss_names.len();
        let (last, rest) = host.split_at(losses_count + StepValues::COUNT);
        let (counters, rest) = rest.split_at(self.counter_names.len());
        let (tallies, first_failure) = rest.split_at(2);
        let named = |names: &[String], values: &[f64]| -> BTreeMap<String, f64> {
            names.iter().cloned().zip(values.iter().copied()).collect()
        };
        let report = StepValues::from_host(&last[losses_count..]).report(iteration, lr);
        let failures = tallies[1] as u64;
        let first_failure = (failures > 0).then(|| FailedStep {
            completed: first_failure[0] as u64,
            losses: named(&self.loss_names, &first_failure[1..1 + losses_count]),
            grad_norm: first_failure[1 + losses_count],
        });
        Ok(Some(StepRead {
            steps: (accumulators.first_iteration + 1, iteration + 1),
            losses: named(&self.loss_names, &last[..losses_count]),
            report,
            counters: named(&self.counter_names, counters),
            scaler_skips: tallies[0] as u64,
            failures,
            first_failure,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_loss_sums_every_term() {
        let losses: BTreeMap<String, Tensor> = [
            ("loss_a".to_string(), Tensor::from(1.5f32)),
            ("loss_b".to_string(), Tensor::from(0.25f32)),
            ("loss_c".to_string(), Tensor::from(2.0f32)),
        ]
        .into();
        assert_eq!(total_loss(&losses).to_kind(Kind::Double).double_value(&[]), 3.75);
        let values = StepLosses::of(&losses, BTreeMap::new()).read().unwrap();
        assert_eq!(values.values().copied().collect::<Vec<_>>(), [1.5, 0.25, 2.0]);
        assert_eq!(values.keys().next().map(String::as_str), Some("loss_a"));
    }

    fn losses(values: [f64; 2], counter: f64) -> StepLosses {
        StepLosses {
            names: vec!["loss_a".into(), "loss_b".into()],
            values: Tensor::from_slice(&values),
            counter_names: vec!["count".into()],
            counters: Tensor::from_slice(&[counter]),
        }
    }

    fn step(iteration: u64, values: [f64; StepValues::COUNT]) -> DeviceStep {
        DeviceStep { iteration, lr: 0.1 * iteration as f64, values: Tensor::from_slice(&values) }
    }

    #[test]
    fn the_log_keeps_the_last_step_the_tallies_and_the_first_failure() {
        let mut log = StepLog::new();
        assert!(log.read().unwrap().is_none());
        log.record(&losses([2.0, 4.0], 1.0), 2, &step(3, [1.5, 0.0, 0.0, f64::NAN]));
        log.record(&losses([f64::NAN, 4.0], 0.0), 2, &step(4, [f64::NAN, 0.0, 1.0, f64::NAN]));
        log.record(&losses([2.0, f64::INFINITY], 2.0), 2, &step(5, [3.0, 0.0, 1.0, f64::NAN]));
        log.record(&losses([6.0, 8.0], 0.0), 2, &step(6, [2.5, 1.0, 0.0, 512.0]));
        let read = log.read().unwrap().expect("four steps");
        assert_eq!(read.losses, [("loss_a".to_string(), 3.0), ("loss_b".to_string(), 4.0)].into());
        assert_eq!(
            read.report,
            StepReport { iteration: 6, lr: 0.6000000000000001, grad_norm: 2.5, skipped: true, loss_scale: Some(512.0) }
        );
        assert_eq!(read.counters["count"], 3.0);
        assert_eq!((read.scaler_skips, read.failures), (1, 2));
        assert_eq!(read.steps, (4, 7), "steps 3..6 completed before, numbered from 1");
        let failure = read.first_failure.expect("two failures");
        assert_eq!(failure.completed, 4);
        assert!(failure.losses["loss_a"].is_nan() && failure.grad_norm.is_nan());
        let message = failure.error().to_string();
        assert!(message.contains("iteration 5:") && message.contains("loss_a"), "{message}");
        // The next read starts afresh.
        log.record(&losses([2.0, 2.0], 0.0), 1, &step(7, [1.0, 0.0, 0.0, f64::NAN]));
        let read = log.read().unwrap().unwrap();
        assert_eq!((read.failures, read.first_failure, read.counters["count"]), (0, None, 0.0));
        assert_eq!(read.report.loss_scale, None);
    }
}
