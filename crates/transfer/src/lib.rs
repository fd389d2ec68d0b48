//! Every copy between the host and the compute device that vovdet's training and inference make goes through
//! this crate, which counts it: [`upload`] (host data to the device, through pinned memory and a non-blocking copy
//! on CUDA, so the host does not wait), [`download`] and [`download_vec`] (device data read on the host, which
//! makes the host wait for the device), and [`to_device`] for a tensor that may already be where it is needed
//! (counted only when it moves; a blocking copy).
//!
//! The counts describe a GPU run even on the CPU, where these copies cost nothing: an upload or a download is
//! counted whatever the device, because on a GPU it would be a copy over PCIe. Scalar reads (`double_value`,
//! `int64_value`) are not wrapped: libtorch's operator counter sees them as `aten::_local_scalar_dense`, as it sees
//! the other synchronising operators (`nonzero`, `masked_select`); `trainer bench train` adds the two sources.

use std::sync::atomic::{AtomicU64, Ordering};

use tch::{kind::Element, Device, TchError, Tensor};

static UPLOADS: AtomicU64 = AtomicU64::new(0);
static DOWNLOADS: AtomicU64 = AtomicU64::new(0);
static MOVES: AtomicU64 = AtomicU64::new(0);

/// Copies counted since the process started (all threads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Host data copied to the compute device without the host waiting ([`upload`]).
    pub uploads: u64,
    /// Device data copied to the host ([`download`], [`download_vec`]); each makes the host wait.
    pub downloads: u64,
    /// Tensors [`to_device`] found on another device and moved (blocking).
    pub moves: u64,
}

impl Counts {
    /// Every copy: uploads, downloads and moves.
    pub fn transfers(&self) -> u64 {
        self.uploads + self.blocking_transfers()
    }

    /// The copies the host waits for: downloads and moves.
    pub fn blocking_transfers(&self) -> u64 {
        self.downloads + self.moves
    }

    /// The copies counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            uploads: self.uploads - earlier.uploads,
            downloads: self.downloads - earlier.downloads,
            moves: self.moves - earlier.moves,
        }
    }
}

/// The counts so far.
pub fn counts() -> Counts {
    Counts {
        uploads: UPLOADS.load(Ordering::Relaxed),
        downloads: DOWNLOADS.load(Ordering::Relaxed),
        moves: MOVES.load(Ordering::Relaxed),
    }
}

/// Host data (a tensor built on the CPU) copied to `device` without making the host wait: on CUDA through pinned
/// (page-locked) memory with a non-blocking copy queued on the current stream (libtorch keeps the pinned buffer
/// until the copy is done, and later work on that stream sees the data), elsewhere a plain copy. Counted on every
/// device (see the crate documentation).
pub fn upload(host: &Tensor, device: Device) -> Tensor {
    UPLOADS.fetch_add(1, Ordering::Relaxed);
    if device.is_cuda() {
        host.pin_memory(device).to_device_(device, host.kind(), true, false)
    } else {
        host.to_device(device)
    }
}

/// `tensor` on the CPU, for reading on the host; counted on every device.
pub fn download(tensor: &Tensor) -> Tensor {
    DOWNLOADS.fetch_add(1, Ordering::Relaxed);
    tensor.to_device(Device::Cpu)
}

/// The values of `tensor` (any shape, flattened in row-major order) as a vector on the host; one [`download`].
pub fn download_vec<T: Element + Copy>(tensor: &Tensor) -> Result<Vec<T>, TchError> {
    Vec::<T>::try_from(&download(tensor).contiguous().flatten(0, -1))
}

/// `tensor` on `device`: the tensor itself when it is already there (nothing counted), else a counted move.
pub fn to_device(tensor: &Tensor, device: Device) -> Tensor {
    if tensor.device() == device {
        return tensor.shallow_clone();
    }
    MOVES.fetch_add(1, Ordering::Relaxed);
    tensor.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_copy_is_counted_and_values_survive() {
        let before = counts();
        let host = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let on_device = upload(&host, Device::Cpu);
        assert_eq!(download_vec::<f32>(&on_device.transpose(0, 1)).unwrap(), [1.0, 3.0, 2.0, 4.0]);
        let same = to_device(&on_device, Device::Cpu);
        assert!(same.equal(&host));
        let counted = counts().since(&before);
        // Other tests may run in parallel threads: at least ours are counted; `to_device` in place counts nothing.
        assert!(counted.uploads >= 1 && counted.downloads >= 1, "{counted:?}");
        let counts = Counts { uploads: 4, downloads: 2, moves: 3 };
        assert_eq!((counts.transfers(), counts.blocking_transfers()), (9, 5));
    }
}
