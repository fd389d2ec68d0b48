//! What the trainer's C++ shims share on the Rust side: every shim function reports failure as a malloc'ed
//! message (NULL means success; see torch-link's include/vovdet_shim.h), freed through one function of the
//! shims' library.

use std::ffi::{c_char, CStr};

extern "C" {
    fn vovdet_free_message(message: *mut c_char);
}

/// Takes ownership of a string the shims malloc'ed (an error message or a result text) and frees it.
/// `text` must be non-NULL.
pub(crate) fn take_string(text: *mut c_char) -> String {
    // SAFETY: `text` is a NUL-terminated string from malloc, freed exactly once here.
    let owned = unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned();
    unsafe { vovdet_free_message(text) };
    owned
}

/// A shim function's result: `None` on success (NULL), else its error message.
pub(crate) fn take_message(message: *mut c_char) -> Option<String> {
    (!message.is_null()).then(|| take_string(message))
}
