//! Multi-process training on PyTorch's c10d: a TCPStore rendezvous, `ProcessGroupGloo` for CPU tensors and
//! `ProcessGroupNCCL` for CUDA tensors (cargo feature `nccl`), reached through a small C++ shim (`src/shim.cpp`).
//!
//! [`ProcessGroup`] offers the collectives a data-parallel trainer needs (all-reduce, broadcast, all-gather of
//! tensors and of byte blobs, barrier), each bounded by the group's timeout; every C++ exception becomes a
//! [`DistError`] that names the rank and the collective. [`LaunchEnv`] reads the torchrun/SLURM/Kubernetes
//! environment, [`all_reduce_grads_bucketed`] averages gradients in size-bounded buckets after backward,
//! [`GradReducer`] does the same overlapped with backward (as PyTorch's DDP), and `ProcessGroup` implements
//! [`backbone::BatchStatsReducer`] for SyncBN.
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
//! The same step with the all-reduces overlapped with backward:
//!
//! ```no_run
//! # fn step(pg: &dist::ProcessGroup, params: &[tch::Tensor], loss_of: impl Fn(usize) -> tch::Tensor)
//! # -> Result<(), dist::DistError> {
//! use dist::{GradCompression, GradReducer};
//! let reducer = GradReducer::new(pg, params, 25 << 20, GradCompression::None)?; // once, on every rank
//! let micro_batches = 2;
//! for i in 0..micro_batches {
//!     if i == micro_batches - 1 {
//!         reducer.arm()?; // only the last micro-batch's backward communicates
//!     }
//!     loss_of(i).backward();
//! }
//! reducer.finish()?; // waits for the all-reduces and writes the mean gradients
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

mod collectives;
mod env;
mod ffi;
mod grads;
mod reducer;

use std::ffi::{c_int, CString};
use std::fmt;
use std::net::IpAddr;
use std::os::fd::IntoRawFd;
use std::ptr::NonNull;
use std::time::Duration;

use tch::Device;

pub use env::LaunchEnv;
pub use grads::{all_reduce_grads_bucketed, broadcast_parameters};
pub use reducer::{GradCompression, GradReducer};

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
}

/// Milliseconds of a duration for the shim, saturating; at least 1 so that c10d never reads it as "no timeout".
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX).max(1)
}
