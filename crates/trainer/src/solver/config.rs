//! The `[solver]` config section and its sub-sections, with detectron2's COCO 1x defaults.

use serde::{Deserialize, Serialize};

use super::error::SolverError;

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
#[serde(deny_unknown_fields, default)]
pub struct ClipGradientsConfig {
    /// Whether to clip.
    pub enabled: bool,
    /// Largest allowed global L2 norm (`torch.nn.utils.clip_grad_norm_`'s `max_norm`).
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
#[serde(deny_unknown_fields, default)]
pub struct AmpConfig {
    /// Whether to use autocast.
    pub enabled: bool,
    /// fp16 or bf16.
    pub dtype: AmpDtype,
    /// First fp16 loss scale (`torch.amp.GradScaler`'s `init_scale`).
    pub init_scale: f64,
    /// Good steps after which the fp16 loss scale doubles.
    pub growth_interval: u64,
}

/// The `[solver.ema]` section: an exponential moving average of the weights, updated after every step with
/// mmdetection's `ExpMomentumEMA` rule (YOLOX's): at update `t` (from 1) the EMA keeps
/// `decay_t = decay * (1 - exp(-t / warmup))` of itself and takes `1 - decay_t` of the weights, so the average
/// follows the weights closely at first and settles to `decay` after a few `warmup` updates (`warmup = 0`: `decay`
/// from the start, d2go's rule). Trainable parameters are averaged; buffers and frozen parameters are copied.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmaConfig {
    /// Whether to keep the average.
    pub enabled: bool,
    /// The decay it settles to, in [0, 1).
    pub decay: f64,
    /// Iterations over which the decay ramps up (the time constant of the ramp); 0 for none.
    pub warmup: u64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig { enabled: false, decay: 0.9998, warmup: 2000 }
    }
}

impl Default for ClipGradientsConfig {
    fn default() -> Self {
        ClipGradientsConfig { enabled: false, max_norm: 1.0 }
    }
}

impl Default for AmpConfig {
    fn default() -> Self {
        AmpConfig { enabled: false, dtype: AmpDtype::Fp16, init_scale: 65536.0, growth_interval: 2000 }
    }
}

/// The `[solver]` section. Defaults are detectron2's COCO 1x recipe (`Base-RCNN-FPN`: LR 0.02 for batch 16,
/// 90k iterations, steps 60k/80k, warm-up 1000 iterations from 0.001).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SolverConfig {
    /// Optimizer steps in the whole run.
    pub max_iter: u64,
    /// Total images per optimizer step over all processes and accumulated micro-batches.
    pub ims_per_batch: u64,
    /// Peak learning rate (after warm-up).
    pub base_lr: f64,
    /// Final learning rate of the cosine schedule.
    pub base_lr_end: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay of ordinary parameters.
    pub weight_decay: f64,
    /// Weight decay of normalization-layer parameters (see [`crate::solver::is_norm_param`]).
    pub weight_decay_norm: f64,
    /// Weight decay of every `*.bias`, overriding the two above; absent means biases follow their layer
    /// (detectron2's `WEIGHT_DECAY_BIAS = None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay_bias: Option<f64>,
    /// `multistep` or `cosine`.
    pub lr_scheduler: LrSchedulerKind,
    /// Iterations at which the multi-step schedule multiplies the LR by `gamma` (steps past `max_iter` are ignored).
    pub steps: Vec<u64>,
    /// Multi-step decay factor.
    pub gamma: f64,
    /// Warm-up length in iterations.
    pub warmup_iters: u64,
    /// LR multiplier at iteration 0.
    pub warmup_factor: f64,
    /// `linear` or `constant`.
    pub warmup_method: WarmupMethod,
    /// Global-norm gradient clipping.
    pub clip_gradients: ClipGradientsConfig,
    /// Micro-batches accumulated into one optimizer step (each of `ims_per_batch / accumulate` images).
    pub accumulate: u64,
    /// Mixed precision.
    pub amp: AmpConfig,
    /// Scale the LR linearly (and the schedule's iterations inversely) when the actual total batch differs
    /// from `ims_per_batch`, as detectron2's `REFERENCE_WORLD_SIZE` does.
    pub scale_lr_to_batch: bool,
    /// Exponential moving average of the weights.
    pub ema: EmaConfig,
}

impl Default for SolverConfig {
    fn default() -> Self {
        SolverConfig {
            max_iter: 90_000,
            ims_per_batch: 16,
            base_lr: 0.02,
            base_lr_end: 0.0,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            weight_decay_norm: 0.0,
            weight_decay_bias: None,
            lr_scheduler: LrSchedulerKind::Multistep,
            steps: vec![60_000, 80_000],
            gamma: 0.1,
            warmup_iters: 1000,
            warmup_factor: 0.001,
            warmup_method: WarmupMethod::Linear,
            clip_gradients: ClipGradientsConfig::default(),
            accumulate: 1,
            amp: AmpConfig::default(),
            scale_lr_to_batch: false,
            ema: EmaConfig::default(),
        }
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
        if self.ema.enabled && !(0.0..1.0).contains(&self.ema.decay) {
            return bad("ema.decay", "must be in [0, 1)");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let config = SolverConfig::default();
        assert_eq!((config.max_iter, config.ims_per_batch, config.base_lr), (90_000, 16, 0.02));
        assert!(config.validate().is_ok());
        let bad = SolverConfig { accumulate: 3, ..SolverConfig::default() };
        let bad_ema =
            SolverConfig { ema: EmaConfig { enabled: true, decay: 1.0, warmup: 0 }, ..SolverConfig::default() };
        assert!(bad_ema.validate().unwrap_err().to_string().contains("solver.ema.decay"));
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
}
