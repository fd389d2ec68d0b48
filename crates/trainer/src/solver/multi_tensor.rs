//! Safe wrappers over src/optim_shim.cpp (libtorch's `_foreach_*` operators); see there.

use std::ffi::{c_char, c_int, c_void};

use tch::Tensor;

use super::error::SolverError;
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
        apply: RawTensor,
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
    fn vovdet_ema_update(averaged: *const RawTensor, sources: *const RawTensor, count: i64, decay: f64) -> *mut c_char;
    fn vovdet_copy_tensors(targets: *const RawTensor, sources: *const RawTensor, count: i64) -> *mut c_char;
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

/// One SGD step over `group` (parameters with gradients and the same decay, each with its momentum buffer),
/// applied where the 0-dim bool `apply` on their device is true and a bit-exact no-op where it is false (no host
/// read); creates missing buffers (zeros).
pub(super) fn sgd_step(
    mut group: Vec<(&Tensor, &mut Option<Tensor>)>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
    apply: &Tensor,
) -> Result<(), SolverError> {
    let params: Vec<RawTensor> = group.iter().map(|(tensor, _)| raw(tensor)).collect();
    let mut buffers: Vec<RawTensor> =
        group.iter().map(|(_, buffer)| buffer.as_ref().map_or(std::ptr::null_mut(), raw)).collect();
    let had_buffer: Vec<bool> = buffers.iter().map(|b| !b.is_null()).collect();
    // SAFETY: `params` and `buffers` hold `count` live at::Tensor pointers (or NULL buffers) for the call, and
    // `apply` is live.
    let result = check(unsafe {
        vovdet_sgd_step(
            params.as_ptr(),
            buffers.as_mut_ptr(),
            params.len() as i64,
            lr,
            momentum,
            weight_decay,
            c_int::from(nesterov),
            raw(apply),
        )
    });
    for (((_, momentum_buffer), buffer), had) in group.iter_mut().zip(&buffers).zip(had_buffer) {
        if !had && !buffer.is_null() {
            // SAFETY: the shim allocated this at::Tensor for us; ownership passes to tch.
            **momentum_buffer = Some(unsafe { Tensor::from_ptr(buffer.cast()) });
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
pub(super) fn unscale_grads(params: &[Tensor], found_inf: &Tensor, inverse_scale: &Tensor) -> Result<(), SolverError> {
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

/// One EMA update: `averaged = averaged * decay + sources * (1 - decay)` (pairwise), in multi-tensor operations.
pub(super) fn ema_update(averaged: &[Tensor], sources: &[Tensor], decay: f64) -> Result<(), SolverError> {
    assert_eq!(averaged.len(), sources.len());
    let (averaged, sources) = (raws(averaged), raws(sources));
    // SAFETY: live tensors for the duration of the call; the lengths were checked above.
    check(unsafe { vovdet_ema_update(averaged.as_ptr(), sources.as_ptr(), averaged.len() as i64, decay) })
}

/// Copies `sources[i]` into `targets[i]` (same shapes), in one multi-tensor operation.
pub(super) fn copy_tensors(targets: &[Tensor], sources: &[Tensor]) -> Result<(), SolverError> {
    assert_eq!(targets.len(), sources.len());
    let (targets, sources) = (raws(targets), raws(sources));
    // SAFETY: live tensors for the duration of the call; the lengths were checked above.
    check(unsafe { vovdet_copy_tensors(targets.as_ptr(), sources.as_ptr(), targets.len() as i64) })
}
