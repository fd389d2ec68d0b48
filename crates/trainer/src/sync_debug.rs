//! CUDA's sync debug mode around the training steps that should not sync (`log.cuda_sync_debug`): the check by
//! the CUDA runtime itself, next to the trainer's own counter (`log.sync_counts`, [`crate::op_count`]).
//!
//! While the mode is on, libtorch warns (`warn`) or fails (`error`) at every CUDA call that makes the host wait
//! for the device, on any thread (PyTorch's `torch.cuda.set_sync_debug_mode`). The engine turns it on only for
//! the steps that read nothing on the host (no log line, checkpoint, evaluation or stop at them) after the first
//! two of a run, where a step of the GPU-shaped config has no sync at all, and off after each. With `warn`, each
//! sync prints libtorch's `Warning: called a synchronizing CUDA operation` to standard error (count them in the
//! log); with `error`, the first one fails the step and the run stops with libtorch's error, naming the
//! iteration.

use std::ffi::{c_char, c_int};

use serde::{Deserialize, Serialize};

use crate::shim::take_message;

extern "C" {
    fn vovdet_set_cuda_sync_debug_mode(mode: c_int) -> *mut c_char;
    fn vovdet_cuda_sync_debug_mode() -> c_int;
}

/// `log.cuda_sync_debug`: what a host sync does in the steps that should have none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CudaSyncDebug {
    /// Nothing (the default).
    #[default]
    Off,
    /// libtorch prints a warning at each sync.
    Warn,
    /// The first sync fails the step.
    Error,
}

impl CudaSyncDebug {
    fn code(self) -> c_int {
        match self {
            CudaSyncDebug::Off => 0,
            CudaSyncDebug::Warn => 1,
            CudaSyncDebug::Error => 2,
        }
    }

    /// The mode as written in a config.
    pub fn name(self) -> &'static str {
        match self {
            CudaSyncDebug::Off => "off",
            CudaSyncDebug::Warn => "warn",
            CudaSyncDebug::Error => "error",
        }
    }

    /// Checks that this mode can be used for a run on `device`: only on CUDA, with a trainer built against a CUDA
    /// libtorch. The error names `log.cuda_sync_debug`.
    pub fn check(self, device: tch::Device) -> anyhow::Result<()> {
        if self == CudaSyncDebug::Off {
            return Ok(());
        }
        anyhow::ensure!(
            device.is_cuda(),
            "log.cuda_sync_debug = \"{}\" needs a CUDA device; this run is on {device:?}",
            self.name()
        );
        set_mode(self).and_then(|()| set_mode(CudaSyncDebug::Off))
    }
}

/// Sets the process-wide mode.
fn set_mode(mode: CudaSyncDebug) -> anyhow::Result<()> {
    // SAFETY: takes a plain integer; the result is NULL or a message we own.
    let message = unsafe { vovdet_set_cuda_sync_debug_mode(mode.code()) };
    take_message(message)
        .map_or(Ok(()), |text| Err(anyhow::anyhow!("log.cuda_sync_debug = \"{}\": {text}", mode.name())))
}

/// The process-wide mode now.
pub fn current_mode() -> CudaSyncDebug {
    // SAFETY: reads a process-wide integer.
    match unsafe { vovdet_cuda_sync_debug_mode() } {
        1 => CudaSyncDebug::Warn,
        2 => CudaSyncDebug::Error,
        _ => CudaSyncDebug::Off,
    }
}

/// The mode switched on for a scope: set by [`SyncDebugScope::enter`], back to off when dropped (also when the
/// step fails).
#[derive(Debug)]
pub struct SyncDebugScope {
    on: bool,
}

impl SyncDebugScope {
    /// Turns `mode` on until the scope is dropped (nothing for [`CudaSyncDebug::Off`]).
    pub fn enter(mode: CudaSyncDebug) -> anyhow::Result<SyncDebugScope> {
        if mode == CudaSyncDebug::Off {
            return Ok(SyncDebugScope { on: false });
        }
        set_mode(mode)?;
        Ok(SyncDebugScope { on: true })
    }
}

impl Drop for SyncDebugScope {
    fn drop(&mut self) {
        if self.on {
            // Turning the mode off cannot fail.
            let _ = set_mode(CudaSyncDebug::Off);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mode is refused off CUDA, naming the key; where libtorch has CUDA, a scope sets the very state that
    /// libc10_cuda's own sync checks read (its `warning_state()`, found by name) and clears it when dropped.
    #[test]
    fn the_scope_sets_libtorchs_own_state_and_clears_it() {
        let message = CudaSyncDebug::Warn.check(tch::Device::Cpu).unwrap_err().to_string();
        assert!(message.contains("log.cuda_sync_debug = \"warn\" needs a CUDA device"), "{message}");
        // SAFETY: dlopen with RTLD_NOLOAD only finds an already loaded library; dlsym reads its symbol table.
        let state = unsafe {
            let library = libc::dlopen(c"libc10_cuda.so".as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            if library.is_null() {
                eprintln!("libtorch has no CUDA library loaded here; nothing to compare");
                return;
            }
            libc::dlsym(library, c"_ZZN3c104cuda13warning_stateEvE14warning_state_".as_ptr()) as *const c_int
        };
        assert!(!state.is_null(), "libc10_cuda.so has no warning_state");
        for mode in [CudaSyncDebug::Warn, CudaSyncDebug::Error] {
            let scope = SyncDebugScope::enter(mode).unwrap();
            assert_eq!(current_mode(), mode);
            // SAFETY: the symbol is c10::cuda::WarningState, whose one field is the mode (an int-sized enum).
            assert_eq!(unsafe { *state }, mode.code(), "our mode is not the one libc10_cuda reads");
            drop(scope);
            assert_eq!(current_mode(), CudaSyncDebug::Off);
            // SAFETY: as above.
            assert_eq!(unsafe { *state }, 0);
        }
    }
}
