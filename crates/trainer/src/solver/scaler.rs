//! The dynamic fp16 loss scaler (`torch.amp.GradScaler`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::error::SolverError;
use super::multi_tensor;

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
    /// `_amp_foreach_non_finite_check_and_unscale_`, grouped by device); returns a `[1]` float tensor on the first
    /// parameter's device that is non-zero when any gradient is inf or NaN (no host read).
    pub fn unscale(&self, params: &[Tensor]) -> Result<Tensor, SolverError> {
        let _no_grad = tch::no_grad_guard();
        let inverse = (1.0 / self.scale) as f32;
        let mut devices: Vec<tch::Device> = Vec::new();
        for device in params.iter().map(Tensor::device) {
            if !devices.contains(&device) {
                devices.push(device);
            }
        }
        let mut found_non_finite: Option<Tensor> = None;
        for device in devices {
            let on_device: Vec<Tensor> =
                params.iter().filter(|p| p.device() == device).map(Tensor::shallow_clone).collect();
            let found_inf = Tensor::zeros([1], (Kind::Float, device));
            let inverse_scale = transfer::upload(&Tensor::from_slice(&[inverse]), device);
            multi_tensor::unscale_grads(&on_device, &found_inf, &inverse_scale)?;
            found_non_finite = Some(match found_non_finite {
                None => found_inf,
                Some(found) => transfer::to_device(&found_inf, found.device()) + found,
            });
        }
        Ok(found_non_finite.unwrap_or_else(|| Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))))
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(scaler.unscale(std::slice::from_ref(&param)).unwrap().double_value(&[0]) != 0.0);
        assert_eq!(param.grad().double_value(&[0]), 1.0);
        let finite = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        (&finite * 65536.0).sum(Kind::Float).backward();
        assert_eq!(scaler.unscale(std::slice::from_ref(&finite)).unwrap().double_value(&[0]), 0.0);
    }
}
