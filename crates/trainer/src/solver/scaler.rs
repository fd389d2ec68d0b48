//! The dynamic fp16 loss scaler (`torch.amp.GradScaler`), kept on the device.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::error::SolverError;
use super::multi_tensor;

/// The loss scaler's state as a checkpoint stores it (and as [`DeviceLossScaler::state`] reads it).
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
}

/// `torch.amp.GradScaler`'s dynamic loss scale, held on the device so that no step reads it on the host: the
/// loss is multiplied by `scale` before backward; a step whose unscaled gradients contain inf/NaN is skipped and
/// halves the scale; `growth_interval` good steps in a row double it (torch's `_amp_update_scale_`, the rule
/// itself).
#[derive(Debug)]
pub struct DeviceLossScaler {
    /// `[1]` float32, as GradScaler's `_scale`.
    scale: Tensor,
    /// `[1]` int32, as GradScaler's `_growth_tracker`.
    growth_tracker: Tensor,
    growth_interval: u64,
}

impl DeviceLossScaler {
    /// The scaler of `state` on `device`.
    pub fn new(state: &LossScaler, device: Device) -> Self {
        DeviceLossScaler {
            scale: Tensor::full([1], state.scale, (Kind::Float, device)),
            growth_tracker: Tensor::full([1], state.growth_tracker as i64, (Kind::Int, device)),
            growth_interval: state.growth_interval,
        }
    }

    /// The state, read on the host (for checkpoints).
    pub fn state(&self) -> Result<LossScaler, SolverError> {
        let both = Tensor::cat(&[self.scale.to_kind(Kind::Double), self.growth_tracker.to_kind(Kind::Double)], 0);
        let host = transfer::download_vec::<f64>(&both)?;
        Ok(LossScaler { scale: host[0], growth_tracker: host[1] as u64, growth_interval: self.growth_interval })
    }

    /// The current scale, `[1]` float32 on the device.
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// Divides the gradients of `params` by the scale in place (torch's fused
    /// `_amp_foreach_non_finite_check_and_unscale_`, grouped by device, with GradScaler's float64 reciprocal);
    /// returns a `[1]` float tensor on the scale's device that is non-zero when any gradient is inf or NaN (no
    /// host read).
    pub fn unscale(&self, params: &[Tensor]) -> Result<Tensor, SolverError> {
        let _no_grad = tch::no_grad_guard();
        let inverse = self.scale.to_kind(Kind::Double).reciprocal().to_kind(Kind::Float);
        let mut devices: Vec<Device> = Vec::new();
        for device in params.iter().map(Tensor::device) {
            if !devices.contains(&device) {
                devices.push(device);
            }
        }
        let mut found_non_finite = Tensor::zeros([1], (Kind::Float, self.scale.device()));
        for device in devices {
            let on_device: Vec<Tensor> =
                params.iter().filter(|p| p.device() == device).map(Tensor::shallow_clone).collect();
            let found_inf = Tensor::zeros([1], (Kind::Float, device));
            multi_tensor::unscale_grads(&on_device, &found_inf, &transfer::to_device(&inverse, device))?;
            let _ = found_non_finite.f_add_(&transfer::to_device(&found_inf, found_non_finite.device()))?;
        }
        Ok(found_non_finite)
    }

    /// Updates the scale after a step from [`DeviceLossScaler::unscale`]'s flag, on the device
    /// (`torch._amp_update_scale_`, growth 2, back-off 0.5).
    pub fn update(&mut self, found_inf: &Tensor) -> Result<(), SolverError> {
        let found_inf = found_inf.to_kind(Kind::Float);
        let _ = self.scale.f_internal_amp_update_scale_(
            &self.growth_tracker,
            &found_inf,
            2.0,
            0.5,
            self.growth_interval as i64,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scaler_backs_off_and_grows() {
        let mut scaler = DeviceLossScaler::new(&LossScaler::new(65536.0, 2), Device::Cpu);
        let flag = |value: f32| Tensor::from_slice(&[value]);
        let state = |scaler: &DeviceLossScaler| {
            let state = scaler.state().unwrap();
            (state.scale, state.growth_tracker)
        };
        scaler.update(&flag(1.0)).unwrap();
        assert_eq!(state(&scaler), (32768.0, 0));
        scaler.update(&flag(0.0)).unwrap();
        assert_eq!(state(&scaler), (32768.0, 1));
        scaler.update(&flag(0.0)).unwrap();
        assert_eq!(state(&scaler), (65536.0, 0));
        // A parameter whose gradient is [65536, inf].
        let param = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&param * Tensor::from_slice(&[65536.0f32, f32::INFINITY])).sum(Kind::Float).backward();
        assert!(scaler.unscale(std::slice::from_ref(&param)).unwrap().double_value(&[0]) != 0.0);
        assert_eq!(param.grad().double_value(&[0]), 1.0);
        let finite = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&finite * 65536.0).sum(Kind::Float).backward();
        assert_eq!(scaler.unscale(std::slice::from_ref(&finite)).unwrap().double_value(&[0]), 0.0);
        // Resuming from a saved state continues the same count.
        let saved = LossScaler { scale: 1024.0, growth_tracker: 1, growth_interval: 2 };
        let mut resumed = DeviceLossScaler::new(&saved, Device::Cpu);
        resumed.update(&flag(0.0)).unwrap();
        assert_eq!(state(&resumed), (2048.0, 0));
    }
}
