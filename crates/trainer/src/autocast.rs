//! Mixed-precision regions for CUDA and CPU in fp16 or bf16, like `torch.autocast(device_type, dtype)`.
//! tch 0.24's `tch::autocast` only switches CUDA fp16 autocast; a small C++ shim (src/autocast_shim.cpp) sets
//! libtorch's per-device-type autocast state and dtype, and restores them when the region ends (also on panic).

use std::ffi::{c_char, c_int};

use tch::Device;

use crate::shim::take_message;
use crate::solver::AmpDtype;

extern "C" {
    fn vovdet_autocast_enter(
        cuda: c_int,
        bf16: c_int,
        previous_enabled: *mut c_int,
        previous_dtype: *mut c_int,
    ) -> *mut c_char;
    fn vovdet_autocast_exit(cuda: c_int, previous_enabled: c_int, previous_dtype: c_int) -> *mut c_char;
}

/// libtorch refused to enter an autocast region.
#[derive(Debug, thiserror::Error)]
#[error("autocast ({dtype:?}) on {device:?}: {message}")]
pub struct AutocastError {
    /// The device whose type the region was for.
    pub device: Device,
    /// The requested reduced-precision type.
    pub dtype: AmpDtype,
    /// libtorch's message.
    pub message: String,
}

/// An open autocast region; dropping it restores the state from before.
struct Region {
    cuda: c_int,
    previous_enabled: c_int,
    previous_dtype: c_int,
}

impl Region {
    fn enter(device: Device, dtype: AmpDtype) -> Result<Region, AutocastError> {
        let cuda = c_int::from(device.is_cuda());
        let bf16 = c_int::from(dtype == AmpDtype::Bf16);
        let (mut previous_enabled, mut previous_dtype) = (0, 0);
        // SAFETY: the shim writes one integer into each pointer.
        let message = unsafe { vovdet_autocast_enter(cuda, bf16, &mut previous_enabled, &mut previous_dtype) };
        match take_message(message) {
            None => Ok(Region { cuda, previous_enabled, previous_dtype }),
            Some(message) => Err(AutocastError { device, dtype, message }),
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: restores exactly what `enter` reported; the shim only calls libtorch's autocast setters.
        let message = unsafe { vovdet_autocast_exit(self.cuda, self.previous_enabled, self.previous_dtype) };
        if let Some(message) = take_message(message) {
            log::warn!("leaving autocast: {message}");
        }
    }
}

/// Runs `f` with autocast in `dtype` for `device`'s type (CUDA, or CPU for any other device), or plainly when
/// `dtype` is `None`. As with torch.autocast, only operators called on this thread are affected (the backward
/// pass runs in the types the forward pass chose).
pub fn autocast<T>(device: Device, dtype: Option<AmpDtype>, f: impl FnOnce() -> T) -> Result<T, AutocastError> {
    let Some(dtype) = dtype else { return Ok(f()) };
    let _region = Region::enter(device, dtype)?;
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn cpu_regions_cast_matmuls_and_restore_the_previous_state() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let product = |a: &Tensor| a.matmul(a).kind();
        for (dtype, kind) in [(AmpDtype::Bf16, Kind::BFloat16), (AmpDtype::Fp16, Kind::Half)] {
            let inner = autocast(Device::Cpu, Some(dtype), || {
                // Nested regions restore the outer one's dtype.
                let nested = autocast(Device::Cpu, Some(AmpDtype::Bf16), || product(&a)).unwrap();
                (nested, product(&a))
            })
            .unwrap();
            assert_eq!(inner, (Kind::BFloat16, kind));
        }
        assert_eq!(product(&a), Kind::Float);
        assert_eq!(autocast(Device::Cpu, None, || product(&a)).unwrap(), Kind::Float);
    }
}
