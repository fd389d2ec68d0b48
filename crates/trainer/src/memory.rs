//! Peak memory for `trainer bench`: on CUDA the caching allocator's peak allocated bytes (what
//! `torch.cuda.max_memory_allocated` reports), read through a small C++ shim (src/memory_shim.cpp) over torch's
//! device-generic allocator API; on CPU the peak resident set of the process (`VmHWM`).

use std::ffi::c_char;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::shim::take_message;

extern "C" {
    fn vovdet_cuda_memory_stats(device: i8, out: *mut i64) -> *mut c_char;
    fn vovdet_cuda_reset_peak_memory(device: i8) -> *mut c_char;
}

/// A failure of the allocator statistics (e.g. no CUDA allocator registered in this process).
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// libtorch raised an error reading or resetting the statistics of this CUDA device.
    #[error("CUDA allocator statistics of cuda:{device}: {message}")]
    Allocator {
        /// The CUDA device index.
        device: usize,
        /// libtorch's message.
        message: String,
    },
    /// The process's peak resident set could not be read or reset.
    #[error("peak resident memory: {0}")]
    Rss(String),
}

/// Turns the shim's result (NULL or a malloc'ed message) into a `Result`.
fn check(device: usize, message: *mut c_char) -> Result<(), MemoryError> {
    match take_message(message) {
        None => Ok(()),
        Some(message) => Err(MemoryError::Allocator { device, message }),
    }
}

/// Allocated and reserved bytes of one CUDA device's caching allocator, summed over its pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CudaMemoryStats {
    /// Bytes in live tensors now (`torch.cuda.memory_allocated`).
    pub allocated_bytes: i64,
    /// Peak of `allocated_bytes` since the last reset (`torch.cuda.max_memory_allocated`).
    pub peak_allocated_bytes: i64,
    /// Bytes held from the driver now, cached or in use (`torch.cuda.memory_reserved`).
    pub reserved_bytes: i64,
    /// Peak of `reserved_bytes` since the last reset (`torch.cuda.max_memory_reserved`).
    pub peak_reserved_bytes: i64,
}

/// The caching allocator's statistics of CUDA device `device`.
pub fn cuda_memory_stats(device: usize) -> Result<CudaMemoryStats, MemoryError> {
    let mut out = [0i64; 4];
    // SAFETY: the shim writes exactly four values into `out`.
    check(device, unsafe { vovdet_cuda_memory_stats(device as i8, out.as_mut_ptr()) })?;
    let [allocated_bytes, peak_allocated_bytes, reserved_bytes, peak_reserved_bytes] = out;
    Ok(CudaMemoryStats { allocated_bytes, peak_allocated_bytes, reserved_bytes, peak_reserved_bytes })
}

/// Resets the peaks of CUDA device `device` to the current values (`torch.cuda.reset_peak_memory_stats`).
pub fn reset_cuda_peak_memory(device: usize) -> Result<(), MemoryError> {
    // SAFETY: plain call; errors come back as a message.
    check(device, unsafe { vovdet_cuda_reset_peak_memory(device as i8) })
}

/// Peak resident memory of this process (`VmHWM` from `/proc/self/status`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What `peak_memory_bytes` of a benchmark measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakMemorySource {
    /// The CUDA caching allocator's peak allocated bytes (`torch.cuda.max_memory_allocated`).
    CudaMaxMemoryAllocated,
    /// The process's peak resident set (`VmHWM`, like `ru_maxrss`), which includes libtorch itself.
    PeakRss,
}

/// Starts a peak-memory window on `device`: resets the CUDA allocator's peaks, or on CPU the process's `VmHWM`
/// (Linux `clear_refs` code 5) so that it restarts from the current resident set.
pub fn reset_peak_memory(device: Device) -> Result<(), MemoryError> {
    match device {
        Device::Cuda(index) => {
            // The caching allocator sets up its per-device state on the first CUDA allocation; before that it
            // answers "Invalid device argument".
            let _ = Tensor::zeros([1], (Kind::Float, device));
            reset_cuda_peak_memory(index)
        }
        _ => std::fs::write("/proc/self/clear_refs", "5")
            .map_err(|e| MemoryError::Rss(format!("cannot reset VmHWM through /proc/self/clear_refs: {e}"))),
    }
}

/// The peak since the last [`reset_peak_memory`] (or the process start), in bytes, and what it measures.
pub fn peak_memory(device: Device) -> Result<(u64, PeakMemorySource), MemoryError> {
    match device {
        Device::Cuda(index) => {
            let peak = cuda_memory_stats(index)?.peak_allocated_bytes;
            Ok((peak.max(0) as u64, PeakMemorySource::CudaMaxMemoryAllocated))
        }
        _ => peak_rss_bytes()
            .map(|bytes| (bytes, PeakMemorySource::PeakRss))
            .ok_or_else(|| MemoryError::Rss("no VmHWM line in /proc/self/status".into())),
    }
}
