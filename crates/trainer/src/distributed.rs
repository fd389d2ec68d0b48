//! Multi-process runs on PyTorch's c10d (crates/dist): the launcher that spawns one worker process per GPU or CPU
//! slot, the torchrun-style environment that makes a process one worker, and [`RankGroup`], the few collectives
//! the training loop and the evaluator need (no-ops in a single-process run).
//!
//! Roles: with `--num-gpus N` / `--num-procs N` (N > 1) or `--num-machines M` (M > 1) this process is a launcher:
//! it starts N copies of the same command line with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT` set, waits for them, forwards Ctrl-C, and exits non-zero when any fails. A process
//! that finds `RANK`/`WORLD_SIZE` (torchrun, PyTorchJob) or `SLURM_PROCID` (srun) in its environment is a worker.
//! Anything else is a plain single-process run.

use std::io::Write;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use dist::{broadcast_parameters, InitOptions, LaunchEnv, ProcessGroup, ReduceOp};
use tch::{Device, Tensor};

use crate::placement::DdpBackend;

/// Set by the launcher in its workers, so that a worker does not launch again (its command line still holds the
/// launch flags).
const WORKER_MARKER: &str = "VOVDET_WORKER";
/// Set by the launcher: `cpu` for `--num-procs`, `cuda` for `--num-gpus`.
const WORKER_DEVICE: &str = "VOVDET_WORKER_DEVICE";

/// Launch flags shared by `trainer train` and `trainer eval`.
#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Start N worker processes on this machine, one per GPU (cuda:0..N-1, NCCL); with ddp.backend = "gloo" they
    /// may share GPUs (N above the GPU count).
    #[arg(long, value_name = "N", conflicts_with = "num_procs")]
    pub num_gpus: Option<usize>,
    /// Start N worker processes on this machine on the CPU (Gloo); libtorch threads are split between them.
    #[arg(long, value_name = "N")]
    pub num_procs: Option<usize>,
    /// Machines taking part; run the same command on each with its own --machine-rank.
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub num_machines: usize,
    /// This machine's index in 0..M (machine 0 hosts rank 0 and the rendezvous).
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub machine_rank: usize,
    /// Rendezvous address of rank 0, `tcp://HOST:PORT` (required with several machines; default on one machine:
    /// 127.0.0.1 and a free port).
    #[arg(long, value_name = "URL")]
    pub dist_url: Option<String>,
    /// Seconds a collective (or the rendezvous) waits for the other ranks before failing.
    #[arg(long, value_name = "SECONDS", default_value_t = 1800)]
    pub dist_timeout: u64,
}

/// What this process does.
#[derive(Debug)]
pub enum Role {
    /// A plain single-process run.
    Single,
    /// Start workers and wait for them.
    Launcher(LaunchPlan),
    /// One rank of a distributed run.
    Worker(WorkerPlan),
}

/// The launcher's job: `local_processes` workers with global ranks `first_rank..`.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    /// Workers on this machine.
    pub local_processes: usize,
    /// Global rank of this machine's first worker.
    pub first_rank: usize,
    /// Workers over all machines.
    pub world_size: usize,
    /// Rendezvous host.
    pub master_addr: String,
    /// Rendezvous port.
    pub master_port: u16,
    /// True for `--num-gpus` (CUDA workers), false for `--num-procs` (CPU workers, Gloo).
    pub gpus: bool,
    /// Collective timeout, for the launcher's own grace period after a worker fails.
    pub timeout: Duration,
}

/// One worker's place and settings.
#[derive(Debug, Clone)]
pub struct WorkerPlan {
    /// Rank, world size and rendezvous.
    pub env: LaunchEnv,
    /// Collective timeout.
    pub timeout: Duration,
    /// `Some(true)`/`Some(false)` when our launcher chose CUDA/CPU; `None` under an external launcher.
    pub gpus: Option<bool>,
    /// Workers on this machine (`LOCAL_WORLD_SIZE`), for splitting CPU threads.
    pub local_world_size: usize,
}

/// Decides this process's role from the launch flags, the environment and `ddp.backend` (which decides how many
/// CUDA workers a machine's GPUs take).
pub fn role(args: &LaunchArgs, backend: DdpBackend) -> anyhow::Result<Role> {
    let timeout = Duration::from_secs(args.dist_timeout.max(1));
    let spawned = std::env::var_os(WORKER_MARKER).is_some();
    let env = LaunchEnv::from_env().context("reading the launcher environment")?;
    let local = args.num_gpus.or(args.num_procs).unwrap_or(1);
    let wants_launch = local > 1 || args.num_machines > 1 || args.num_gpus.is_some();
    if let Some(env) = env {
        anyhow::ensure!(
            spawned || !wants_launch,
            "this process already has a launcher environment (RANK={}, WORLD_SIZE={}); drop --num-gpus, \
             --num-procs and --num-machines, or unset those variables",
            env.rank,
            env.world_size
        );
        let gpus = match std::env::var(WORKER_DEVICE).ok().as_deref() {
            Some("cuda") => Some(true),
            Some("cpu") => Some(false),
            _ => None,
        };
        let local_world_size =
            std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(env.world_size).max(1);
        return Ok(Role::Worker(WorkerPlan { env, timeout, gpus, local_world_size }));
    }
    if !wants_launch {
        return Ok(Role::Single);
    }
    anyhow::ensure!(local >= 1, "--num-gpus/--num-procs must be at least 1");
    anyhow::ensure!(args.num_machines >= 1, "--num-machines must be at least 1");
    anyhow::ensure!(
        args.machine_rank < args.num_machines,
        "--machine-rank {} is not below --num-machines {}",
        args.machine_rank,
        args.num_machines
    );
    let gpus = args.num_gpus.is_some();
    if gpus {
        backend
            .check_gpu_count(local, tch::Cuda::device_count() as usize)
            .with_context(|| format!("--num-gpus {local}"))?;
    } else {
        backend.resolve(Device::Cpu).with_context(|| format!("--num-procs {local}"))?;
    }
    let (master_addr, master_port) = match &args.dist_url {
        Some(url) => parse_dist_url(url)?,
        None => {
            anyhow::ensure!(
                args.num_machines == 1,
                "--num-machines {} needs --dist-url tcp://HOST:PORT of machine 0, the same on every machine",
                args.num_machines
            );
            ("127.0.0.1".to_string(), free_port()?)
        }
    };
    Ok(Role::Launcher(LaunchPlan {
        local_processes: local,
        first_rank: args.machine_rank * local,
        world_size: args.num_machines * local,
        master_addr,
        master_port,
        gpus,
        timeout,
    }))
}

/// Parses `tcp://HOST:PORT`.
pub fn parse_dist_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.strip_prefix("tcp://").with_context(|| format!("--dist-url {url}: expected tcp://HOST:PORT"))?;
    let (host, port) = rest.rsplit_once(':').with_context(|| format!("--dist-url {url}: no :PORT"))?;
    anyhow::ensure!(!host.is_empty(), "--dist-url {url}: empty host");
    let port: u16 = port.parse().with_context(|| format!("--dist-url {url}: port {port:?} is not a number"))?;
    Ok((host.to_string(), port))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the rendezvous")?;
    Ok(listener.local_addr()?.port())
}

/// Signals received by the launcher (the first asks workers to stop and checkpoint, the second kills them).
static LAUNCHER_SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// Starts the workers of `plan` (this executable with the same arguments) and waits for them. Fails, naming the
/// rank, when a worker fails; the others are given the collective timeout (at most a minute) to stop on their own
/// and are then killed. Ctrl-C is forwarded: the workers agree on an iteration, rank 0 saves a checkpoint, and all
/// exit; a second Ctrl-C kills them.
pub fn launch(plan: &LaunchPlan) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the trainer executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let _ = ctrlc::set_handler(|| {
        LAUNCHER_SIGNALS.fetch_add(1, Ordering::SeqCst);
    });
    let mut workers: Vec<(usize, Child)> = Vec::with_capacity(plan.local_processes);
    for local_rank in 0..plan.local_processes {
        let rank = plan.first_rank + local_rank;
        let mut command = Command::new(&exe);
        command
            .args(&args)
            .env(WORKER_MARKER, "1")
            .env(WORKER_DEVICE, if plan.gpus { "cuda" } else { "cpu" })
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", plan.world_size.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", plan.local_processes.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", plan.master_port.to_string());
        match command.spawn() {
            Ok(child) => {
                eprintln!("launcher: started rank {rank} of {} (pid {})", plan.world_size, child.id());
                workers.push((rank, child));
            }
            Err(e) => {
                kill_all(&mut workers);
                return Err(e).with_context(|| format!("starting worker rank {rank} ({})", exe.display()));
            }
        }
    }
    let grace = plan.timeout.min(Duration::from_secs(60)) + Duration::from_secs(5);
    let mut failures: Vec<String> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    let mut signals_seen = 0;
    let mut running: Vec<(usize, Child)> = workers;
    while !running.is_empty() {
        let signals = LAUNCHER_SIGNALS.load(Ordering::SeqCst);
        if signals > signals_seen {
            signals_seen = signals;
            if signals == 1 {
                eprintln!("launcher: interrupt; asking the workers to save a checkpoint and stop (again to kill)");
                for (_, child) in &running {
                    send_interrupt(child);
                }
            } else {
                kill_all(&mut running);
                anyhow::bail!("killed the workers after a second interrupt");
            }
        }
        let mut still = Vec::with_capacity(running.len());
        for (rank, mut child) in running {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    failures.push(format!("rank {rank} exited with {status}"));
                    first_failure.get_or_insert_with(Instant::now);
                }
                Ok(None) => still.push((rank, child)),
                Err(e) => {
                    failures.push(format!("rank {rank}: cannot wait for it: {e}"));
                    first_failure.get_or_insert_with(Instant::now);
                }
            }
        }
        running = still;
        if let Some(since) = first_failure {
            if !running.is_empty() && since.elapsed() > grace {
                for (rank, _) in &running {
                    failures.push(format!("rank {rank} killed {} s after the first failure", grace.as_secs()));
                }
                kill_all(&mut running);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::io::stderr().flush();
    anyhow::ensure!(failures.is_empty(), "distributed run failed: {}", failures.join("; "));
    Ok(())
}

fn send_interrupt(child: &Child) {
    // SAFETY: kill(2) with a child's pid and SIGINT has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
}

fn kill_all(workers: &mut Vec<(usize, Child)>) {
    for (_, child) in workers.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    workers.clear();
}

/// The device a worker trains on: a CUDA device when its launcher chose GPUs or, under an external launcher, when
/// `requested` is one (`cuda:LOCAL_RANK`, or shared round-robin with `ddp.backend = "gloo"`); the CPU otherwise.
pub fn worker_device(plan: &WorkerPlan, requested: Device, backend: DdpBackend) -> anyhow::Result<Device> {
    let cuda = plan.gpus.unwrap_or(requested.is_cuda());
    if !cuda {
        return Ok(Device::Cpu);
    }
    let gpu = backend
        .gpu_of(plan.env.local_rank, tch::Cuda::device_count() as usize)
        .with_context(|| format!("rank {} (LOCAL_RANK {})", plan.env.rank, plan.env.local_rank))?;
    Ok(Device::Cuda(gpu))
}

/// Joins the process group of `plan` on `device` with the backend `ddp.backend` gives it. CPU workers split the
/// machine's cores between them unless `OMP_NUM_THREADS` is set (oversubscribed threads slow the all-reduce
/// down more than tenfold).
pub fn join(plan: &WorkerPlan, device: Device, backend: DdpBackend) -> anyhow::Result<RankGroup> {
    if device == Device::Cpu && std::env::var_os("OMP_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tch::set_num_threads((cores / plan.local_world_size).max(1) as i32);
    }
    let backend = backend.resolve(device).with_context(|| format!("rank {}", plan.env.rank))?;
    let options = InitOptions::from_launch_env(&plan.env, backend, plan.timeout);
    let group = ProcessGroup::init(options).with_context(|| {
        format!(
            "rank {}: joining the {backend:?} process group at {}:{} (world size {})",
            plan.env.rank, plan.env.master_addr, plan.env.master_port, plan.env.world_size
        )
    })?;
    Ok(RankGroup { group: Some(Arc::new(group)) })
}

/// This process's ranks-wide operations; every method is a no-op (or the identity) in a single-process run.
#[derive(Clone, Default)]
pub struct RankGroup {
    group: Option<Arc<ProcessGroup>>,
}

impl std::fmt::Debug for RankGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RankGroup(rank {} of {})", self.rank(), self.world_size())
    }
}

impl RankGroup {
    /// A single-process run.
    pub fn single() -> RankGroup {
        RankGroup { group: None }
    }

    /// The underlying process group, when there is one (for SyncBN).
    pub fn process_group(&self) -> Option<Arc<ProcessGroup>> {
        self.group.clone()
    }

    /// This process's rank (0 alone).
    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank())
    }

    /// Number of processes (1 alone).
    pub fn world_size(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world_size())
    }

    /// True on rank 0, which alone writes logs, TensorBoard events, checkpoints and evaluation results.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Overwrites `tensors` (in the same order on every rank) with rank 0's values.
    pub fn broadcast_from_main(&self, tensors: &[Tensor]) -> anyhow::Result<()> {
        if let Some(group) = &self.group {
            tch::no_grad(|| broadcast_parameters(group, tensors, 0))
                .with_context(|| format!("rank {}: broadcasting the initial weights from rank 0", group.rank()))?;
        }
        Ok(())
    }

    /// One small all-reduce per iteration: the mean of `values` over ranks, and whether any rank asked to stop.
    pub fn agree(&self, values: &[f64], stop: bool) -> anyhow::Result<(Vec<f64>, bool)> {
        let Some(group) = &self.group else {
            return Ok((values.to_vec(), stop));
        };
        let mut packed = values.to_vec();
        packed.push(if stop { 1.0 } else { 0.0 });
        let tensor = transfer::upload(&Tensor::from_slice(&packed), group.device());
        group.all_reduce(std::slice::from_ref(&tensor), ReduceOp::Sum)?;
        let summed = transfer::download_vec::<f64>(&tensor)?;
        let world = group.world_size() as f64;
        let (means, flag) = summed.split_at(values.len());
        Ok((means.iter().map(|v| v / world).collect(), flag[0] > 0.0))
    }

    /// Every rank's `bytes`, in rank order (just `[bytes]` alone).
    pub fn gather_bytes(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, dist::DistError> {
        match &self.group {
            Some(group) => group.all_gather_bytes(&bytes),
            None => Ok(vec![bytes]),
        }
    }

    /// Rank 0's `bytes` on every rank (other ranks pass anything, e.g. an empty vector).
    pub fn share_from_main(&self, bytes: Vec<u8>) -> Result<Vec<u8>, dist::DistError> {
        match &self.group {
            Some(group) => {
                let mine = if group.rank() == 0 { bytes } else { Vec::new() };
                Ok(group.all_gather_bytes(&mine)?.swap_remove(0))
            }
            None => Ok(bytes),
        }
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<(), dist::DistError> {
        match &self.group {
            Some(group) => group.barrier(),
            None => Ok(()),
        }
    }
}
