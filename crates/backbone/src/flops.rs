//! Multiply-accumulate counting for `trainer info` and the benchmarks.
//!
//! Layers report their cost while a count is active on the current thread; outside a count the hooks are a
//! single thread-local read. One multiply-accumulate counts as one FLOP, the convention of fvcore and
//! detectron2's `flop_count`, so our GFLOPs compare directly with the numbers detectron2 users see.

use std::cell::Cell;

thread_local! {
    static MACS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` and returns its result with the multiply-accumulates the layers reported meanwhile.
pub fn count_macs<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let outer = MACS.with(|m| m.replace(Some(0)));
    let result = f();
    let counted = MACS.with(|m| m.replace(outer)).unwrap_or(0);
    if let Some(outer) = outer {
        MACS.with(|m| m.set(Some(outer + counted)));
    }
    (result, counted)
}

/// Adds `macs` to the active count, if any. Called by layers from their forward pass.
pub fn record_macs(macs: u64) {
    MACS.with(|m| {
        if let Some(total) = m.get() {
            m.set(Some(total + macs));
        }
    });
}

/// Whether a count is active, so that layers can skip computing their cost otherwise.
pub fn counting() -> bool {
    MACS.with(|m| m.get().is_some())
}
