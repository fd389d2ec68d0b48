//! Operator counts of a window of work, from a thread-local libtorch RecordFunction callback
//! (src/op_count_shim.cpp, the mechanism behind torch.profiler): the calling thread's operators and those of the
//! autograd work it starts, not other threads' (loader workers). `trainer bench train` counts one training step,
//! and `log.sync_counts` every step of a run: on CUDA each operator is about one kernel launch, and the
//! synchronising ones (`aten::_local_scalar_dense` behind every scalar read, `aten::nonzero`, ...) stall the
//! host, so the counts show launch and sync overhead on any machine. [`SyncCounts`] adds the `transfer` crate's
//! copies.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int};

use crate::shim::{take_message, take_string};

extern "C" {
    fn vovdet_op_count_start(with_trace: c_int) -> *mut c_char;
    fn vovdet_op_count_stop(counts: *mut *mut c_char, trace: *mut *mut c_char) -> *mut c_char;
}

/// Operators that make the host wait for the device on CUDA (scalar reads, data-dependent output sizes).
pub const SYNCHRONISING_OPS: [&str; 5] =
    ["aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim", "aten::_unique2"];

/// A failure of the operator counter.
#[derive(Debug, thiserror::Error)]
#[error("operator count: {0}")]
pub struct OpCountError(String);

/// Counts every operator `f` dispatches (on this thread and in the autograd work it starts) and returns `f`'s
/// result with the counts by name. Windows do not nest.
pub fn count_ops<T>(f: impl FnOnce() -> T) -> Result<(T, BTreeMap<String, u64>), OpCountError> {
    let (result, (counts, _)) = window(false, f)?;
    Ok((result, counts))
}

/// Records every operator `f` dispatches, as [`count_ops`] counts them, in dispatch order: one entry per
/// operator, `name(inputs)` with tensors as dtype and sizes (`Float[2,3,64,96]`), integers and integer lists as
/// values and anything else as `_`. libtorch (2.11) hands some operators to the callback without their inputs
/// although it asks for them, a different set in each window; those entries read `name(?)`. Two windows whose
/// traces agree ([`compare_traces`]) dispatch the same kernels on tensors of the same shapes, which is what
/// replaying a captured CUDA graph needs.
pub fn trace_ops<T>(f: impl FnOnce() -> T) -> Result<(T, Vec<String>), OpCountError> {
    let (result, (_, trace)) = window(true, f)?;
    Ok((result, trace))
}

/// Compares two [`trace_ops`] traces: the operators must match one for one, and their inputs wherever both
/// traces recorded them. Returns how many entries had their inputs compared, or a description of the first
/// difference with the entries around it.
pub fn compare_traces(a: &[String], b: &[String]) -> Result<usize, String> {
    let split = |entry: &str| -> (String, Option<String>) {
        let (name, inputs) = entry.split_once('(').unwrap_or((entry, ""));
        (name.to_string(), (inputs != "?)").then(|| inputs.to_string()))
    };
    let context = |trace: &[String], at: usize| trace[at.saturating_sub(3)..(at + 3).min(trace.len())].join("\n  ");
    let mut compared = 0;
    for (at, (x, y)) in a.iter().zip(b).enumerate() {
        let ((name_x, inputs_x), (name_y, inputs_y)) = (split(x), split(y));
        let same = name_x == name_y
            && match (inputs_x, inputs_y) {
                (Some(p), Some(q)) => {
                    compared += 1;
                    p == q
                }
                _ => true,
            };
        if !same {
            return Err(format!(
                "the traces part at operator {at} of {}:\n  {}\nvs\n  {}",
                a.len(),
                context(a, at),
                context(b, at)
            ));
        }
    }
    if a.len() != b.len() {
        return Err(format!("the traces have {} and {} operators", a.len(), b.len()));
    }
    Ok(compared)
}

/// What one window recorded: the counts by operator name, and the trace (empty unless asked for).
type Recorded = (BTreeMap<String, u64>, Vec<String>);

fn window<T>(with_trace: bool, f: impl FnOnce() -> T) -> Result<(T, Recorded), OpCountError> {
    // SAFETY: plain call; a non-NULL result is an error message.
    if let Some(message) = take_message(unsafe { vovdet_op_count_start(c_int::from(with_trace)) }) {
        return Err(OpCountError(message));
    }
    let result = f();
    let (mut counts_text, mut trace_text): (*mut c_char, *mut c_char) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: the shim sets both outputs to malloc'ed strings on success.
    if let Some(message) = take_message(unsafe { vovdet_op_count_stop(&mut counts_text, &mut trace_text) }) {
        return Err(OpCountError(message));
    }
    let counts = take_string(counts_text)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter_map(|(name, count)| Some((name.to_string(), count.parse().ok()?)))
        .collect();
    let trace = take_string(trace_text).lines().map(str::to_string).collect();
    Ok((result, (counts, trace)))
}

/// Where a window of work makes the host wait for the device, from its operator counts and its `transfer` copies
/// (the copies are counted on the CPU as they would happen on a GPU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncCounts {
    /// Operators that make the host wait for a CUDA device ([`SYNCHRONISING_OPS`]).
    pub synchronising_ops: u64,
    /// Points where the host waits: the synchronising operators plus the downloads.
    pub host_syncs: u64,
    /// Host<->device copies: uploads, downloads and moves, plus the scalar reads (`aten::_local_scalar_dense`).
    pub transfers: u64,
    /// Of those, the ones the host waits for: downloads, moves and scalar reads (uploads go through pinned memory
    /// without blocking).
    pub blocking_transfers: u64,
}

impl SyncCounts {
    /// The counts of a window with operator counts `ops` ([`count_ops`]) and copies `copies`.
    pub fn of(ops: &BTreeMap<String, u64>, copies: &transfer::Counts) -> Self {
        let count = |op: &str| ops.get(op).copied().unwrap_or(0);
        let synchronising_ops: u64 = SYNCHRONISING_OPS.iter().map(|op| count(op)).sum();
        // Each scalar read is a device-to-host copy too.
        let scalar_reads = count("aten::_local_scalar_dense");
        SyncCounts {
            synchronising_ops,
            host_syncs: synchronising_ops + copies.downloads,
            transfers: copies.transfers() + scalar_reads,
            blocking_transfers: copies.blocking_transfers() + scalar_reads,
        }
    }
}

/// Runs `f` in a [`count_ops`] window and returns its result with the window's [`SyncCounts`].
pub fn count_syncs<T>(f: impl FnOnce() -> T) -> Result<(T, SyncCounts), OpCountError> {
    let before = transfer::counts();
    let (result, ops) = count_ops(f)?;
    Ok((result, SyncCounts::of(&ops, &transfer::counts().since(&before))))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use tch::Tensor;

    /// Windows do not nest, and the tests run in parallel.
    static WINDOW: Mutex<()> = Mutex::new(());

    #[test]
    fn counts_the_operators_of_a_window() {
        let _window = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let (value, counts) = count_ops(|| (&x * 2.0).sum(tch::Kind::Float).double_value(&[])).unwrap();
        assert_eq!(value, 12.0);
        assert!(counts.get("aten::mul").copied().unwrap_or(0) >= 1, "{counts:?}");
        assert!(counts.get("aten::_local_scalar_dense").copied().unwrap_or(0) >= 1, "{counts:?}");
        // Nothing is counted outside the window.
        let (_, again) = count_ops(|| ()).unwrap();
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn other_threads_are_not_counted_and_syncs_add_copies() {
        let _window = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let ((), counts) = count_ops(|| {
            std::thread::spawn(|| {
                let _ = Tensor::from_slice(&[1.0f32]).nonzero();
            })
            .join()
            .unwrap();
        })
        .unwrap();
        assert!(counts.is_empty(), "{counts:?}");
        let (_, syncs) = count_syncs(|| {
            let _ = transfer::download_vec::<f32>(&(&x * 2.0)).unwrap();
            x.nonzero()
        })
        .unwrap();
        assert_eq!(syncs, SyncCounts { synchronising_ops: 1, host_syncs: 2, transfers: 1, blocking_transfers: 1 });
    }

    #[test]
    fn traces_list_operators_in_order_with_input_shapes() {
        let _window = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
        let run = |rows: i64| {
            let x = Tensor::ones([rows, 3], (tch::Kind::Float, tch::Device::Cpu));
            trace_ops(|| x.narrow(1, 0, 2).sum_dim_intlist([0i64].as_slice(), false, tch::Kind::Float)).unwrap().1
        };
        let trace = run(4);
        // With its inputs (dim, start, length) when libtorch passed them.
        assert!(["aten::narrow(Float[4,3], 1, 0, 2)", "aten::narrow(?)"].contains(&trace[0].as_str()), "{trace:?}");
        assert!(compare_traces(&trace, &run(4)).is_ok());
        let names =
            |trace: &[String]| trace.iter().map(|e| e.split('(').next().unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(names(&run(5)), names(&trace), "the same operators");
        let wider = ["aten::slice(Float[5,3], 1, 0, 2, 1)".to_string()];
        assert!(compare_traces(&["aten::slice(Float[4,3], 1, 0, 2, 1)".to_string()], &wider).is_err());
        assert_eq!(compare_traces(&["aten::slice(?)".to_string()], &wider), Ok(0));
        assert!(compare_traces(&["aten::sum(?)".to_string()], &wider).is_err(), "another operator");
        assert!(compare_traces(&[], &wider).is_err(), "another length");
    }
}
