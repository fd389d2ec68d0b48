//! Raw declarations of the C ABI in `shim.cpp`, and the conversion of its error messages.

use std::ffi::{c_char, c_int, c_void, CStr};

/// Opaque `Group` of the shim (store, backend, rank, world size).
#[repr(C)]
pub(crate) struct RawGroup {
    _private: [u8; 0],
}

/// Opaque `VovdetReducer` of src/reducer.cpp (hooks and per-step state of a `GradReducer`).
#[repr(C)]
pub(crate) struct RawReducer {
    _private: [u8; 0],
}

/// An `at::Tensor*`, which is what tch's `C_tensor*` points to.
pub(crate) type RawTensor = *const c_void;

extern "C" {
    pub(crate) fn vovdet_dist_free_message(message: *mut c_char);
    pub(crate) fn vovdet_dist_init(
        backend: c_int,
        master_addr: *const c_char,
        master_port: u16,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        device_index: c_int,
        listen_fd: c_int,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    pub(crate) fn vovdet_dist_free(group: *mut RawGroup);
    pub(crate) fn vovdet_dist_all_reduce_sum(
        group: *mut RawGroup,
        tensors: *const RawTensor,
        count: usize,
        timeout_ms: i64,
    ) -> *mut c_char;
    pub(crate) fn vovdet_dist_broadcast(
        group: *mut RawGroup,
        tensors: *const RawTensor,
        count: usize,
        root: c_int,
        timeout_ms: i64,
    ) -> *mut c_char;
    pub(crate) fn vovdet_dist_all_gather(
        group: *mut RawGroup,
        input: RawTensor,
        outputs: *const RawTensor,
        timeout_ms: i64,
    ) -> *mut c_char;
    pub(crate) fn vovdet_dist_barrier(group: *mut RawGroup, timeout_ms: i64) -> *mut c_char;
    pub(crate) fn vovdet_dist_all_reduce_mean_autograd(
        group: *mut RawGroup,
        input: RawTensor,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub(crate) fn vovdet_reducer_new(
        group: *mut RawGroup,
        params: *const RawTensor,
        param_ids: *const i64,
        count: usize,
        bucket_ends: *const usize,
        bucket_count: usize,
        fp16: c_int,
        timeout_ms: i64,
        out: *mut *mut RawReducer,
    ) -> *mut c_char;
    pub(crate) fn vovdet_reducer_free(reducer: *mut RawReducer);
    pub(crate) fn vovdet_reducer_arm(reducer: *mut RawReducer) -> *mut c_char;
    pub(crate) fn vovdet_reducer_finish(
        reducer: *mut RawReducer,
        kind: *mut c_int,
        launched_in_backward: *mut usize,
    ) -> *mut c_char;
}

/// Takes ownership of a message returned by the shim: `None` for success, the text otherwise.
pub(crate) fn take_message(message: *mut c_char) -> Option<String> {
    if message.is_null() {
        return None;
    }
    // SAFETY: the shim returns either NULL or a NUL-terminated string from malloc, freed exactly once here.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().trim().to_string();
    unsafe { vovdet_dist_free_message(message) };
    Some(text)
}
