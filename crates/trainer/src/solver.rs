//! The solver: the `[solver]` config section, detectron2's learning-rate schedules (warm-up + multi-step or
//! cosine, computed with the same fvcore formulas), a hand-written SGD over named tensors that matches
//! `torch.optim.SGD` (momentum, Nesterov, per-name weight-decay groups), global-norm gradient clipping, gradient
//! accumulation and a dynamic fp16 loss scaler. Everything it holds can be saved and restored exactly, which
//! tch's built-in optimizers cannot do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

/// Errors raised while configuring, stepping or restoring the solver.
#[derive(Debug, thiserror::Error)]
pub enum SolverError {
    /// A `[solver]` value that cannot work.
    #[error("`solver.{key}`: {message}")]
    Config { key: String, message: String },
    /// A loss term became NaN or infinite: the run must stop before the weights are touched. `iteration` counts
    /// from 1, as the log lines do (`iter 3/100` is the iteration that completes the third step).
    #[error("iteration {iteration}: loss term `{term}` is {value}; stopping (the last checkpoint is untouched)")]
    NonFiniteLoss { iteration: u64, term: String, value: f64 },
    /// Gradients became NaN or infinite without a loss scaler that could skip the step (`iteration` from 1).
    #[error("iteration {iteration}: the gradient norm is {norm}; stopping (the last checkpoint is untouched)")]
    NonFiniteGradients { iteration: u64, norm: f64 },
    /// A saved solver state that does not fit the current parameters.
    #[error("solver state: {0}")]
    State(String),
    /// An error from libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// An error from libtorch's multi-tensor operators (src/optim_shim.cpp).
    #[error("optimizer tensor operation: {0}")]
    Tensor(String),
}

/// Which decay the learning rate follows after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedulerKind {
    /// detectron2's `WarmupMultiStepLR`: multiply by `gamma` at each of `steps`.
    Multistep,
    /// detectron2's `WarmupCosineLR`: half a cosine from `base_lr` to `base_lr_end` over `max_iter`.
    Cosine,
}

/// How the warm-up factor moves from `warmup_factor` to 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupMethod {
    /// Linear ramp (detectron2's default).
    Linear,
    /// Constant `warmup_factor` during warm-up.
    Constant,
}

/// The `[solver.clip_gradients]` section: clipping by the global L2 norm of all gradients.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipGradientsConfig {
    /// Whether to clip.
    #[serde(default)]
    pub enabled: bool,
    /// Largest allowed global L2 norm (`torch.nn.utils.clip_grad_norm_`'s `max_norm`).
    #[serde(default = "default_clip_max_norm")]
    pub max_norm: f64,
}

/// The reduced-precision type autocast runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AmpDtype {
    /// float16 with a dynamic loss scale.
    Fp16,
    /// bfloat16 (no loss scale needed).
    Bf16,
}

/// The `[solver.amp]` section: mixed precision (autocast) on CUDA or CPU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmpConfig {
    /// Whether to use autocast.
    #[serde(default)]
    pub enabled: bool,
    /// fp16 or bf16.
    #[serde(default = "default_amp_dtype")]
    pub dtype: AmpDtype,
    /// First fp16 loss scale (`torch.amp.GradScaler`'s `init_scale`).
    #[serde(default = "default_init_scale")]
    pub init_scale: f64,
    /// Good steps after which the fp16 loss scale doubles.
    #[serde(default = "default_growth_interval")]
    pub growth_interval: u64,
}

fn default_max_iter() -> u64 {
    90_000
}
fn default_ims_per_batch() -> u64 {
    16
}
fn default_base_lr() -> f64 {
    0.02
}
fn default_momentum() -> f64 {
    0.9
}
fn default_weight_decay() -> f64 {
    1e-4
}
fn default_steps() -> Vec<u64> {
    vec![60_000, 80_000]
}
fn default_gamma() -> f64 {
    0.1
}
fn default_warmup_iters() -> u64 {
    1000
}
fn default_warmup_factor() -> f64 {
    0.001
}
fn default_warmup_method() -> WarmupMethod {
    WarmupMethod::Linear
}
fn default_scheduler() -> LrSchedulerKind {
    LrSchedulerKind::Multistep
}
fn default_clip_max_norm() -> f64 {
    1.0
}
fn default_accumulate() -> u64 {
    1
}
fn default_amp_dtype() -> AmpDtype {
    AmpDtype::Fp16
}
fn default_init_scale() -> f64 {
    65536.0
}
fn default_growth_interval() -> u64 {
    2000
}

impl Default for ClipGradientsConfig {
    fn default() -> Self {
        ClipGradientsConfig { enabled: false, max_norm: default_clip_max_norm() }
    }
}

impl Default for AmpConfig {
    fn default() -> Self {
        AmpConfig {
            enabled: false,
            dtype: default_amp_dtype(),
            init_scale: default_init_scale(),
            growth_interval: default_growth_interval(),
        }
    }
}

/// The `[solver]` section. Defaults are detectron2's COCO 1x recipe (`Base-RCNN-FPN`: LR 0.02 for batch 16,
/// 90k iterations, steps 60k/80k, warm-up 1000 iterations from 0.001).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverConfig {
    /// Optimizer steps in the whole run.
    #[serde(default = "default_max_iter")]
    pub max_iter: u64,
    /// Total images per optimizer step over all processes and accumulated micro-batches.
    #[serde(default = "default_ims_per_batch")]
    pub ims_per_batch: u64,
    /// Peak learning rate (after warm-up).
    #[serde(default = "default_base_lr")]
    pub base_lr: f64,
    /// Final learning rate of the cosine schedule.
    #[serde(default)]
    pub base_lr_end: f64,
    /// SGD momentum.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// Weight decay of ordinary parameters.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Weight decay of normalization-layer parameters (see [`is_norm_param`]).
    #[serde(default)]
    pub weight_decay_norm: f64,
    /// Weight decay of every `*.bias`, overriding the two above; absent means biases follow their layer
    /// (detectron2's `WEIGHT_DECAY_BIAS = None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay_bias: Option<f64>,
    /// `multistep` or `cosine`.
    #[serde(default = "default_scheduler")]
    pub lr_scheduler: LrSchedulerKind,
    /// Iterations at which the multi-step schedule multiplies the LR by `gamma` (steps past `max_iter` are ignored).
    #[serde(default = "default_steps")]
    pub steps: Vec<u64>,
    /// Multi-step decay factor.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Warm-up length in iterations.
    #[serde(default = "default_warmup_iters")]
    pub warmup_iters: u64,
    /// LR multiplier at iteration 0.
    #[serde(default = "default_warmup_factor")]
    pub warmup_factor: f64,
    /// `linear` or `constant`.
    #[serde(default = "default_warmup_method")]
    pub warmup_method: WarmupMethod,
    /// Global-norm gradient clipping.
    #[serde(default)]
    pub clip_gradients: ClipGradientsConfig,
    /// Micro-batches accumulated into one optimizer step (each of `ims_per_batch / accumulate` images).
    #[serde(default = "default_accumulate")]
    pub accumulate: u64,
    /// Mixed precision.
    #[serde(default)]
    pub amp: AmpConfig,
    /// Scale the LR linearly (and the schedule's iterations inversely) when the actual total batch differs
    /// from `ims_per_batch`, as detectron2's `REFERENCE_WORLD_SIZE` does.
    #[serde(default)]
    pub scale_lr_to_batch: bool,
}

impl Default for SolverConfig {
    fn default() -> Self {
        toml::from_str("").expect("every solver field has a default")
    }
}

/// What [`SolverConfig::scale_to_batch`] changed.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchScaling {
    /// Actual total batch divided by the configured `ims_per_batch`.
    pub factor: f64,
    /// One line for the log.
    pub message: String,
}

impl SolverConfig {
    /// Checks values that would make the schedule or the optimizer meaningless.
    pub fn validate(&self) -> Result<(), SolverError> {
        let bad = |key: &str, message: &str| Err(SolverError::Config { key: key.into(), message: message.into() });
        if self.max_iter == 0 {
            return bad("max_iter", "must be at least 1");
        }
        if self.ims_per_batch == 0 {
            return bad("ims_per_batch", "must be at least 1");
        }
        if !(self.base_lr.is_finite() && self.base_lr > 0.0) {
            return bad("base_lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", "must be in [0, 1)");
        }
        if self.nesterov && self.momentum == 0.0 {
            return bad("nesterov", "Nesterov momentum needs momentum > 0");
        }
        if self.accumulate == 0 {
            return bad("accumulate", "must be at least 1");
        }
        if !self.ims_per_batch.is_multiple_of(self.accumulate) {
            return bad("accumulate", "must divide ims_per_batch");
        }
        if self.steps.windows(2).any(|w| w[0] > w[1]) {
            return bad("steps", "must be in increasing order");
        }
        if self.clip_gradients.enabled && (self.clip_gradients.max_norm.is_nan() || self.clip_gradients.max_norm <= 0.0)
        {
            return bad("clip_gradients.max_norm", "must be positive");
        }
        if self.amp.enabled && self.amp.dtype == AmpDtype::Fp16 {
            if !(self.amp.init_scale.is_finite() && self.amp.init_scale > 0.0) {
                return bad("amp.init_scale", "must be a positive number");
            }
            if self.amp.growth_interval == 0 {
                return bad("amp.growth_interval", "must be at least 1");
            }
        }
        Ok(())
    }

    /// When `scale_lr_to_batch` is on and `actual_total_batch` differs from `ims_per_batch`, scales the LRs by
    /// `actual / ims_per_batch` and `max_iter`, `steps` and `warmup_iters` by the inverse (rounded), so the run
    /// covers the same number of epochs (detectron2's `auto_scale_workers`). Periods outside `[solver]` are the
    /// caller's to scale with the returned factor. Returns `None` when nothing changed.
    pub fn scale_to_batch(&mut self, actual_total_batch: u64) -> Option<BatchScaling> {
        if !self.scale_lr_to_batch || actual_total_batch == self.ims_per_batch || actual_total_batch == 0 {
            return None;
        }
        let factor = actual_total_batch as f64 / self.ims_per_batch as f64;
        let iters = |n: u64| ((n as f64) / factor).round() as u64;
        let message = format!(
            "scaling the solver to total batch {actual_total_batch} (config: {}): base_lr {} -> {}, max_iter {} -> {}",
            self.ims_per_batch,
            self.base_lr,
            self.base_lr * factor,
            self.max_iter,
            iters(self.max_iter).max(1)
        );
        self.base_lr *= factor;
        self.base_lr_end *= factor;
        self.max_iter = iters(self.max_iter).max(1);
        self.steps = self.steps.iter().map(|&s| iters(s)).collect();
        self.warmup_iters = iters(self.warmup_iters);
        self.ims_per_batch = actual_total_batch;
        Some(BatchScaling { factor, message })
    }
}

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

/// Whether `name` is a parameter of a normalization layer. Our norm layers are submodules named `norm` or
/// `norm1`, `norm2`, ... (and torchvision-style `*_norm`), so the rule is: the path component before the final
/// `weight`/`bias` is `norm`, `norm<digits>` or ends with `_norm`.
pub fn is_norm_param(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    let (Some(_leaf), Some(module)) = (parts.next(), parts.next()) else {
        return false;
    };
    let numbered = module.strip_prefix("norm").is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()));
    numbered || module.ends_with("_norm")
}

/// The weight decay detectron2 would give parameter `name`: `weight_decay_norm` for norm layers,
/// `weight_decay_bias` (when set) for every `*.bias`, `weight_decay` otherwise.
pub fn weight_decay_for(name: &str, config: &SolverConfig) -> f64 {
    match config.weight_decay_bias {
        Some(bias_decay) if name.ends_with(".bias") || name == "bias" => bias_decay,
        _ if is_norm_param(name) => config.weight_decay_norm,
        _ => config.weight_decay,
    }
}

/// One trainable tensor with its decay and momentum buffer.
#[derive(Debug)]
struct SgdParam {
    name: String,
    tensor: Tensor,
    weight_decay: f64,
    momentum_buffer: Option<Tensor>,
}

/// SGD with momentum exactly as `torch.optim.SGD` (dampening 0): `d = g + wd*p`; first step `buf = d`, then
/// `buf = m*buf + d`; `d = d + m*buf` (Nesterov) or `d = buf`; `p -= lr*d`. The tensor work runs through
/// libtorch's multi-tensor (`_foreach_*`) operators, one call per weight-decay group, as torch's `foreach=True`
/// path (the CUDA default): a few kernel launches for all parameters instead of several per parameter. On the
/// CPU those operators fall back to torch's single-tensor operations, so the results are bit-identical to
/// `torch.optim.SGD` there. Parameters are kept in name order; tensors that do not require grad are left out.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<SgdParam>,
    momentum: f64,
    nesterov: bool,
}

impl Sgd {
    /// Builds the optimizer over `params` (shallow copies sharing storage with the model), giving each the
    /// decay [`weight_decay_for`] assigns.
    pub fn new(params: BTreeMap<String, Tensor>, config: &SolverConfig) -> Self {
        let params = params
            .into_iter()
            .filter(|(_, tensor)| tensor.requires_grad())
            .map(|(name, tensor)| SgdParam {
                weight_decay: weight_decay_for(&name, config),
                name,
                tensor,
                momentum_buffer: None,
            })
            .collect();
        Sgd { params, momentum: config.momentum, nesterov: config.nesterov }
    }

    /// Names and decays of the optimized parameters, in update order.
    pub fn param_groups(&self) -> Vec<(&str, f64)> {
        self.params.iter().map(|p| (p.name.as_str(), p.weight_decay)).collect()
    }

    /// The gradients that exist (parameters unused in the last backward have none).
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.grad()).filter(Tensor::defined).collect()
    }

    /// The parameters that have a gradient.
    fn with_gradients(&self) -> Vec<Tensor> {
        self.params.iter().filter(|p| p.tensor.grad().defined()).map(|p| p.tensor.shallow_clone()).collect()
    }

    /// Drops every gradient (`zero_grad(set_to_none=True)`, torch's default): the next backward writes fresh
    /// gradients instead of adding to zeroed ones.
    pub fn zero_grad(&mut self) {
        let params: Vec<Tensor> = self.params.iter().map(|p| p.tensor.shallow_clone()).collect();
        multi_tensor::drop_grads(&params).expect("dropping gradients of parameters");
    }

    /// One update with learning rate `lr` from the current gradients (parameters without one are skipped).
    pub fn step(&mut self, lr: f64) -> Result<(), SolverError> {
        let mut decays: Vec<f64> = self.params.iter().map(|p| p.weight_decay).collect();
        decays.sort_by(f64::total_cmp);
        decays.dedup();
        for decay in decays {
            let group: Vec<&mut SgdParam> = self
                .params
                .iter_mut()
                .filter(|p| p.weight_decay.to_bits() == decay.to_bits() && p.tensor.grad().defined())
                .collect();
            multi_tensor::sgd_step(group, lr, self.momentum, decay, self.nesterov)?;
        }
        Ok(())
    }
}

/// Safe wrappers over src/optim_shim.cpp (libtorch's `_foreach_*` operators); see there.
mod multi_tensor {
    use std::ffi::{c_char, c_int, c_void};

    use tch::Tensor;

    use super::{SgdParam, SolverError};
    use crate::shim::take_message;

    /// An `at::Tensor*`, which is what tch's `C_tensor*` points to.
    type RawTensor = *mut c_void;

    extern "C" {
        fn vovdet_sgd_step(
            params: *const RawTensor,
            buffers: *mut RawTensor,
            count: i64,
            lr: f64,
            momentum: f64,
            weight_decay: f64,
            nesterov: c_int,
        ) -> *mut c_char;
        fn vovdet_total_grad_norm(params: *const RawTensor, count: i64, total: *mut RawTensor) -> *mut c_char;
        fn vovdet_scale_grads(params: *const RawTensor, count: i64, coefficient: RawTensor) -> *mut c_char;
        fn vovdet_unscale_grads(
            params: *const RawTensor,
            count: i64,
            found_inf: RawTensor,
            inverse_scale: RawTensor,
        ) -> *mut c_char;
        fn vovdet_drop_grads(params: *const RawTensor, count: i64) -> *mut c_char;
    }

    fn raw(tensor: &Tensor) -> RawTensor {
        tensor.as_ptr() as RawTensor
    }

    fn raws(tensors: &[Tensor]) -> Vec<RawTensor> {
        tensors.iter().map(raw).collect()
    }

    /// Turns the shim's result (NULL or a malloc'ed message) into a `Result`.
    fn check(message: *mut c_char) -> Result<(), SolverError> {
        take_message(message).map_or(Ok(()), |text| Err(SolverError::Tensor(text)))
    }

    /// One SGD step over `group` (parameters with gradients and the same decay); creates missing buffers.
    pub(super) fn sgd_step(
        mut group: Vec<&mut SgdParam>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    ) -> Result<(), SolverError> {
        let params: Vec<RawTensor> = group.iter().map(|p| raw(&p.tensor)).collect();
        let mut buffers: Vec<RawTensor> =
            group.iter().map(|p| p.momentum_buffer.as_ref().map_or(std::ptr::null_mut(), raw)).collect();
        let had_buffer: Vec<bool> = buffers.iter().map(|b| !b.is_null()).collect();
        // SAFETY: `params` and `buffers` hold `count` live at::Tensor pointers (or NULL buffers) for the call.
        let result = check(unsafe {
            vovdet_sgd_step(
                params.as_ptr(),
                buffers.as_mut_ptr(),
                params.len() as i64,
                lr,
                momentum,
                weight_decay,
                c_int::from(nesterov),
            )
        });
        for ((param, buffer), had) in group.iter_mut().zip(&buffers).zip(had_buffer) {
            if !had && !buffer.is_null() {
                // SAFETY: the shim allocated this at::Tensor for us; ownership passes to tch.
                param.momentum_buffer = Some(unsafe { Tensor::from_ptr(buffer.cast()) });
            }
        }
        result
    }

    /// The L2 norm of the gradients of `params` together (a 0-dim tensor on their device).
    pub(super) fn total_grad_norm(params: &[Tensor]) -> Result<Tensor, SolverError> {
        let raws = raws(params);
        let mut total: RawTensor = std::ptr::null_mut();
        // SAFETY: `raws` are live tensors; on success the shim returns a new heap tensor in `total`.
        check(unsafe { vovdet_total_grad_norm(raws.as_ptr(), raws.len() as i64, &mut total) })?;
        // SAFETY: allocated by the shim for us.
        Ok(unsafe { Tensor::from_ptr(total.cast()) })
    }

    /// Multiplies the gradients of `params` by the 0-dim `coefficient`.
    pub(super) fn scale_grads(params: &[Tensor], coefficient: &Tensor) -> Result<(), SolverError> {
        let raws = raws(params);
        // SAFETY: live tensors for the duration of the call.
        check(unsafe { vovdet_scale_grads(raws.as_ptr(), raws.len() as i64, raw(coefficient)) })
    }

    /// Unscales the gradients of `params` in place and flags inf/NaN in `found_inf` (no host read).
    pub(super) fn unscale_grads(
        params: &[Tensor],
        found_inf: &Tensor,
        inverse_scale: &Tensor,
    ) -> Result<(), SolverError> {
        let raws = raws(params);
        // SAFETY: live tensors for the duration of the call.
        check(unsafe { vovdet_unscale_grads(raws.as_ptr(), raws.len() as i64, raw(found_inf), raw(inverse_scale)) })
    }

    /// Drops the gradients of `params`.
    pub(super) fn drop_grads(params: &[Tensor]) -> Result<(), SolverError> {
        let raws = raws(params);
        // SAFETY: live tensors for the duration of the call.
        check(unsafe { vovdet_drop_grads(raws.as_ptr(), raws.len() as i64) })
    }
}

/// `torch.nn.utils.clip_grad_norm_` over the gradients of `params` (L2): scales every gradient in place by
/// `min(1, max_norm / (total + 1e-6))` and returns the total norm before clipping (one host read).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64, SolverError> {
    if params.is_empty() {
        return Ok(0.0);
    }
    let _no_grad = tch::no_grad_guard();
    let total = multi_tensor::total_grad_norm(params)?;
    let coefficient = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    multi_tensor::scale_grads(params, &coefficient)?;
    Ok(total.double_value(&[]))
}

/// The L2 norm of the gradients of `params` together, as torch computes it (norm of the per-tensor norms); one
/// host read.
pub fn total_grad_norm(params: &[Tensor]) -> Result<f64, SolverError> {
    if params.is_empty() {
        return Ok(0.0);
    }
    Ok(multi_tensor::total_grad_norm(params)?.double_value(&[]))
}

/// `torch.amp.GradScaler`'s dynamic loss scale: the loss is multiplied by `scale` before backward; a step whose
/// unscaled gradients contain inf/NaN is skipped and halves the scale; `growth_interval` good steps in a row
/// double it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Current loss scale.
    pub scale: f64,
    /// Good steps since the last change.
    pub growth_tracker: u64,
    /// Good steps needed to double the scale.
    pub growth_interval: u64,
}

impl LossScaler {
    /// A scaler starting at `init_scale`.
    pub fn new(init_scale: f64, growth_interval: u64) -> Self {
        LossScaler { scale: init_scale, growth_tracker: 0, growth_interval }
    }

    /// Divides the gradients of `params` by the scale in place (torch's fused
    /// `_amp_foreach_non_finite_check_and_unscale_`, grouped by device); returns whether any is inf or NaN, with
    /// one host read per device.
    pub fn unscale(&self, params: &[Tensor]) -> Result<bool, SolverError> {
        let _no_grad = tch::no_grad_guard();
        let inverse = (1.0 / self.scale) as f32;
        let mut devices: Vec<tch::Device> = Vec::new();
        for device in params.iter().map(Tensor::device) {
            if !devices.contains(&device) {
                devices.push(device);
            }
        }
        let mut found_non_finite = false;
        for device in devices {
            let on_device: Vec<Tensor> =
                params.iter().filter(|p| p.device() == device).map(Tensor::shallow_clone).collect();
            let found_inf = Tensor::zeros([1], (Kind::Float, device));
            let inverse_scale = Tensor::from_slice(&[inverse]).to_device(device);
            multi_tensor::unscale_grads(&on_device, &found_inf, &inverse_scale)?;
            found_non_finite |= found_inf.double_value(&[0]) != 0.0;
        }
        Ok(found_non_finite)
    }

    /// Updates the scale after a step (`torch._amp_update_scale_`, growth 2, back-off 0.5).
    pub fn update(&mut self, found_non_finite: bool) {
        if found_non_finite {
            self.scale *= 0.5;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                let grown = self.scale * 2.0;
                if (grown as f32).is_finite() {
                    self.scale = grown;
                }
                self.growth_tracker = 0;
            }
        }
    }
}

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

    /// Finishes the current iteration: unscale (fp16), skip on inf/NaN (fp16) or fail on them (otherwise),
    /// clip, update with the scheduled LR, advance the iteration and zero the gradients.
    pub fn step(&mut self) -> Result<StepReport, SolverError> {
        let params = self.sgd.with_gradients();
        let found_non_finite = match &self.scaler {
            Some(scaler) => scaler.unscale(&params)?,
            None => false,
        };
        let lr = self.lr();
        let iteration = self.iteration;
        let mut grad_norm = f64::NAN;
        if !found_non_finite {
            grad_norm = if self.config.clip_gradients.enabled {
                clip_grad_norm(&params, self.config.clip_gradients.max_norm)?
            } else {
                total_grad_norm(&params)?
            };
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
                .map(|buffer| buffer.to_device(param.tensor.device()).to_kind(param.tensor.kind()).copy());
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
    fn norm_params_are_found_by_module_name() {
        assert!(is_norm_param("backbone.stem.stem_1.norm.weight"));
        assert!(is_norm_param("backbone.res2.0.norm3.bias"));
        assert!(is_norm_param("roi_heads.box_head.conv1.pw_norm.weight"));
        assert!(!is_norm_param("backbone.stem.stem_1.conv.weight"));
        assert!(!is_norm_param("normalizer.weight"));
        assert!(!is_norm_param("norm"));
        let config = SolverConfig { weight_decay_bias: Some(0.5), ..SolverConfig::default() };
        assert_eq!(weight_decay_for("a.norm.bias", &config), 0.5);
        assert_eq!(weight_decay_for("a.norm.weight", &config), 0.0);
        assert_eq!(weight_decay_for("a.conv.weight", &config), 1e-4);
        assert_eq!(weight_decay_for("a.norm.bias", &SolverConfig::default()), 0.0);
    }

    #[test]
    fn config_defaults_and_validation() {
        let config = SolverConfig::default();
        assert_eq!((config.max_iter, config.ims_per_batch, config.base_lr), (90_000, 16, 0.02));
        assert!(config.validate().is_ok());
        let bad = SolverConfig { accumulate: 3, ..SolverConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("solver.accumulate"));
        let custom = SolverConfig {
            weight_decay_bias: Some(0.0),
            lr_scheduler: LrSchedulerKind::Cosine,
            amp: AmpConfig { enabled: true, dtype: AmpDtype::Bf16, ..AmpConfig::default() },
            ..SolverConfig::default()
        };
        let text = toml::to_string_pretty(&custom).unwrap();
        assert_eq!(toml::from_str::<SolverConfig>(&text).unwrap(), custom, "{text}");
        let unknown = toml::from_str::<SolverConfig>("max_iters = 3").unwrap_err().to_string();
        assert!(unknown.contains("max_iters"), "{unknown}");
    }

    #[test]
    fn batch_scaling_is_linear_in_lr_and_inverse_in_iterations() {
        let mut config = SolverConfig { scale_lr_to_batch: true, ..SolverConfig::default() };
        let scaling = config.scale_to_batch(8).unwrap();
        assert_eq!(scaling.factor, 0.5);
        assert_eq!((config.base_lr, config.max_iter, config.warmup_iters), (0.01, 180_000, 2000));
        assert_eq!(config.steps, vec![120_000, 160_000]);
        assert!(config.scale_to_batch(8).is_none());
        assert!(SolverConfig::default().scale_to_batch(8).is_none());
    }

    #[test]
    fn loss_scaler_backs_off_and_grows() {
        let mut scaler = LossScaler::new(65536.0, 2);
        scaler.update(true);
        assert_eq!((scaler.scale, scaler.growth_tracker), (32768.0, 0));
        scaler.update(false);
        assert_eq!((scaler.scale, scaler.growth_tracker), (32768.0, 1));
        scaler.update(false);
        assert_eq!((scaler.scale, scaler.growth_tracker), (65536.0, 0));
        // A parameter whose gradient is [65536, inf].
        let param = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        (&param * Tensor::from_slice(&[65536.0f32, f32::INFINITY])).sum(Kind::Float).backward();
        assert!(scaler.unscale(std::slice::from_ref(&param)).unwrap());
        assert_eq!(param.grad().double_value(&[0]), 1.0);
        let finite = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        (&finite * 65536.0).sum(Kind::Float).backward();
        assert!(!scaler.unscale(std::slice::from_ref(&finite)).unwrap());
    }

    #[test]
    fn non_finite_losses_name_iteration_and_term() {
        assert!(check_losses(3, [("loss_cls", 1.0), ("loss_box_reg", 0.5)]).is_ok());
        // After 7 completed steps the failing iteration is the 8th, as the log numbers it.
        let message = check_losses(7, [("loss_cls", 1.0), ("loss_mask", f64::NAN)]).unwrap_err().to_string();
        assert!(message.contains("iteration 8:") && message.contains("loss_mask"), "{message}");
    }
}
