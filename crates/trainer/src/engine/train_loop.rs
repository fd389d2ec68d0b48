//! The [`Trainer`] and its [`Hook`]s, after detectron2's `engine/train_loop.py`: the trainer runs one training
//! step at a time (micro-batches of forward and backward, gradient averaging over the ranks, the solver's
//! device-side step) and calls its hooks before training, after every step and after training; everything else a
//! run does (logging, evaluation, checkpoints) is a hook. Steps read nothing on the host: their values are read
//! in one copy when a hook needs them ([`Hook::needs_read`]), which is also where the ranks agree on the logged
//! losses and on stopping, and where a failed step stops the run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use detector::MaskRcnn;
use serde_json::json;
use tch::{nn, Device};

use super::feed::DeviceFeed;
use super::step::{forward_backward, StepLog, StepLosses};
use super::Logger;
use crate::checkpoint::{named_variables, torch_seed, CheckpointContents, Checkpointer};
use crate::datasets::model_inputs;
use crate::distributed::RankGroup;
use crate::evaluate::EvalOutcome;
use crate::gradients::GradientAveraging;
use crate::layout::images_to_channels_last;
use crate::op_count::{count_syncs, SyncCounts};
use crate::solver::{AmpDtype, ModelEma, Solver, StepReport};
use crate::sync_debug::{CudaSyncDebug, SyncDebugScope};

/// What a training run does around its steps, after detectron2's `HookBase`. Each method gets the trainer
/// (its model, solver, loader, the last read's results) and may fail the run; hooks run in the order given to
/// [`Trainer::run`].
pub trait Hook {
    /// Whether this hook acts after step `iteration` (counted from 1) in a way that needs the steps' values read
    /// on the host first: their losses, or the check that no step failed (before a checkpoint or an evaluation).
    /// The same on every rank. Steps between reads read nothing.
    fn needs_read(&self, _trainer: &Trainer, _iteration: u64) -> bool {
        false
    }

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
    /// The training batches, uploaded one step ahead (the sampler state of the consumed ones goes into
    /// checkpoints).
    pub feed: DeviceFeed,
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
    /// The losses of the step of the last read ([`Trainer::last_read`]), averaged over micro-batches and ranks.
    pub losses: BTreeMap<String, f64>,
    /// The solver report of the step of the last read.
    pub report: Option<StepReport>,
    /// The iteration (completed steps) at the last read of the steps' values, which happens when a hook
    /// [`Hook::needs_read`] or a stop is requested.
    pub last_read: Option<u64>,
    /// The device record of the steps since the last read.
    pub step_log: StepLog,
    /// With `log.sync_counts`, the [`SyncCounts`] of each step since the last log line (taken by the writer).
    pub sync_counts: Option<Vec<SyncCounts>>,
    /// `log.cuda_sync_debug`: CUDA's sync debug mode during the steps that read nothing, after the first two.
    pub cuda_sync_debug: CudaSyncDebug,
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
        let start = self.iteration;
        while self.iteration < self.max_iter && !self.interrupted {
            let next = self.iteration + 1;
            // A single process reads when its stop flag is set (the stop saves a checkpoint); ranks agree on
            // stopping at reads, which must happen at the same iterations on all of them.
            let read = hooks.iter().any(|hook| hook.needs_read(&self, next))
                || (self.group.world_size() == 1 && self.stop_signal.load(Ordering::SeqCst));
            let warmed_up = self.iteration >= start + 2;
            let sync_debug =
                SyncDebugScope::enter(if read || !warmed_up { CudaSyncDebug::Off } else { self.cuda_sync_debug })?;
            match &self.sync_counts {
                None => self.run_step(read)?,
                Some(_) => {
                    let (result, counts) = count_syncs(|| self.run_step(read))?;
                    result?;
                    self.sync_counts.get_or_insert_with(Vec::new).push(counts);
                }
            }
            drop(sync_debug);
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
    /// and the solver's device-side step ([`Solver::update`]: a step with a non-finite loss or gradients skips
    /// its update), recorded in [`Trainer::step_log`]; nothing is read on the host. With `read`, the log is then
    /// read ([`Trainer::read_steps`]).
    pub fn run_step(&mut self, read: bool) -> anyhow::Result<()> {
        let (rank, iteration) = (self.group.rank(), self.iteration);
        tch::manual_seed(torch_seed(self.seed, iteration));
        let mut loss_sums: Option<StepLosses> = None;
        self.data_seconds = 0.0;
        let multiplier = self.solver.loss_multiplier();
        for micro_batch in 0..self.accumulate {
            let fetch = Instant::now();
            let batch = self.feed.next_batch()?;
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
            let losses = forward_backward(&self.model, &images, &targets, self.amp, &multiplier)
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
        let step = self.solver.update(&prepared, Some(&loss_sums.values))?;
        self.step_log.record(&loss_sums, self.accumulate, &step);
        self.iteration += 1;
        self.stop_agreed = false;
        if read {
            self.read_steps()?;
        } else if self.group.world_size() == 1 {
            self.stop_agreed = self.stop_signal.load(Ordering::SeqCst);
        }
        Ok(())
    }

    /// Reads the steps recorded since the last read (one copy), agrees with the other ranks on the losses, the
    /// failures and stopping, warns about the model's counters, and stops the run on a failed step, naming the
    /// first one; sets [`Trainer::losses`], [`Trainer::report`] and [`Trainer::last_read`].
    pub fn read_steps(&mut self) -> anyhow::Result<()> {
        let (rank, iteration) = (self.group.rank(), self.iteration);
        let Some(read) = self.step_log.read()? else { return Ok(()) };
        let (first, last) = read.steps;
        warn_about_counters(read.steps, &read.counters, &self.model.config().static_shapes);
        let mut local: Vec<f64> = read.losses.values().copied().collect();
        local.push(read.failures as f64);
        let (mut means, stop) = self
            .group
            .agree(&local, self.stop_signal.load(Ordering::SeqCst))
            .with_context(|| format!("rank {rank}: iteration {iteration}: agreeing on losses"))?;
        let failures_anywhere = means.pop().is_some_and(|mean| mean > 0.0);
        if let Some(failure) = &read.first_failure {
            return Err(failure.error().into());
        }
        anyhow::ensure!(
            !failures_anywhere,
            "rank {rank}: another rank found a non-finite loss or gradients in iterations {first}-{last}; \
             stopping (the last checkpoint is untouched)"
        );
        self.stop_agreed = stop;
        self.losses = read.losses.keys().cloned().zip(means).collect();
        self.report = Some(read.report);
        self.last_read = Some(iteration);
        Ok(())
    }

    /// Saves a checkpoint of the current iteration (model, solver, EMA, sampler, seed, config, data fingerprint);
    /// returns its folder.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<PathBuf> {
        let model_tensors = named_variables(&self.vs);
        let ema = self.ema.as_ref().map(ModelEma::state_dict);
        let contents = CheckpointContents {
            model: &model_tensors,
            solver: &self.solver.state_dict()?,
            ema: ema.as_ref(),
            sampler: serde_json::to_value(self.feed.sampler_state())?,
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

/// Warns (naming the steps) about the model's counters that say a result is not the exact one: the counters are
/// summed over the steps `first..=last` (numbered from 1).
fn warn_about_counters(
    (first, last): (u64, u64),
    counters: &BTreeMap<String, f64>,
    static_shapes: &detector::config::StaticShapesConfig,
) {
    if let Some(&unconverged) = counters.get("rpn_nms_unconverged").filter(|&&count| count > 0.0) {
        let steps = if first == last { format!("iteration {last}") } else { format!("iterations {first}-{last}") };
        log::warn!(
            "{steps}: the RPN's device NMS had not converged after model.static_shapes.nms_sweeps = {} sweeps in \
             {unconverged} (image, level) pairs, so their proposals are not exactly greedy NMS's; raise \
             model.static_shapes.nms_sweeps",
            static_shapes.nms_sweeps
        );
    }
}
