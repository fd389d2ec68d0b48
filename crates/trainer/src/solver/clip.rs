//! Global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).

use tch::Tensor;

use super::error::SolverError;
use super::multi_tensor;

/// `torch.nn.utils.clip_grad_norm_` over the gradients of `params` (L2): scales every gradient in place by
/// `min(1, max_norm / (total + 1e-6))` and returns the total norm before clipping, a 0-dim tensor on the
/// gradients' device (no host read); `None` without parameters.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<Option<Tensor>, SolverError> {
    if params.is_empty() {
        return Ok(None);
    }
    let _no_grad = tch::no_grad_guard();
    let total = multi_tensor::total_grad_norm(params)?;
    let coefficient = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    multi_tensor::scale_grads(params, &coefficient)?;
    Ok(Some(total))
}

/// The L2 norm of the gradients of `params` together, as torch computes it (norm of the per-tensor norms): a
/// 0-dim tensor on their device (no host read); `None` without parameters.
pub fn total_grad_norm(params: &[Tensor]) -> Result<Option<Tensor>, SolverError> {
    if params.is_empty() {
        return Ok(None);
    }
    Ok(Some(multi_tensor::total_grad_norm(params)?))
}
