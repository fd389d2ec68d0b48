//! The collectives of a [`ProcessGroup`]: all-reduce, broadcast, all-gather of tensors and byte blobs, barrier
//! and the differentiable mean SyncBN uses, each bounded by the group's timeout and checked for the shim's errors.

use std::ffi::{c_int, c_void};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::{ffi, millis, DistError, ProcessGroup, ReduceOp};

/// Every tensor kind, so that ranks can compare kinds as small integers.
const KINDS: [Kind; 20] = [
    Kind::Uint8,
    Kind::Int8,
    Kind::Int16,
    Kind::Int,
    Kind::Int64,
    Kind::Half,
    Kind::Float,
    Kind::Double,
    Kind::ComplexHalf,
    Kind::ComplexFloat,
    Kind::ComplexDouble,
    Kind::Bool,
    Kind::QInt8,
    Kind::QUInt8,
    Kind::QInt32,
    Kind::BFloat16,
    Kind::Float8e5m2,
    Kind::Float8e4m3fn,
    Kind::Float8e5m2fnuz,
    Kind::Float8e4m3fnuz,
];

/// Most dimensions [`ProcessGroup::all_gather`] accepts (shapes are exchanged in a fixed-size record).
const MAX_GATHER_DIMS: usize = 8;

impl ProcessGroup {
    /// Replaces every tensor, in place, by its sum or mean over ranks. All collectives are issued before any is
    /// awaited; each rank must pass tensors of the same shapes and kinds in the same order.
    pub fn all_reduce(&self, tensors: &[Tensor], op: ReduceOp) -> Result<(), DistError> {
        const OP: &str = "all_reduce";
        self.check_defined(OP, tensors)?;
        if op == ReduceOp::Avg {
            if let Some(i) = tensors.iter().position(|t| !t.is_floating_point()) {
                let kind = tensors[i].kind();
                return Err(self.invalid(OP, format!("tensor {i} has kind {kind:?}; Avg needs floating point")));
            }
        }
        let buffers = contiguous_buffers(tensors);
        let raws: Vec<ffi::RawTensor> = buffers.iter().map(raw_tensor).collect();
        let start = Instant::now();
        // SAFETY: `raws` points to live tensors for the duration of the call.
        let message = unsafe {
            ffi::vovdet_dist_all_reduce_sum(self.raw.as_ptr(), raws.as_ptr(), raws.len(), millis(self.timeout))
        };
        self.check(OP, start, message)?;
        if op == ReduceOp::Avg {
            for buffer in &buffers {
                let _ = buffer.shallow_clone().g_div_scalar_(self.world_size as f64);
            }
        }
        copy_back(tensors, &buffers);
        Ok(())
    }

    /// Overwrites every tensor, in place, with rank `root`'s values.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        const OP: &str = "broadcast";
        self.check_defined(OP, tensors)?;
        let root_c = self.check_root(OP, root)?;
        let buffers = contiguous_buffers(tensors);
        let raws: Vec<ffi::RawTensor> = buffers.iter().map(raw_tensor).collect();
        let start = Instant::now();
        // SAFETY: `raws` points to live tensors for the duration of the call.
        let message = unsafe {
            ffi::vovdet_dist_broadcast(self.raw.as_ptr(), raws.as_ptr(), raws.len(), root_c, millis(self.timeout))
        };
        self.check(OP, start, message)?;
        copy_back(tensors, &buffers);
        Ok(())
    }

    /// Returns every rank's `tensor`, indexed by rank. All ranks must pass the same shape and kind (checked: a
    /// mismatch is an error naming both ranks, not a hang); at most 8 dimensions.
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, DistError> {
        const OP: &str = "all_gather";
        self.check_defined(OP, std::slice::from_ref(tensor))?;
        let shape = tensor.size();
        if shape.len() > MAX_GATHER_DIMS {
            return Err(self.invalid(OP, format!("{} dimensions; at most {MAX_GATHER_DIMS}", shape.len())));
        }
        let kind = tensor.kind();
        let mut record = vec![-1i64; MAX_GATHER_DIMS + 2];
        record[0] = KINDS.iter().position(|k| *k == kind).map_or(-1, |i| i as i64);
        record[1] = shape.len() as i64;
        record[2..2 + shape.len()].copy_from_slice(&shape);
        let records = self.gather_same_shape(OP, &Tensor::from_slice(&record).to_device(tensor.device()))?;
        for (peer, peer_record) in records.iter().enumerate() {
            let peer_record = Vec::<i64>::try_from(peer_record.to_device(Device::Cpu))
                .map_err(|e| self.invalid(OP, format!("cannot read rank {peer}'s shape: {e}")))?;
            if peer_record != record {
                let peer_dims = usize::try_from(peer_record[1]).unwrap_or(0).min(MAX_GATHER_DIMS);
                let peer_kind = usize::try_from(peer_record[0]).ok().and_then(|i| KINDS.get(i));
                return Err(self.invalid(
                    OP,
                    format!(
                        "this rank has shape {shape:?} and kind {kind:?} but rank {peer} has shape {:?} and kind {}",
                        &peer_record[2..2 + peer_dims],
                        peer_kind.map_or("unknown".to_string(), |k| format!("{k:?}"))
                    ),
                ));
            }
        }
        self.gather_same_shape(OP, tensor)
    }

    /// Returns every rank's bytes, indexed by rank; lengths may differ (for gathering evaluation results).
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        const OP: &str = "all_gather_bytes";
        let length = Tensor::from_slice(&[bytes.len() as i64]).to_device(self.device);
        let lengths = self.gather_same_shape(OP, &length)?;
        let lengths: Vec<usize> = lengths.iter().map(|l| l.int64_value(&[0]).max(0) as usize).collect();
        let padded_len = lengths.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = bytes.to_vec();
        padded.resize(padded_len, 0);
        let gathered = self.gather_same_shape(OP, &Tensor::from_slice(&padded).to_device(self.device))?;
        gathered
            .iter()
            .zip(&lengths)
            .map(|(blob, &len)| {
                let mut out = vec![0u8; padded_len];
                blob.to_device(Device::Cpu)
                    .f_copy_data_u8(&mut out, padded_len)
                    .map_err(|e| self.invalid(OP, format!("cannot read gathered bytes: {e}")))?;
                out.truncate(len);
                Ok(out)
            })
            .collect()
    }

    /// Waits until every rank reaches this call.
    pub fn barrier(&self) -> Result<(), DistError> {
        let start = Instant::now();
        // SAFETY: the group is live.
        let message = unsafe { ffi::vovdet_dist_barrier(self.raw.as_ptr(), millis(self.timeout)) };
        self.check("barrier", start, message)
    }

    /// Mean over ranks of `tensor`, differentiable: its backward averages the incoming gradient over ranks, so
    /// each rank's input receives the derivative of the sum of every rank's loss (as detectron2's SyncBN).
    pub fn all_reduce_mean_differentiable(&self, tensor: &Tensor) -> Result<Tensor, DistError> {
        const OP: &str = "all_reduce_mean";
        self.check_defined(OP, std::slice::from_ref(tensor))?;
        if !tensor.is_floating_point() {
            return Err(self.invalid(OP, format!("kind {:?}; needs floating point", tensor.kind())));
        }
        let mut out: *mut c_void = std::ptr::null_mut();
        let start = Instant::now();
        // SAFETY: the input is live for the call; on success the shim stores a new at::Tensor in `out`.
        let message = unsafe {
            ffi::vovdet_dist_all_reduce_mean_autograd(
                self.raw.as_ptr(),
                raw_tensor(tensor),
                millis(self.timeout),
                &mut out,
            )
        };
        self.check(OP, start, message)?;
        if out.is_null() {
            return Err(self.invalid(OP, "the shim returned no tensor".into()));
        }
        // SAFETY: `out` is a heap `at::Tensor*` that the returned Tensor now owns (tch frees it on drop).
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    /// All-gather of tensors whose shape and kind are known to agree on every rank.
    pub(crate) fn gather_same_shape(&self, op: &'static str, tensor: &Tensor) -> Result<Vec<Tensor>, DistError> {
        let input = tensor.detach().contiguous();
        let outputs: Vec<Tensor> = (0..self.world_size).map(|_| input.empty_like()).collect();
        let raws: Vec<ffi::RawTensor> = outputs.iter().map(raw_tensor).collect();
        let start = Instant::now();
        // SAFETY: input and outputs are live for the call; `raws` has world_size entries as the shim expects.
        let message = unsafe {
            ffi::vovdet_dist_all_gather(self.raw.as_ptr(), raw_tensor(&input), raws.as_ptr(), millis(self.timeout))
        };
        self.check(op, start, message)?;
        Ok(outputs)
    }

    fn check(&self, op: &'static str, start: Instant, message: *mut std::ffi::c_char) -> Result<(), DistError> {
        match ffi::take_message(message) {
            None => Ok(()),
            Some(message) => Err(collective_failure(self.rank, self.timeout, op, start, message)),
        }
    }

    fn check_defined(&self, op: &'static str, tensors: &[Tensor]) -> Result<(), DistError> {
        match tensors.iter().position(|t| !t.defined()) {
            Some(i) => Err(self.invalid(op, format!("tensor {i} is undefined"))),
            None => Ok(()),
        }
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<c_int, DistError> {
        if root >= self.world_size {
            return Err(self.invalid(op, format!("root {root} is not below the world size {}", self.world_size)));
        }
        c_int::try_from(root).map_err(|_| self.invalid(op, format!("root {root} does not fit a C int")))
    }

    pub(crate) fn invalid(&self, op: &'static str, reason: String) -> DistError {
        DistError::InvalidArgument { rank: self.rank, op, reason }
    }
}

impl backbone::BatchStatsReducer for ProcessGroup {
    /// Differentiable mean over ranks (see [`ProcessGroup::all_reduce_mean_differentiable`]). The trait has no
    /// error path, so a failed collective (a dead or hung peer) panics with the [`DistError`] message.
    fn all_reduce_mean(&self, stats: &Tensor) -> Tensor {
        self.all_reduce_mean_differentiable(stats).unwrap_or_else(|e| panic!("SyncBN statistics: {e}"))
    }
}

/// A failed collective as a [`DistError::Timeout`] (past the timeout, or c10d says it timed out) or a
/// [`DistError::Collective`].
pub(crate) fn collective_failure(
    rank: usize,
    timeout: Duration,
    op: &'static str,
    start: Instant,
    message: String,
) -> DistError {
    let elapsed = start.elapsed();
    let lower = message.to_lowercase();
    if elapsed >= timeout || lower.contains("timed out") || lower.contains("timeout") {
        DistError::Timeout { rank, op, timeout, message }
    } else {
        DistError::Collective { rank, op, elapsed, message }
    }
}

pub(crate) fn raw_tensor(tensor: &Tensor) -> ffi::RawTensor {
    tensor.as_ptr() as ffi::RawTensor
}

/// Detached, contiguous tensors the backend may write: views of the inputs where possible, copies otherwise.
fn contiguous_buffers(tensors: &[Tensor]) -> Vec<Tensor> {
    tensors.iter().map(|t| if t.is_contiguous() { t.detach() } else { t.detach().contiguous() }).collect()
}

/// Copies results of non-contiguous inputs back from their buffers.
fn copy_back(tensors: &[Tensor], buffers: &[Tensor]) {
    for (tensor, buffer) in tensors.iter().zip(buffers) {
        if !tensor.is_contiguous() {
            tch::no_grad(|| tensor.detach().copy_(buffer));
        }
    }
}
