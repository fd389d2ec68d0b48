//! Multi-process training on PyTorch's c10d: a TCPStore rendezvous, `ProcessGroupGloo` for CPU tensors and
//! `ProcessGroupNCCL` for CUDA tensors (cargo feature `nccl`), reached through a small C++ shim (`src/shim.cpp`).
//!
//! [`ProcessGroup`] offers the collectives a data-parallel trainer needs (all-reduce, broadcast, all-gather of
//! tensors and of byte blobs, barrier), each bounded by the group's timeout; every C++ exception becomes a
//! [`DistError`] that names the rank and the collective. [`LaunchEnv`] reads the torchrun/SLURM/Kubernetes
//! environment, [`all_reduce_grads_bucketed`] averages gradients in size-bounded buckets, and `ProcessGroup`
//! implements [`backbone::BatchStatsReducer`] for SyncBN.
//!
//! A data-parallel step, one process per device:
//!
//! ```no_run
//! # fn step(params: &[tch::Tensor], loss: tch::Tensor) -> Result<(), dist::DistError> {
//! use dist::{all_reduce_grads_bucketed, broadcast_parameters, Backend, InitOptions, LaunchEnv, ProcessGroup};
//! let env = LaunchEnv::from_env()?.expect("started by a launcher");
//! let pg = ProcessGroup::init(InitOptions::from_launch_env(&env, Backend::Gloo, dist::DEFAULT_TIMEOUT))?;
//! broadcast_parameters(&pg, params, 0)?; // once, before the first step
//! loss.backward(); // the loss of this rank's batch
//! all_reduce_grads_bucketed(&pg, params, 25 << 20)?; // after the last micro-batch only
//! # Ok(())
//! # }
//! ```
//!
//! # Ports and trust
//!
//! Rank 0 serves the rendezvous (c10d's TCPStore) on `master_port` (`MASTER_PORT`; the `trainer` launcher picks a
//! free one for single-machine runs). When `master_addr` is a loopback address (`127.0.0.1`, `localhost`, `::1`:
//! every rank on this machine, as the `trainer` launcher runs single-machine jobs), the store listens on that
//! address only ([`store_bind_address`]) and Gloo's pairs on `127.0.0.1`, so nothing is reachable from other
//! machines. For a multi-machine run the store listens on every interface of rank 0's machine, as
//! `torch.distributed` does, and Gloo and NCCL open further ports between the machines. None of these
//! connections is authenticated or encrypted: any process that can reach them can join the rendezvous, read or
//! overwrite its keys, and stall or corrupt the run. Run multi-machine jobs only on a network you trust (a private
//! cluster network or VPN, with the ports firewalled from elsewhere); pin the interfaces with
//! `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME`.

mod env;
mod ffi;
mod grads;

use std::ffi::{c_int, c_void, CString};
use std::fmt;
use std::net::IpAddr;
use std::os::fd::IntoRawFd;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

pub use env::LaunchEnv;
pub use grads::{all_reduce_grads_bucketed, broadcast_parameters};

/// Collective timeout suited to training (as PyTorch's default for NCCL): long enough for a slow evaluation or
/// checkpoint on another rank, short enough that a dead peer does not hold a job forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Errors of the distributed layer; each names the rank that saw it.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The rendezvous or the process group could not be created.
    #[error(
        "rank {rank}: cannot initialise the {backend} process group (world size {world_size}, rendezvous \
         {master_addr}:{master_port}, timeout {timeout:?}): {message}"
    )]
    Init {
        rank: usize,
        world_size: usize,
        backend: Backend,
        master_addr: String,
        master_port: u16,
        timeout: Duration,
        message: String,
    },
    /// A collective did not complete within the timeout.
    #[error("rank {rank}: {op} timed out after {timeout:?} (a peer may have died or hung): {message}")]
    Timeout { rank: usize, op: &'static str, timeout: Duration, message: String },
    /// A collective failed, typically because a peer's connection closed.
    #[error("rank {rank}: {op} failed after {elapsed:?} (a peer may have died): {message}")]
    Collective { rank: usize, op: &'static str, elapsed: Duration, message: String },
    /// A collective was called with arguments it cannot accept.
    #[error("rank {rank}: {op}: {reason}")]
    InvalidArgument { rank: usize, op: &'static str, reason: String },
    /// A launcher environment variable is malformed or missing.
    #[error("environment variable {name}: {reason}")]
    Env { name: &'static str, reason: String },
    /// The requested backend is not compiled into this build.
    #[error("backend {0} is not available in this build (build crates/dist with the cargo feature `nccl`)")]
    BackendUnavailable(Backend),
}

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo over TCP, for CPU tensors.
    Gloo,
    /// NCCL, for CUDA tensors (one process per GPU).
    Nccl,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        })
    }
}

/// How [`ProcessGroup::all_reduce`] combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean (sum divided by the world size); floating-point tensors only.
    Avg,
}

/// Everything needed to join a process group.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Gloo (CPU) or NCCL (CUDA).
    pub backend: Backend,
    /// Host of rank 0, which serves the TCPStore rendezvous.
    pub master_addr: String,
    /// Port of the TCPStore on `master_addr`.
    pub master_port: u16,
    /// This process's rank in `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Index of this process's GPU on its machine (`cuda:local_rank`); used by NCCL only.
    pub local_rank: usize,
    /// Limit for the rendezvous and for every collective.
    pub timeout: Duration,
}

impl InitOptions {
    /// Options for the process described by a launcher's environment.
    pub fn from_launch_env(env: &LaunchEnv, backend: Backend, timeout: Duration) -> InitOptions {
        InitOptions {
            backend,
            master_addr: env.master_addr.clone(),
            master_port: env.master_port,
            rank: env.rank,
            world_size: env.world_size,
            local_rank: env.local_rank,
            timeout,
        }
    }
}

/// A joined c10d process group. Every rank must issue the same collectives in the same order.
pub struct ProcessGroup {
    raw: NonNull<ffi::RawGroup>,
    backend: Backend,
    rank: usize,
    world_size: usize,
    device: Device,
    timeout: Duration,
}

// SAFETY: c10d backends are thread-safe (collectives are queued to the backend's own worker threads), and the
// shim's group is only freed in Drop.
unsafe impl Send for ProcessGroup {}
// SAFETY: see Send; every method takes `&self` and only enqueues work on the thread-safe backend.
unsafe impl Sync for ProcessGroup {}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from vovdet_dist_init and is freed only here.
        unsafe { ffi::vovdet_dist_free(self.raw.as_ptr()) };
    }
}

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

/// The address rank 0's rendezvous store listens on when it should not listen on every interface: the master
/// address itself when it is a loopback address (`127.0.0.0/8`, `::1`, `localhost`), which means that every rank
/// runs on this machine. Other master addresses (multi-machine runs) keep c10d's behaviour, listening on all
/// interfaces, as the other machines may reach this one through any of them; see the crate documentation on
/// the port and the trust model.
pub fn store_bind_address(master_addr: &str) -> Option<IpAddr> {
    if master_addr.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::from([127, 0, 0, 1]));
    }
    let ip: IpAddr = master_addr.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    ip.is_loopback().then_some(ip)
}

/// Most dimensions [`ProcessGroup::all_gather`] accepts (shapes are exchanged in a fixed-size record).
const MAX_GATHER_DIMS: usize = 8;

impl ProcessGroup {
    /// Joins the group: rank 0 serves the TCPStore at `master_addr:master_port`, every rank connects to it, then
    /// the backend connects the ranks to each other. Blocks until all `world_size` ranks arrive or the timeout.
    pub fn init(opts: InitOptions) -> Result<ProcessGroup, DistError> {
        let init_error = |message: String| DistError::Init {
            rank: opts.rank,
            world_size: opts.world_size,
            backend: opts.backend,
            master_addr: opts.master_addr.clone(),
            master_port: opts.master_port,
            timeout: opts.timeout,
            message,
        };
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return Err(init_error(format!("rank must be below the world size {}", opts.world_size)));
        }
        let rank = c_int::try_from(opts.rank).map_err(|_| init_error("rank does not fit a C int".into()))?;
        let world_size =
            c_int::try_from(opts.world_size).map_err(|_| init_error("world size does not fit a C int".into()))?;
        let local_rank =
            c_int::try_from(opts.local_rank).map_err(|_| init_error("local rank does not fit a C int".into()))?;
        let device = match opts.backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl if cfg!(feature = "nccl") => Device::Cuda(opts.local_rank),
            Backend::Nccl => return Err(DistError::BackendUnavailable(Backend::Nccl)),
        };
        let addr = CString::new(opts.master_addr.as_str())
            .map_err(|_| init_error("master address contains a NUL byte".into()))?;
        let listen_fd = match (opts.rank, store_bind_address(&opts.master_addr)) {
            (0, Some(ip)) => std::net::TcpListener::bind((ip, opts.master_port))
                .map_err(|e| init_error(format!("cannot listen on {ip}:{} for the rendezvous: {e}", opts.master_port)))?
                .into_raw_fd(),
            _ => -1,
        };
        let mut raw = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; the shim writes `raw` only on success.
        let message = unsafe {
            ffi::vovdet_dist_init(
                match opts.backend {
                    Backend::Gloo => 0,
                    Backend::Nccl => 1,
                },
                addr.as_ptr(),
                opts.master_port,
                rank,
                world_size,
                millis(opts.timeout),
                local_rank,
                listen_fd,
                &mut raw,
            )
        };
        if let Some(message) = ffi::take_message(message) {
            return Err(init_error(message));
        }
        let raw = NonNull::new(raw).ok_or_else(|| init_error("the shim returned no group".into()))?;
        Ok(ProcessGroup {
            raw,
            backend: opts.backend,
            rank: opts.rank,
            world_size: opts.world_size,
            device,
            timeout: opts.timeout,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The limit applied to every collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Device the backend communicates on: CPU for Gloo, `cuda:local_rank` for NCCL.
    pub fn device(&self) -> Device {
        self.device
    }

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
    fn gather_same_shape(&self, op: &'static str, tensor: &Tensor) -> Result<Vec<Tensor>, DistError> {
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
        let Some(message) = ffi::take_message(message) else {
            return Ok(());
        };
        let elapsed = start.elapsed();
        let lower = message.to_lowercase();
        if elapsed >= self.timeout || lower.contains("timed out") || lower.contains("timeout") {
            Err(DistError::Timeout { rank: self.rank, op, timeout: self.timeout, message })
        } else {
            Err(DistError::Collective { rank: self.rank, op, elapsed, message })
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

    fn invalid(&self, op: &'static str, reason: String) -> DistError {
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

/// Milliseconds of a duration for the shim, saturating; at least 1 so that c10d never reads it as "no timeout".
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn raw_tensor(tensor: &Tensor) -> ffi::RawTensor {
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
