//! The solver: the `[solver]` config section, detectron2's learning-rate schedules (warm-up + multi-step or
//! cosine, computed with the same fvcore formulas), a hand-written SGD over named tensors that matches
//! `torch.optim.SGD` (momentum, Nesterov, per-name weight-decay groups), global-norm gradient clipping, gradient
//! accumulation, a dynamic fp16 loss scaler and the EMA of the weights. Everything it holds can be saved and
//! restored exactly, which tch's built-in optimizers cannot do.

mod clip;
mod config;
mod ema;
mod error;
mod multi_tensor;
mod scaler;
mod schedule;
mod sgd;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Kind, Tensor};

pub use clip::{clip_grad_norm, total_grad_norm};
pub use config::{
    AmpConfig, AmpDtype, BatchScaling, ClipGradientsConfig, EmaConfig, LrSchedulerKind, SolverConfig, WarmupMethod,
};
pub use ema::{EmaState, ModelEma};
pub use error::SolverError;
pub use scaler::{DeviceLossScaler, LossScaler};
pub use schedule::LrSchedule;
pub use sgd::{is_norm_param, weight_decay_for, Sgd};

/// Stops the run on the first NaN or infinite loss term, naming the iteration and the term. `completed` is the
/// number of optimizer steps finished before this iteration ([`Solver::iteration`]); the error numbers the
/// iteration from 1, as the log lines do.
pub fn check_losses<'a>(completed: u64, terms: impl IntoIterator<Item = (&'a str, f64)>) -> Result<(), SolverError> {
    match terms.into_iter().find(|(_, value)| !value.is_finite()) {
        Some((term, value)) => Err(SolverError::NonFiniteLoss { iteration: completed + 1, term: term.into(), value }),
        None => Ok(()),
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The iteration the step belonged to.
    pub iteration: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Global L2 gradient norm before clipping (after unscaling).
    pub grad_norm: f64,
    /// True when the fp16 loss scaler found inf/NaN gradients and skipped the update.
    pub skipped: bool,
    /// The fp16 loss scale after the step, when one is in use.
    pub loss_scale: Option<f64>,
}

/// The device results of [`Solver::prepare_step`], used by [`Solver::update`].
#[derive(Debug)]
pub struct PreparedStep {
    /// The global gradient norm before clipping (0-dim), `None` without gradients.
    grad_norm: Option<Tensor>,
    /// Non-zero when the fp16 unscale found inf/NaN (`[1]`), `None` without a loss scaler.
    found_inf: Option<Tensor>,
}

/// An optimizer step queued on the device by [`Solver::update`]: what the host knows of it, and its values on
/// the device for the next read ([`StepValues::report`]).
#[derive(Debug)]
pub struct DeviceStep {
    /// The iteration the step belonged to.
    pub iteration: u64,
    /// The learning rate it used.
    pub lr: f64,
    /// `[4]` float64 on the device: the gradient norm before clipping, whether the fp16 scaler skipped the step,
    /// whether it failed (a non-finite loss, or non-finite gradients the scaler does not explain; its update was
    /// skipped too), and the loss scale after it (NaN without a scaler).
    pub values: Tensor,
}

/// [`DeviceStep::values`] read on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepValues {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the fp16 unscale found inf/NaN gradients (the update was skipped).
    pub found_non_finite: bool,
    /// Whether the step failed: a non-finite loss, or non-finite gradients without the scaler's flag (the update
    /// was skipped; training must stop).
    pub failed: bool,
    /// The fp16 loss scale after the step, `None` without a scaler.
    pub loss_scale: Option<f64>,
}

impl StepValues {
    /// Values in a [`DeviceStep::values`] read.
    pub const COUNT: usize = 4;

    /// From the [`StepValues::COUNT`] values of [`DeviceStep::values`].
    pub fn from_host(values: &[f64]) -> Self {
        StepValues {
            grad_norm: values[0],
            found_non_finite: values[1] != 0.0,
            failed: values[2] != 0.0,
            loss_scale: (!values[3].is_nan()).then_some(values[3]),
        }
    }

    /// The report of the step of `iteration` at learning rate `lr` ([`DeviceStep`]) with these values.
    pub fn report(self, iteration: u64, lr: f64) -> StepReport {
        StepReport {
            iteration,
            lr,
            grad_norm: self.grad_norm,
            skipped: self.found_non_finite,
            loss_scale: self.loss_scale,
        }
    }
}

/// The solver state that a checkpoint stores: momentum buffers as named tensors, and small scalars as JSON.
#[derive(Debug)]
pub struct SolverState {
    /// `momentum_buffer.<param name>` tensors.
    pub tensors: Vec<(String, Tensor)>,
    /// Iteration (the scheduler position) and the loss scaler.
    pub scalars: SolverScalars,
}

/// The JSON part of [`SolverState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverScalars {
    /// Completed optimizer steps; the LR schedule is a pure function of it.
    pub iteration: u64,
    /// The fp16 loss scaler, when AMP fp16 is on.
    pub loss_scaler: Option<LossScaler>,
}

const MOMENTUM_PREFIX: &str = "momentum_buffer.";

/// SGD + schedule + clipping + accumulation + loss scaling, advanced once per optimizer step.
///
/// Per step the caller runs `config.accumulate` micro-batches, each calling
/// `(loss * solver.loss_multiplier()).backward()`, then [`Solver::step`] (or [`Solver::prepare_step`] and
/// [`Solver::update`], which read nothing on the host).
#[derive(Debug)]
pub struct Solver {
    config: SolverConfig,
    schedule: LrSchedule,
    sgd: Sgd,
    scaler: Option<DeviceLossScaler>,
    /// The parameters' device (the first's; CPU without parameters), where the step's flags live.
    device: Device,
    /// `1 / accumulate` as a 0-dim float32 on `device`: the loss multiplier without a scaler.
    inverse_accumulate: Tensor,
    iteration: u64,
}

impl Solver {
    /// A solver over named trainable tensors (tensors not requiring grad are ignored).
    pub fn new(params: BTreeMap<String, Tensor>, config: &SolverConfig) -> Result<Self, SolverError> {
        config.validate()?;
        let device = params.values().next().map_or(Device::Cpu, Tensor::device);
        let scaler = (config.amp.enabled && config.amp.dtype == AmpDtype::Fp16).then(|| {
            DeviceLossScaler::new(&LossScaler::new(config.amp.init_scale, config.amp.growth_interval), device)
        });
        Ok(Solver {
            config: config.clone(),
            schedule: LrSchedule::new(config),
            sgd: Sgd::new(params, config),
            scaler,
            device,
            inverse_accumulate: Tensor::full([], 1.0 / config.accumulate as f64, (Kind::Float, device)),
            iteration: 0,
        })
    }

    /// A solver over every trainable variable of `vs`.
    pub fn from_var_store(vs: &VarStore, config: &SolverConfig) -> Result<Self, SolverError> {
        Solver::new(vs.variables().into_iter().collect(), config)
    }

    /// Completed optimizer steps (= the iteration the next step belongs to).
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.schedule.lr(self.iteration)
    }

    /// The schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// The optimizer (parameter groups, gradients).
    pub fn sgd(&self) -> &Sgd {
        &self.sgd
    }

    /// What each micro-batch loss is multiplied by before backward, a 0-dim float32 on the parameters' device
    /// (the scale never leaves it): the fp16 loss scale divided by `accumulate`, so accumulated gradients equal
    /// those of one `accumulate`-times larger batch.
    pub fn loss_multiplier(&self) -> Tensor {
        match &self.scaler {
            Some(scaler) => scaler.scale().reshape([]) / self.config.accumulate as f64,
            None => self.inverse_accumulate.shallow_clone(),
        }
    }

    /// Sets every gradient to zero (also done at the end of [`Solver::step`]).
    pub fn zero_grad(&mut self) {
        self.sgd.zero_grad();
    }

    /// Finishes the current iteration and reads its values on the host: [`Solver::prepare_step`],
    /// [`Solver::update`], one read. Fails on non-finite gradients without a loss scaler (the update was skipped,
    /// the weights are untouched); the training engine instead reads its steps late, in batches.
    pub fn step(&mut self) -> Result<StepReport, SolverError> {
        let prepared = self.prepare_step()?;
        let step = self.update(&prepared, None)?;
        let values = StepValues::from_host(&transfer::download_vec::<f64>(&step.values)?);
        if values.failed {
            return Err(SolverError::NonFiniteGradients { iteration: step.iteration + 1, norm: values.grad_norm });
        }
        Ok(values.report(step.iteration, step.lr))
    }

    /// The first device half of a step: unscales the gradients (fp16, flagging inf/NaN on the device), clips
    /// them or computes their norm (the norm is also the check for non-finite gradients). Nothing is read on the
    /// host.
    pub fn prepare_step(&mut self) -> Result<PreparedStep, SolverError> {
        let params = self.sgd.with_gradients();
        let found_inf = match &self.scaler {
            Some(scaler) => Some(scaler.unscale(&params)?),
            None => None,
        };
        // Clipping a step that is skipped is harmless: its gradients are dropped unused.
        let grad_norm = if self.config.clip_gradients.enabled {
            clip_grad_norm(&params, self.config.clip_gradients.max_norm)?
        } else {
            total_grad_norm(&params)?
        };
        Ok(PreparedStep { grad_norm, found_inf })
    }

    /// The second device half of a step, without reading anything on the host. The step fails when a value of
    /// `losses` (this step's loss terms, if given) is not finite, or the gradient norm is not finite and the
    /// fp16 scaler did not flag the gradients. The update (at the scheduled LR) is applied unless the step failed
    /// or the scaler flagged it, as a device-side condition ([`Sgd::step`]); the scaler updates its scale; the
    /// iteration advances and the gradients are dropped. The returned [`DeviceStep`] carries the flags for a
    /// later read.
    pub fn update(&mut self, prepared: &PreparedStep, losses: Option<&Tensor>) -> Result<DeviceStep, SolverError> {
        let _no_grad = tch::no_grad_guard();
        let device = self.device;
        let on_device = |t: &Tensor| transfer::to_device(t, device);
        let truth = |value: bool| Tensor::full([], i64::from(value), (Kind::Bool, device));
        let found = prepared.found_inf.as_ref().map_or_else(|| truth(false), |f| on_device(&f.reshape([]).ne(0.0)));
        let norm_finite = prepared.grad_norm.as_ref().map_or_else(|| truth(true), |n| on_device(&n.isfinite()));
        let losses_finite = losses.map_or_else(|| truth(true), |l| on_device(&l.isfinite().all()));
        let failed =
            losses_finite.logical_not().logical_or(&found.logical_not().logical_and(&norm_finite.logical_not()));
        let apply = failed.logical_or(&found).logical_not();
        let (iteration, lr) = (self.iteration, self.lr());
        self.sgd.step(lr, &apply)?;
        if let (Some(scaler), Some(found_inf)) = (&mut self.scaler, &prepared.found_inf) {
            scaler.update(&on_device(found_inf))?;
        }
        self.sgd.zero_grad();
        self.iteration += 1;
        let as_value = |t: &Tensor| t.reshape([1]).to_kind(Kind::Double);
        let grad_norm = prepared
            .grad_norm
            .as_ref()
            .map_or_else(|| Tensor::zeros([1], (Kind::Double, device)), |n| as_value(&on_device(n)));
        let scale = self
            .scaler
            .as_ref()
            .map_or_else(|| Tensor::full([1], f64::NAN, (Kind::Double, device)), |s| as_value(s.scale()));
        let values = Tensor::cat(&[grad_norm, as_value(&found), as_value(&failed), scale], 0);
        Ok(DeviceStep { iteration, lr, values })
    }

    /// Momentum buffers, iteration and loss scaler, for a checkpoint (reads the scaler on the host).
    pub fn state_dict(&self) -> Result<SolverState, SolverError> {
        let tensors = self
            .sgd
            .params
            .iter()
            .filter_map(|p| p.momentum_buffer.as_ref().map(|b| (format!("{MOMENTUM_PREFIX}{}", p.name), b.copy())))
            .collect();
        let loss_scaler = self.scaler.as_ref().map(DeviceLossScaler::state).transpose()?;
        Ok(SolverState { tensors, scalars: SolverScalars { iteration: self.iteration, loss_scaler } })
    }

    /// Restores a [`Solver::state_dict`]; every buffer must name a current parameter with the same shape. Nothing
    /// changes when the state does not fit.
    pub fn load_state_dict(&mut self, state: &SolverState) -> Result<(), SolverError> {
        let mut buffers: BTreeMap<&str, &Tensor> = BTreeMap::new();
        for (name, tensor) in &state.tensors {
            let param_name = name
                .strip_prefix(MOMENTUM_PREFIX)
                .ok_or_else(|| SolverError::State(format!("unexpected tensor `{name}`")))?;
            buffers.insert(param_name, tensor);
        }
        for name in buffers.keys() {
            if !self.sgd.params.iter().any(|p| p.name == *name) {
                return Err(SolverError::State(format!("momentum buffer for unknown parameter `{name}`")));
            }
        }
        if self.scaler.is_some() != state.scalars.loss_scaler.is_some() {
            return Err(SolverError::State(format!(
                "the checkpoint was saved {} an fp16 loss scaler and this run {} one (solver.amp changed)",
                if state.scalars.loss_scaler.is_some() { "with" } else { "without" },
                if self.scaler.is_some() { "uses" } else { "does not use" }
            )));
        }
        for param in &self.sgd.params {
            if let Some(buffer) = buffers.get(param.name.as_str()) {
                if buffer.size() != param.tensor.size() {
                    return Err(SolverError::State(format!(
                        "momentum buffer of `{}` has shape {:?}, the parameter {:?}",
                        param.name,
                        buffer.size(),
                        param.tensor.size()
                    )));
                }
            }
        }
        for param in &mut self.sgd.params {
            param.momentum_buffer = buffers
                .get(param.name.as_str())
                .map(|buffer| transfer::to_device(buffer, param.tensor.device()).to_kind(param.tensor.kind()).copy());
        }
        self.scaler = state.scalars.loss_scaler.as_ref().map(|s| DeviceLossScaler::new(s, self.device));
        self.iteration = state.scalars.iteration;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_losses_name_iteration_and_term() {
        assert!(check_losses(3, [("loss_cls", 1.0), ("loss_box_reg", 0.5)]).is_ok());
        // After 7 completed steps the failing iteration is the 8th, as the log numbers it.
        let message = check_losses(7, [("loss_cls", 1.0), ("loss_mask", f64::NAN)]).unwrap_err().to_string();
        assert!(message.contains("iteration 8:") && message.contains("loss_mask"), "{message}");
    }
}
