//! The [`Trainer`] and its [`Hook`]s, after detectron2's `engine/train_loop.py`: the trainer runs one training
//! step at a time (micro-batches of forward and backward, gradient averaging over the ranks, agreement on the
//! logged losses and on stopping, the loss check and the solver step) and calls its hooks before training, after
//! every step and after training; everything else a run does (logging, evaluation, checkpoints) is a hook.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use data::loader::Loader;
use detector::structures::{GtInstances, ImageBatch};
use detector::MaskRcnn;
use serde_json::json;
use tch::{nn, Device, Kind, Tensor};

use super::Logger;
use crate::autocast::autocast;
use crate::checkpoint::{named_variables, torch_seed, CheckpointContents, Checkpointer};
use crate::datasets::model_inputs;
use crate::distributed::RankGroup;
use crate::evaluate::EvalOutcome;
use crate::gradients::GradientAveraging;
use crate::layout::images_to_channels_last;
use crate::panics;
use crate::solver::{check_losses, AmpDtype, ModelEma, PreparedStep, Solver, StepReport, StepValues};

/// What a training run does around its steps, after detectron2's `HookBase`. Each method gets the trainer
/// (its model, solver, loader, the last step's results) and may fail the run; hooks run in the order given to
/// [`Trainer::run`].
pub trait Hook {
    /// Called once before the first step.
    fn before_train(&mut self, _trainer: &mut Trainer) -> anyhow::Result<()> {
        Ok(())
    }

    /// Called after every step; [`Trainer::iteration`] counts the completed steps.
    fn after_step(&mut self, _trainer: &mut Trainer) -> anyhow::Result<()> {
        Ok(())
    }

    /// Called once after the last step, or after a stop ([`Trainer::interrupted`]).
    fn after_train(&mut self, _trainer: &mut Trainer) -> anyhow::Result<()> {
        Ok(())
    }
}

/// How a training run ended.
#[derive(Debug)]
pub struct TrainOutcome {
    /// Completed iterations.
    pub iteration: u64,
    /// True when stopped by SIGINT/SIGTERM (a checkpoint was saved).
    pub interrupted: bool,
    /// The last evaluation, if any ran.
    pub last_eval: Option<EvalOutcome>,
}

/// What a checkpoint records besides the model and solver: the resolved config and the training data's
/// fingerprint (compared on resume).
pub struct CheckpointInfo {
    /// The resolved config, as written to `config.toml`.
    pub config_toml: String,
    /// [`crate::datasets::fingerprint`] of the training split.
    pub dataset_fingerprint: String,
}

/// Owns what training steps need and runs them: see the module documentation. Built by
/// [`crate::train::train`]; hooks read and update its public fields between steps.
pub struct Trainer {
    /// The detector being trained.
    pub model: MaskRcnn,
    /// Its variables.
    pub vs: nn::VarStore,
    /// The optimizer, schedule and loss scaler.
    pub solver: Solver,
    /// The EMA of the weights (`solver.ema`), updated by [`crate::engine::hooks::EmaUpdater`].
    pub ema: Option<ModelEma>,
    /// The training loader (its sampler state goes into checkpoints).
    pub loader: Loader,
    /// The ranks of the run.
    pub group: RankGroup,
    /// Where the model runs.
    pub device: Device,
    /// Writes, lists and prunes the run's checkpoints.
    pub checkpointer: Checkpointer,
    /// What checkpoints record besides the tensors.
    pub checkpoint_info: CheckpointInfo,
    /// Rank 0's log (`None` on the other ranks).
    pub logger: Option<Logger>,
    /// The experiment seed (torch's generator is reseeded from it at every iteration).
    pub seed: u64,
    /// Micro-batches per step.
    pub accumulate: u64,
    /// Autocast dtype, `None` in float32.
    pub amp: Option<AmpDtype>,
    /// Whether input images are laid out channels-last.
    pub channels_last: bool,
    /// The step at which training ends.
    pub max_iter: u64,
    /// Completed steps.
    pub iteration: u64,
    /// Set (by the signal handler) when this rank asks the run to stop; read once per step.
    pub stop_signal: &'static AtomicBool,
    /// Averages the gradients over the ranks (`[ddp]`).
    pub gradients: GradientAveraging,
    /// The last step's losses, averaged over micro-batches and ranks.
    pub losses: BTreeMap<String, f64>,
    /// The last step's solver report.
    pub report: Option<StepReport>,
    /// Seconds the last step waited for the loader.
    pub data_seconds: f64,
    /// Whether the ranks agreed in the last step to stop.
    pub stop_agreed: bool,
    /// Set by a hook to end the run after the current step as interrupted.
    pub interrupted: bool,
    /// The last evaluation and the iteration it ran at.
    pub last_eval: Option<(u64, EvalOutcome)>,
    /// The last checkpoint saved and its iteration.
    pub last_checkpoint: Option<(u64, PathBuf)>,
}

impl Trainer {
    /// Runs `hooks`' `before_train`, then steps until `max_iter` or until a hook sets
    /// [`Trainer::interrupted`], calling every hook's `after_step` after each step, then `after_train`.
    pub fn run(mut self, hooks: &mut [Box<dyn Hook + '_>]) -> anyhow::Result<TrainOutcome> {
        for hook in hooks.iter_mut() {
            hook.before_train(&mut self)?;
        }
        while self.iteration < self.max_iter && !self.interrupted {
            self.run_step()?;
            for hook in hooks.iter_mut() {
                hook.after_step(&mut self)?;
            }
        }
        for hook in hooks.iter_mut() {
            hook.after_train(&mut self)?;
        }
        Ok(TrainOutcome {
            iteration: self.iteration,
            interrupted: self.interrupted,
            last_eval: self.last_eval.map(|(_, outcome)| outcome),
        })
    }

    /// One training step: `accumulate` micro-batches of [`forward_backward`], gradients averaged over the ranks,
    /// the ranks' agreement on the logged losses and on stopping, [`check_losses`], and [`Solver::step`].
    pub fn run_step(&mut self) -> anyhow::Result<()> {
        let (rank, iteration) = (self.group.rank(), self.iteration);
        tch::manual_seed(torch_seed(self.seed, iteration));
        let mut loss_sums: Option<StepLosses> = None;
        self.data_seconds = 0.0;
        for micro_batch in 0..self.accumulate {
            let fetch = Instant::now();
            let batch = self.loader.next().context("the training loader stopped")??.images_to_device(self.device);
            self.data_seconds += fetch.elapsed().as_secs_f64();
            let (mut images, targets) = model_inputs(batch);
            if self.channels_last {
                images = images_to_channels_last(images);
            }
            if micro_batch + 1 == self.accumulate {
                self.gradients
                    .before_last_backward()
                    .with_context(|| format!("rank {rank}: iteration {}: gradient all-reduce", iteration + 1))?;
            }
            let losses = forward_backward(&self.model, &images, &targets, self.amp, self.solver.loss_multiplier())
                .with_context(|| format!("rank {rank}: iteration {}: forward and backward pass", iteration + 1))?;
            loss_sums = Some(match loss_sums {
                None => losses,
                Some(sums) => sums.plus(&losses),
            });
        }
        let loss_sums = loss_sums.context("solver.accumulate is at least 1")?;
        self.gradients
            .finish()
            .with_context(|| format!("rank {rank}: iteration {}: averaging gradients", iteration + 1))?;
        let prepared = self.solver.prepare_step()?;
        let read = read_step(&loss_sums, self.accumulate, &prepared)?;
        warn_about_counters(iteration, &read.counters, &self.model.config().static_shapes);
        let (local, solver_values) = (read.losses, read.solver);
        let (means, stop) = self
            .group
            .agree(&local.values().copied().collect::<Vec<_>>(), self.stop_signal.load(Ordering::SeqCst))
            .with_context(|| format!("rank {rank}: iteration {}: agreeing on losses", iteration + 1))?;
        self.stop_agreed = stop;
        let logged: BTreeMap<String, f64> = local.keys().cloned().zip(means).collect();
        check_losses(iteration, logged.iter().map(|(k, v)| (k.as_str(), *v)))?;
        self.report = Some(self.solver.finish_step(solver_values)?);
        self.losses = logged;
        self.iteration += 1;
        Ok(())
    }

    /// Saves a checkpoint of the current iteration (model, solver, EMA, sampler, seed, config, data fingerprint);
    /// returns its folder.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<PathBuf> {
        let model_tensors = named_variables(&self.vs);
        let ema = self.ema.as_ref().map(ModelEma::state_dict);
        let contents = CheckpointContents {
            model: &model_tensors,
            solver: &self.solver.state_dict(),
            ema: ema.as_ref(),
            sampler: serde_json::to_value(self.loader.sampler_state())?,
            rng: json!({"torch": "manual_seed(torch_seed(seed, iteration)) at every iteration", "seed": self.seed}),
            config_toml: &self.checkpoint_info.config_toml,
            device: format!("{:?}", self.device),
            dataset_fingerprint: self.checkpoint_info.dataset_fingerprint.clone(),
        };
        let path = self.checkpointer.save(self.iteration, &contents)?;
        self.last_checkpoint = Some((self.iteration, path.clone()));
        Ok(path)
    }
}

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
        let device = losses.values().next().map_or(tch::Device::Cpu, Tensor::device);
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

/// What the one host read at the end of a step gives: the mean losses, the model's counters summed over the
/// micro-batches, and the solver's values.
#[derive(Debug)]
pub struct StepRead {
    /// Each loss, averaged over the micro-batches.
    pub losses: BTreeMap<String, f64>,
    /// Each device counter (`detector::diagnostics`), summed over the micro-batches.
    pub counters: BTreeMap<String, f64>,
    /// The solver's gradient norm and inf/NaN flag.
    pub solver: StepValues,
}

/// The one host read at the end of a step: the losses summed over `accumulate` micro-batches (returned as their
/// mean), the model's counters and the solver's values ([`Solver::prepare_step`]), in one copy.
pub fn read_step(loss_sums: &StepLosses, accumulate: u64, prepared: &PreparedStep) -> anyhow::Result<StepRead> {
    let solver_values = transfer::to_device(&prepared.values(), loss_sums.values.device());
    let host =
        transfer::download_vec::<f64>(&Tensor::cat(&[&loss_sums.values, &loss_sums.counters, &solver_values], 0))?;
    let (losses, rest) = host.split_at(loss_sums.names.len());
    let (counters, solver) = rest.split_at(loss_sums.counter_names.len());
    Ok(StepRead {
        losses: loss_sums.names.iter().cloned().zip(losses.iter().map(|v| v / accumulate as f64)).collect(),
        counters: loss_sums.counter_names.iter().cloned().zip(counters.iter().copied()).collect(),
        solver: StepValues::from_host(solver),
    })
}

/// One micro-batch of training: the forward pass (under autocast in `amp`'s dtype when set; the solver's fp16
/// loss scaler handles the gradients), then backward of the summed losses times `loss_multiplier`. Returns the
/// losses on the device (no host read: the step reads them once at its end, [`read_step`]); a libtorch panic
/// becomes an error. The [`Trainer`]'s steps and `trainer bench train` both run it.
pub fn forward_backward(
    model: &MaskRcnn,
    images: &ImageBatch,
    targets: &[GtInstances],
    amp: Option<AmpDtype>,
    loss_multiplier: f64,
) -> anyhow::Result<StepLosses> {
    panics::catch(|| -> anyhow::Result<StepLosses> {
        let losses = autocast(images.images.device(), amp, || model.forward_train(images, targets))??;
        let values = StepLosses::of(&losses, detector::diagnostics::take());
        (total_loss(&losses) * loss_multiplier).backward();
        Ok(values)
    })?
}

/// Warns (naming the iteration, from 1) about the model's counters that say a step's result is not the exact one.
fn warn_about_counters(
    iteration: u64,
    counters: &BTreeMap<String, f64>,
    static_shapes: &detector::config::StaticShapesConfig,
) {
    if let Some(&unconverged) = counters.get("rpn_nms_unconverged").filter(|&&count| count > 0.0) {
        log::warn!(
            "iteration {}: the RPN's device NMS had not converged after model.static_shapes.nms_sweeps = {} sweeps in \
             {unconverged} (image, level) pairs, so their proposals are not exactly greedy NMS's; raise \
             model.static_shapes.nms_sweeps",
            iteration + 1,
            static_shapes.nms_sweeps
        );
    }
}

/// Sum of named losses as one scalar tensor.
fn total_loss(losses: &BTreeMap<String, Tensor>) -> Tensor {
    let mut terms = losses.values();
    let first = terms.next().expect("the model returns at least one loss").shallow_clone();
    terms.fold(first, |acc, l| acc + l)
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
}
