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
use tch::{nn::VarStore, Tensor};

pub use clip::{clip_grad_norm, total_grad_norm};
pub use config::{
    AmpConfig, AmpDtype, BatchScaling, ClipGradientsConfig, EmaConfig, LrSchedulerKind, SolverConfig, WarmupMethod,
};
pub use ema::{EmaState, ModelEma};
pub use error::SolverError;
pub use scaler::LossScaler;
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

/// The device results of [`Solver::prepare_step`], read on the host with [`PreparedStep::values`].
#[derive(Debug)]
pub struct PreparedStep {
    /// The global gradient norm before clipping (0-dim), `None` without gradients.
    grad_norm: Option<Tensor>,
    /// Non-zero when the fp16 unscale found inf/NaN (`[1]`), `None` without a loss scaler.
    found_inf: Option<Tensor>,
}

impl PreparedStep {
    /// `[2]` float64 on the gradients' device: the gradient norm and the inf/NaN flag (0 without a scaler), for
    /// [`StepValues::from_host`] once read.
    pub fn values(&self) -> Tensor {
        let device = self.grad_norm.as_ref().or(self.found_inf.as_ref()).map_or(tch::Device::Cpu, Tensor::device);
        let scalar = |t: Option<&Tensor>| match t {
            Some(t) => transfer::to_device(&t.reshape([1]), device).to_kind(tch::Kind::Double),
            None => Tensor::zeros([1], (tch::Kind::Double, device)),
        };
        Tensor::cat(&[scalar(self.grad_norm.as_ref()), scalar(self.found_inf.as_ref())], 0)
    }
}

/// [`PreparedStep::values`] read on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepValues {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the fp16 unscale found inf/NaN gradients.
    pub found_non_finite: bool,
}

impl StepValues {
    /// From the two values of [`PreparedStep::values`].
    pub fn from_host(values: &[f64]) -> Self {
        StepValues { grad_norm: values[0], found_non_finite: values[1] != 0.0 }
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
/// `(loss * solver.loss_multiplier()).backward()`, then [`Solver::step`].
#[derive(Debug)]
pub struct Solver {
    config: SolverConfig,
    schedule: LrSchedule,
    sgd: Sgd,
    scaler: Option<LossScaler>,
    iteration: u64,
}

impl Solver {
    /// A solver over named trainable tensors (tensors not requiring grad are ignored).
    pub fn new(params: BTreeMap<String, Tensor>, config: &SolverConfig) -> Result<Self, SolverError> {
        config.validate()?;
        let scaler = (config.amp.enabled && config.amp.dtype == AmpDtype::Fp16)
            .then(|| LossScaler::new(config.amp.init_scale, config.amp.growth_interval));
        Ok(Solver {
            config: config.clone(),
            schedule: LrSchedule::new(config),
            sgd: Sgd::new(params, config),
            scaler,
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

    /// What each micro-batch loss is multiplied by before backward: the fp16 loss scale divided by
    /// `accumulate`, so accumulated gradients equal those of one `accumulate`-times larger batch.
    pub fn loss_multiplier(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, |s| s.scale) / self.config.accumulate as f64
    }

    /// Sets every gradient to zero (also done at the end of [`Solver::step`]).
    pub fn zero_grad(&mut self) {
        self.sgd.zero_grad();
    }

    /// Finishes the current iteration ([`Solver::prepare_step`], one host read of its values, then
    /// [`Solver::finish_step`]).
    pub fn step(&mut self) -> Result<StepReport, SolverError> {
        let prepared = self.prepare_step()?;
        let values = transfer::download_vec::<f64>(&prepared.values())?;
        self.finish_step(StepValues::from_host(&values))
    }

    /// The device half of a step, without reading anything on the host: unscales the gradients (fp16, flagging
    /// inf/NaN on the device), clips them or computes their norm. The caller reads [`PreparedStep::values`] (with
    /// whatever else the step reads, in one copy) and passes them to [`Solver::finish_step`].
    pub fn prepare_step(&mut self) -> Result<PreparedStep, SolverError> {
        let params = self.sgd.with_gradients();
        let found_inf = match &self.scaler {
            Some(scaler) => Some(scaler.unscale(&params)?),
            None => None,
        };
        // Clipping a step that the scaler will skip is harmless: its gradients are dropped unused.
        let grad_norm = if self.config.clip_gradients.enabled {
            clip_grad_norm(&params, self.config.clip_gradients.max_norm)?
        } else {
            total_grad_norm(&params)?
        };
        Ok(PreparedStep { grad_norm, found_inf })
    }

    /// The host half of a step, given the values read from [`Solver::prepare_step`]: skips the update on inf/NaN
    /// gradients (fp16) or fails on them (otherwise), updates with the scheduled LR, advances the iteration and
    /// zeroes the gradients.
    pub fn finish_step(&mut self, values: StepValues) -> Result<StepReport, SolverError> {
        let found_non_finite = self.scaler.is_some() && values.found_non_finite;
        let lr = self.lr();
        let iteration = self.iteration;
        let mut grad_norm = f64::NAN;
        if !found_non_finite {
            grad_norm = values.grad_norm;
            if !grad_norm.is_finite() {
                return Err(SolverError::NonFiniteGradients { iteration: iteration + 1, norm: grad_norm });
            }
            self.sgd.step(lr)?;
        }
        if let Some(scaler) = &mut self.scaler {
            scaler.update(found_non_finite);
        }
        self.sgd.zero_grad();
        self.iteration += 1;
        Ok(StepReport {
            iteration,
            lr,
            grad_norm,
            skipped: found_non_finite,
            loss_scale: self.scaler.as_ref().map(|s| s.scale),
        })
    }

    /// Momentum buffers, iteration and loss scaler, for a checkpoint.
    pub fn state_dict(&self) -> SolverState {
        let tensors = self
            .sgd
            .params
            .iter()
            .filter_map(|p| p.momentum_buffer.as_ref().map(|b| (format!("{MOMENTUM_PREFIX}{}", p.name), b.copy())))
            .collect();
        SolverState { tensors, scalars: SolverScalars { iteration: self.iteration, loss_scaler: self.scaler.clone() } }
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
        self.scaler = state.scalars.loss_scaler.clone();
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
