//! Operator counts of a window of work, from a global libtorch RecordFunction callback (src/op_count_shim.cpp,
//! the mechanism behind torch.profiler). `trainer bench train` counts one training step: on CUDA each operator is
//! about one kernel launch, and the synchronising ones (`aten::_local_scalar_dense` behind every scalar read,
//! `aten::nonzero`, ...) stall the host, so the counts show launch and sync overhead on any machine.

use std::collections::BTreeMap;
use std::ffi::c_char;

use crate::shim::{take_message, take_string};

extern "C" {
    fn vovdet_op_count_start() -> *mut c_char;
    fn vovdet_op_count_stop(out: *mut *mut c_char) -> *mut c_char;
}

/// Operators that make the host wait for the device on CUDA (scalar reads, data-dependent output sizes).
pub const SYNCHRONISING_OPS: [&str; 5] =
    ["aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim", "aten::_unique2"];

/// A failure of the operator counter.
#[derive(Debug, thiserror::Error)]
#[error("operator count: {0}")]
pub struct OpCountError(String);

/// Counts every operator `f` dispatches (on all threads) and returns `f`'s result with the counts by name.
pub fn count_ops<T>(f: impl FnOnce() -> T) -> Result<(T, BTreeMap<String, u64>), OpCountError> {
    // SAFETY: plain call; a non-NULL result is an error message.
    if let Some(message) = take_message(unsafe { vovdet_op_count_start() }) {
        return Err(OpCountError(message));
    }
    let result = f();
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: the shim sets `out` to a malloc'ed string on success.
    if let Some(message) = take_message(unsafe { vovdet_op_count_stop(&mut out) }) {
        return Err(OpCountError(message));
    }
    let text = take_string(out);
    let counts = text
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter_map(|(name, count)| Some((name.to_string(), count.parse().ok()?)))
        .collect();
    Ok((result, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn counts_the_operators_of_a_window() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let (value, counts) = count_ops(|| (&x * 2.0).sum(tch::Kind::Float).double_value(&[])).unwrap();
        assert_eq!(value, 12.0);
        assert!(counts.get("aten::mul").copied().unwrap_or(0) >= 1, "{counts:?}");
        assert!(counts.get("aten::_local_scalar_dense").copied().unwrap_or(0) >= 1, "{counts:?}");
        // Nothing is counted outside the window.
        let (_, again) = count_ops(|| ()).unwrap();
        assert!(again.is_empty(), "{again:?}");
    }
}
