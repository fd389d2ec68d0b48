//! RoIAlign's reduction, weighted bags of rows, with a backward whose memory is proportional to its output.
//!
//! The forward is `embedding_bag` (sum mode, per-sample weights). Its own backward on CUDA keeps a partial sum of
//! all channels for every group of at most ten entries, which for RoIAlign's taps is taps / 10 x channels floats
//! or more. On CUDA (and any device but the CPU) the backward is therefore the transposed reduction
//! (src/ops/pool_rows_shim.cpp, a libtorch autograd function built from ATen operators): one more `embedding_bag`
//! over the output gradient whose bags are the input rows, which allocates the input gradient and index lists as
//! long as the entries and needs no host read. It equals `embedding_bag`'s backward up to float32 rounding (each
//! input row sums its entries in entry order; libtorch's kernels add them in another).
//!
//! On the CPU, libtorch's own backward already adds every entry straight into the input gradient, so it keeps it:
//! the transposed one only adds its sort and index lists there. Measured (release builds, R-50-FPN training step,
//! 512x512, batch 2, `trainer bench train ... --iters 5 --warmup 2`, two alternating runs each): 4.29 / 4.36 s
//! and 3.22 / 3.21 GB peak RSS with libtorch's backward, 4.47 / 4.44 s and 3.35 / 3.38 GB with the transposed one.

use std::ffi::{c_char, c_void, CStr};

use tch::Tensor;

extern "C" {
    fn vovdet_pool_rows(
        features: *const c_void,
        input_row: *const c_void,
        weight: *const c_void,
        offsets: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn vovdet_detector_free_message(message: *mut c_char);
}

/// Output row `b` (`[B, C]`) is the sum of `weight[e] * features[input_row[e]]` over the entries
/// `offsets[b]..offsets[b + 1]`, differentiable with respect to `features` (`[R, C]`; `input_row` `[E]` i64,
/// `weight` `[E]` of the features' kind, `offsets` `[B + 1]` i64 ending with `E`), with the backward chosen by
/// device (see the module documentation). Panics, as tch's operators do, when libtorch rejects the arguments.
pub(crate) fn pool_rows(features: &Tensor, input_row: &Tensor, weight: &Tensor, offsets: &Tensor) -> Tensor {
    if features.device() == tch::Device::Cpu {
        Tensor::embedding_bag(features, input_row, offsets, false, 0, false, Some(weight), true).0
    } else {
        transposed_pool_rows(features, input_row, weight, offsets)
    }
}

/// [`pool_rows`] with the transposed backward, on any device.
fn transposed_pool_rows(features: &Tensor, input_row: &Tensor, weight: &Tensor, offsets: &Tensor) -> Tensor {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: the four tensors are live for the call; on success the shim stores a new heap at::Tensor in `out`.
    let message = unsafe {
        vovdet_pool_rows(
            features.as_ptr().cast(),
            input_row.as_ptr().cast(),
            weight.as_ptr().cast(),
            offsets.as_ptr().cast(),
            &mut out,
        )
    };
    if !message.is_null() {
        // SAFETY: a NUL-terminated string the shim malloc'ed, freed exactly once here.
        let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
        unsafe { vovdet_detector_free_message(message) };
        panic!("pool_rows: {text}");
    }
    // SAFETY: allocated by the shim for us; ownership passes to tch.
    unsafe { Tensor::from_ptr(out.cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The transposed backward: the forward equals `embedding_bag`'s bit for bit and the gradient up to float32
    /// rounding (the sums run in another order), with empty bags and unread rows.
    #[test]
    fn equals_embedding_bag_forward_and_backward() {
        tch::manual_seed(3);
        let options = (Kind::Float, Device::Cpu);
        let features = Tensor::randn([50, 8], options);
        let input_row = Tensor::randint(40, [300], (Kind::Int64, Device::Cpu));
        let weight = Tensor::rand([300], options);
        let offsets = Tensor::from_slice(&[0i64, 0, 7, 7, 100, 180, 300]);
        let gradient = Tensor::randn([6, 8], options);
        let ours_input = features.copy().set_requires_grad(true);
        let theirs_input = features.copy().set_requires_grad(true);
        let ours = transposed_pool_rows(&ours_input, &input_row, &weight, &offsets);
        let (theirs, _, _, _) =
            Tensor::embedding_bag(&theirs_input, &input_row, &offsets, false, 0, false, Some(&weight), true);
        assert!(ours.equal(&theirs));
        (ours * &gradient).sum(Kind::Float).backward();
        (theirs * &gradient).sum(Kind::Float).backward();
        let difference = (ours_input.grad() - theirs_input.grad()).abs().max().double_value(&[]);
        let scale = theirs_input.grad().abs().max().double_value(&[]);
        assert!(scale > 1.0 && difference <= 1e-6 * scale, "gradients differ by {difference} (largest {scale})");
        assert_eq!(ours_input.grad().narrow(0, 40, 10).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
