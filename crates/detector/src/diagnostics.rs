//! Counters the model keeps on the device during a training step, for the trainer to read with the step's one host
//! read (detectron2's `EventStorage.put_scalar`, without the host read per value). Each thread has its own
//! counters, so models trained on different threads (tests, processes' main threads) never mix.

use std::cell::RefCell;
use std::collections::BTreeMap;

use tch::Tensor;

thread_local! {
    static COUNTERS: RefCell<BTreeMap<String, Tensor>> = const { RefCell::new(BTreeMap::new()) };
}

/// Adds the 0-dim `value` to the counter `name` (on the device: nothing is read).
pub fn add(name: &str, value: &Tensor) {
    COUNTERS.with(|counters| {
        let mut counters = counters.borrow_mut();
        let total = match counters.get(name) {
            Some(earlier) => earlier + value,
            None => value.detach(),
        };
        counters.insert(name.to_string(), total);
    });
}

/// The counters added since the last call (0-dim tensors by name), leaving none.
pub fn take() -> BTreeMap<String, Tensor> {
    COUNTERS.with(|counters| std::mem::take(&mut *counters.borrow_mut()))
}
