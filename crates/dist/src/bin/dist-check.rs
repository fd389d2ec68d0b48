//! One rank of a self-check of crates/dist (Gloo on 127.0.0.1 by default), or of the all-reduce benchmark.
//!
//! `dist-check SCENARIO [--rank R --world-size W --port P] [--backend gloo|nccl] [--timeout-secs S]
//! [--megabytes M] [--steps K]`; without `--rank` the rank, world size and rendezvous come from the launcher
//! environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`). Each scenario computes what every rank must
//! see and exits non-zero with a message on any mismatch or error. The integration tests (tests/two_ranks.rs) start
//! two of these.
//!
//! Scenarios: `collectives` (on the backend's device, so a CUDA check under `--backend nccl`), `grads`,
//! `syncbn`, `train` (10 data-parallel SGD steps of a small GroupNorm network against one process with the
//! whole batch), `die` / `die-master` (rank 1 / rank 0 waits to be killed while the other keeps all-reducing), `hang` (rank 1 stops taking
//! part), `bench` (all-reduce of M megabytes on the backend's device, timed on rank 0), `overlap` and
//! `overlap-mismatch` (the overlapped `GradReducer`, see dist_check/overlap.rs), `bench-overlap` (K timed
//! training steps without communication, with `all_reduce_grads_bucketed` and with `GradReducer`).

#[path = "dist_check/bench_overlap.rs"]
mod bench_overlap;
#[path = "dist_check/overlap.rs"]
mod overlap;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone::norm::{Norm, NormKind, NormSpec};
use dist::{all_reduce_grads_bucketed, broadcast_parameters, Backend, InitOptions, LaunchEnv, ProcessGroup, ReduceOp};
use tch::{nn, Device, Kind, Tensor};

type Check = Result<(), String>;

struct Args {
    scenario: String,
    rank: Option<usize>,
    world_size: usize,
    port: u16,
    timeout: Duration,
    megabytes: usize,
    steps: usize,
    backend: Backend,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().ok_or("usage: dist-check SCENARIO [--rank R --world-size W --port P] ...")?;
    let mut parsed = Args {
        scenario,
        rank: None,
        world_size: 2,
        port: 0,
        timeout: Duration::from_secs(60),
        megabytes: 100,
        steps: 5,
        backend: Backend::Gloo,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--rank" => parsed.rank = Some(number(&value)? as usize),
            "--world-size" => parsed.world_size = number(&value)? as usize,
            "--port" => parsed.port = number(&value)? as u16,
            "--timeout-secs" => parsed.timeout = Duration::from_secs(number(&value)?),
            "--megabytes" => parsed.megabytes = number(&value)? as usize,
            "--steps" => parsed.steps = number(&value)? as usize,
            "--backend" => {
                parsed.backend = match value.as_str() {
                    "gloo" => Backend::Gloo,
                    "nccl" => Backend::Nccl,
                    other => return Err(format!("--backend {other}: expected gloo or nccl")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dist-check: {message}");
            ExitCode::from(3)
        }
    }
}

fn run() -> Check {
    let args = parse_args()?;
    let opts = match args.rank {
        Some(rank) => InitOptions {
            backend: args.backend,
            master_addr: "127.0.0.1".into(),
            master_port: args.port,
            rank,
            world_size: args.world_size,
            local_rank: rank,
            timeout: args.timeout,
        },
        None => {
            let env = LaunchEnv::from_env()
                .map_err(|e| e.to_string())?
                .ok_or("no --rank and no RANK/WORLD_SIZE in the environment")?;
            InitOptions::from_launch_env(&env, args.backend, args.timeout)
        }
    };
    let pg = Arc::new(ProcessGroup::init(opts).map_err(|e| e.to_string())?);
    match args.scenario.as_str() {
        "collectives" => collectives(&pg)?,
        "grads" => grads(&pg)?,
        "syncbn" => syncbn(&pg, |_| 2)?,
        // A head's SyncBN where rank 1 has no RoIs: it joins with zero weight, nobody hangs.
        "syncbn-empty-rank" => syncbn(&pg, |rank| if rank == 1 { 0 } else { 3 })?,
        "train" => train(&pg)?,
        "die" => die(&pg, 1)?,
        "die-master" => die(&pg, 0)?,
        "hang" => hang(&pg)?,
        "bench" => bench(&pg, args.megabytes)?,
        "overlap" => overlap::overlap(&pg)?,
        "overlap-mismatch" => overlap::mismatch(&pg)?,
        "bench-overlap" => bench_overlap::bench_overlap(&pg, args.steps)?,
        other => return Err(format!("unknown scenario {other}")),
    }
    println!("rank {}: {} ok", pg.rank(), args.scenario);
    Ok(())
}

fn ensure(condition: bool, what: impl FnOnce() -> String) -> Check {
    if condition {
        Ok(())
    } else {
        Err(what())
    }
}

/// The largest absolute difference (0 for empty tensors).
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn ensure_close(what: &str, got: &Tensor, expected: &Tensor, tolerance: f64) -> Check {
    ensure(got.size() == expected.size(), || format!("{what}: shape {:?} != {:?}", got.size(), expected.size()))?;
    let diff = max_abs_diff(got, expected);
    ensure(diff <= tolerance, || format!("{what}: max abs difference {diff:e} > {tolerance:e}"))
}

/// A deterministic tensor that differs per `seed`: sin of a scaled range.
fn pattern(shape: &[i64], seed: f64, kind: Kind) -> Tensor {
    let numel: i64 = shape.iter().product();
    (Tensor::arange(numel, (Kind::Double, Device::Cpu)) * 0.37 + seed).sin().reshape(shape).to_kind(kind)
}

fn collectives(pg: &ProcessGroup) -> Check {
    let err = |e: dist::DistError| e.to_string();
    let dev = pg.device();
    let root = pg.world_size() - 1;
    let (rank, world) = (pg.rank() as f64, pg.world_size() as f64);
    let rank_sum = world * (world - 1.0) / 2.0;

    // Sum over a list of mixed kinds, including a non-contiguous view that must be written back.
    let floats = Tensor::full([3, 2], rank + 1.0, (Kind::Float, dev));
    let longs = Tensor::full([4], pg.rank() as i64 * 10, (Kind::Int64, dev));
    let base = Tensor::zeros([4, 3], (Kind::Double, dev)) + rank;
    let transposed = base.tr();
    pg.all_reduce(&[floats.shallow_clone(), longs.shallow_clone(), transposed.shallow_clone()], ReduceOp::Sum)
        .map_err(err)?;
    ensure_close("all_reduce sum f32", &floats, &floats.full_like(rank_sum + world), 0.0)?;
    ensure_close("all_reduce sum i64", &longs, &longs.full_like(rank_sum * 10.0), 0.0)?;
    ensure_close("all_reduce sum of a transposed view", &base, &base.full_like(rank_sum), 0.0)?;

    let averaged = pattern(&[5], rank, Kind::Float).to_device(dev);
    let expected =
        (0..pg.world_size()).map(|r| pattern(&[5], r as f64, Kind::Float).to_device(dev)).sum::<Tensor>() / world;
    pg.all_reduce(std::slice::from_ref(&averaged), ReduceOp::Avg).map_err(err)?;
    ensure_close("all_reduce avg", &averaged, &expected, 1e-6)?;
    let avg_of_ints = pg.all_reduce(&[Tensor::zeros([1], (Kind::Int64, dev))], ReduceOp::Avg);
    ensure(avg_of_ints.as_ref().is_err_and(|e| e.to_string().contains("Avg needs floating point")), || {
        format!("Avg of an integer tensor should be refused: {avg_of_ints:?}")
    })?;

    let broadcast = [pattern(&[2, 3], rank, Kind::Float).to_device(dev), Tensor::full([2], rank, (Kind::Double, dev))];
    pg.broadcast(&broadcast, root).map_err(err)?;
    ensure_close(
        "broadcast from the last rank",
        &broadcast[0],
        &pattern(&[2, 3], root as f64, Kind::Float).to_device(dev),
        0.0,
    )?;
    ensure_close(
        "broadcast from the last rank (second tensor)",
        &broadcast[1],
        &broadcast[1].full_like(root as f64),
        0.0,
    )?;

    let gathered = pg.all_gather(&pattern(&[3, 1, 2], rank, Kind::Float).to_device(dev)).map_err(err)?;
    ensure(gathered.len() == pg.world_size(), || format!("all_gather returned {} tensors", gathered.len()))?;
    for (r, tensor) in gathered.iter().enumerate() {
        ensure_close(
            &format!("all_gather of rank {r}"),
            tensor,
            &pattern(&[3, 1, 2], r as f64, Kind::Float).to_device(dev),
            0.0,
        )?;
    }
    let mismatched = pg.all_gather(&Tensor::zeros([pg.rank() as i64 + 1], (Kind::Float, dev)));
    ensure(pg.world_size() == 1 || mismatched.as_ref().is_err_and(|e| e.to_string().contains("but rank")), || {
        format!("all_gather of different shapes should be an error: {mismatched:?}")
    })?;

    let blob = |r: usize| (0..r * 7).map(|i| (i * 13 + r) as u8).collect::<Vec<u8>>();
    let blobs = pg.all_gather_bytes(&blob(pg.rank())).map_err(err)?;
    let expected: Vec<Vec<u8>> = (0..pg.world_size()).map(blob).collect();
    ensure(blobs == expected, || format!("all_gather_bytes gave {blobs:?}, expected {expected:?}"))?;

    // Rank 0 arrives late at the barrier; the others must wait for it.
    if pg.rank() == 0 {
        std::thread::sleep(Duration::from_millis(1000));
    }
    let start = Instant::now();
    pg.barrier().map_err(err)?;
    let waited = start.elapsed();
    ensure(pg.rank() == 0 || waited >= Duration::from_millis(500), || format!("barrier returned after {waited:?}"))
}

/// Parameters identical on every rank (as after `broadcast_parameters`): two f32 matrices, a parameter the loss
/// does not use, an f64 vector and a frozen tensor.
fn grad_params() -> Vec<Tensor> {
    vec![
        pattern(&[4, 3], 0.5, Kind::Float).set_requires_grad(true),
        pattern(&[5], 1.5, Kind::Float).set_requires_grad(true),
        pattern(&[2], 2.5, Kind::Float).set_requires_grad(true),
        pattern(&[3], 3.5, Kind::Double).set_requires_grad(true),
        pattern(&[2], 4.5, Kind::Float),
    ]
}

fn grad_loss(params: &[Tensor], rank: usize) -> Tensor {
    let x = pattern(&[3], 10.0 + rank as f64, Kind::Float);
    let y = pattern(&[5], 20.0 + rank as f64, Kind::Float);
    let z = pattern(&[3], 30.0 + rank as f64, Kind::Double);
    let first = params[0].matmul(&x).pow_tensor_scalar(2).sum(Kind::Float);
    let second = (&params[1] * &y).tanh().sum(Kind::Float) * (rank as f64 + 1.0);
    let third = (&params[3] * &z).exp().sum(Kind::Double).to_kind(Kind::Float) * &params[4].sum(Kind::Float);
    first + second + third
}

fn grads(pg: &ProcessGroup) -> Check {
    let params = grad_params();
    // Rank 0's parameters start different; the broadcast must replace them by rank 1's.
    if pg.rank() == 0 {
        tch::no_grad(|| {
            let _ = params[0].shallow_clone().fill_(7.0);
        });
    }
    broadcast_parameters(pg, &params, 1).map_err(|e| e.to_string())?;
    ensure_close("broadcast parameter", &params[0], &grad_params()[0], 0.0)?;

    grad_loss(&params, pg.rank()).backward();
    // 32 bytes hold 8 floats: the 12-float matrix and the 5-float vector go to separate buckets, the f64 to a third.
    let buckets = all_reduce_grads_bucketed(pg, &params, 32).map_err(|e| e.to_string())?;
    ensure(buckets == 3, || format!("expected 3 buckets, got {buckets}"))?;

    let world = pg.world_size();
    let mut expected: Vec<Tensor> = Vec::new();
    for r in 0..world {
        let reference = grad_params();
        grad_loss(&reference, r).backward();
        for (i, p) in reference.iter().enumerate() {
            let g = if p.grad().defined() { p.grad() / world as f64 } else { p.zeros_like() };
            if r == 0 {
                expected.push(g);
            } else {
                expected[i] += g;
            }
        }
    }
    for i in [0, 1, 3] {
        ensure_close(&format!("averaged gradient of parameter {i}"), &params[i].grad(), &expected[i], 1e-5)?;
    }
    ensure(!params[2].grad().defined() && !params[4].grad().defined(), || {
        "parameters without gradients must stay without".to_string()
    })?;

    // A parameter used on one rank only must be reported, not hang.
    let extra = grad_params();
    let used = if pg.rank() == 0 { &extra[0] } else { &extra[1] };
    used.sum(Kind::Float).backward();
    let mismatch = all_reduce_grads_bucketed(pg, &extra, 1 << 20);
    ensure(mismatch.as_ref().is_err_and(|e| e.to_string().contains("every rank's loss must use")), || {
        format!("different gradient sets should be an error: {mismatch:?}")
    })
}

/// A small GroupNorm network's parameters, identical on every rank before the broadcast check.
fn train_params() -> Vec<Tensor> {
    vec![
        pattern(&[8, 6], 0.1, Kind::Float).set_requires_grad(true),
        pattern(&[8], 0.2, Kind::Float).set_requires_grad(true),
        pattern(&[3, 8], 0.3, Kind::Float).set_requires_grad(true),
        pattern(&[3], 0.4, Kind::Float).set_requires_grad(true),
    ]
}

/// Mean squared error of the network on samples `first..first + count` of step `step`'s batch.
fn train_loss(params: &[Tensor], step: usize, first: i64, count: i64) -> Tensor {
    let inputs = pattern(&[4, 6], 100.0 + step as f64, Kind::Float).narrow(0, first, count);
    let targets = pattern(&[4, 3], 200.0 + step as f64, Kind::Float).narrow(0, first, count);
    let hidden =
        (inputs.matmul(&params[0].tr()) + &params[1]).group_norm(2, None::<Tensor>, None::<Tensor>, 1e-5, true);
    let outputs = hidden.relu().matmul(&params[2].tr()) + &params[3];
    (outputs - targets).square().mean(Kind::Float)
}

fn sgd_step(params: &[Tensor], learning_rate: f64) {
    tch::no_grad(|| {
        for p in params {
            let _ = p.shallow_clone().g_sub_(&(p.grad() * learning_rate));
            let _ = p.grad().zero_();
        }
    });
}

/// Data-parallel SGD: each rank takes its share of every batch, gradients are averaged; after 10 steps the
/// ranks must hold bit-identical weights, equal (to float rounding) to one process training on whole batches.
fn train(pg: &ProcessGroup) -> Check {
    const STEPS: usize = 10;
    const LEARNING_RATE: f64 = 0.1;
    let world = pg.world_size() as i64;
    if 4 % world != 0 {
        return Err(format!("the train scenario splits batches of 4 and needs a world size dividing 4, not {world}"));
    }
    let share = 4 / world;
    let params = train_params();
    broadcast_parameters(pg, &params, 0).map_err(|e| e.to_string())?;
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let loss = train_loss(&params, step, pg.rank() as i64 * share, share);
        loss.backward();
        all_reduce_grads_bucketed(pg, &params, 64).map_err(|e| e.to_string())?;
        let logged = loss.detach();
        pg.all_reduce(std::slice::from_ref(&logged), ReduceOp::Avg).map_err(|e| e.to_string())?;
        losses.push(logged.double_value(&[]));
        sgd_step(&params, LEARNING_RATE);
    }

    let reference = train_params();
    for (step, logged) in losses.iter().enumerate() {
        let loss = train_loss(&reference, step, 0, 4);
        loss.backward();
        let expected = loss.double_value(&[]);
        ensure((logged - expected).abs() <= 1e-6 * expected.abs().max(1.0), || {
            format!("step {step}: averaged loss {logged} but one process has {expected}")
        })?;
        sgd_step(&reference, LEARNING_RATE);
    }
    for (i, (p, r)) in params.iter().zip(&reference).enumerate() {
        // Different summation orders (half-batch means averaged vs one mean) leave float rounding only: 6e-8 seen.
        ensure_close(&format!("parameter {i} after {STEPS} steps"), p, r, 1e-6)?;
        for (peer, theirs) in pg.all_gather(p).map_err(|e| e.to_string())?.iter().enumerate() {
            ensure(theirs.equal(p), || format!("parameter {i} differs from rank {peer}'s"))?;
        }
    }
    Ok(())
}

/// SyncBN over the ranks, each with `rows(rank)` samples (0 for a head without RoIs), against plain BatchNorm
/// over every rank's samples in one process.
fn syncbn(pg: &Arc<ProcessGroup>, rows: impl Fn(usize) -> i64) -> Check {
    const CHANNELS: i64 = 3;
    let world = pg.world_size();
    let input =
        |r: usize| pattern(&[rows(r), CHANNELS, 3, 4], r as f64 * 3.0, Kind::Float) * (r as f64 + 1.0) + r as f64;
    let loss_weight = |r: usize| pattern(&[rows(r), CHANNELS, 3, 4], 50.0 + r as f64, Kind::Float);

    let vs = nn::VarStore::new(Device::Cpu);
    let spec = NormSpec { kind: NormKind::SyncBN, gn_groups: 1, reducer: Some(pg.clone()) };
    let norm = Norm::new(&vs.root(), CHANNELS, &spec).map_err(|e| e.to_string())?;
    let x = input(pg.rank()).set_requires_grad(true);
    let out = norm.forward_t(&x, true);
    (&out * loss_weight(pg.rank())).sum(Kind::Float).backward();

    // Reference: plain BatchNorm over every rank's batch in one process; the loss is the sum of the ranks' losses.
    let reference_vs = nn::VarStore::new(Device::Cpu);
    let reference =
        Norm::new(&reference_vs.root(), CHANNELS, &NormSpec::new(NormKind::BN, 1)).map_err(|e| e.to_string())?;
    let all_x = Tensor::cat(&(0..world).map(input).collect::<Vec<_>>(), 0).set_requires_grad(true);
    let all_out = reference.forward_t(&all_x, true);
    let all_weights = Tensor::cat(&(0..world).map(loss_weight).collect::<Vec<_>>(), 0);
    (&all_out * all_weights).sum(Kind::Float).backward();

    let offset: i64 = (0..pg.rank()).map(&rows).sum();
    let mine = |t: &Tensor| t.narrow(0, offset, rows(pg.rank()));
    ensure_close("SyncBN output", &out, &mine(&all_out), 1e-5)?;
    ensure_close("SyncBN input gradient", &x.grad(), &mine(&all_x.grad()), 1e-4)?;
    // Averaging the affine gradients over ranks (as data-parallel training does) gives the reference's over world.
    let variables = vs.variables();
    let reference_variables = reference_vs.variables();
    for name in ["weight", "bias"] {
        let grad = variables[name].grad();
        pg.all_reduce(std::slice::from_ref(&grad), ReduceOp::Avg).map_err(|e| e.to_string())?;
        ensure_close(
            &format!("SyncBN {name} gradient"),
            &grad,
            &(reference_variables[name].grad() / world as f64),
            1e-4,
        )?;
    }
    ensure_close("SyncBN running mean", &variables["running_mean"], &reference_variables["running_mean"], 1e-5)
}

/// Every rank all-reduces in a loop; `victim` announces itself after a few iterations and sleeps until killed.
fn die(pg: &ProcessGroup, victim: usize) -> Check {
    let tensor = Tensor::ones([1000], (Kind::Float, Device::Cpu));
    for iteration in 0.. {
        if let Err(e) = pg.all_reduce(std::slice::from_ref(&tensor), ReduceOp::Avg) {
            return Err(format!("iteration {iteration}: {e}"));
        }
        if pg.rank() == victim && iteration == 3 {
            println!("rank {victim}: ready to be killed");
            std::thread::sleep(Duration::from_secs(600));
        }
    }
    Ok(())
}

fn hang(pg: &ProcessGroup) -> Check {
    let tensor = Tensor::ones([10], (Kind::Float, Device::Cpu));
    pg.all_reduce(std::slice::from_ref(&tensor), ReduceOp::Sum).map_err(|e| e.to_string())?;
    if pg.rank() == 1 {
        println!("rank 1: hanging");
        std::thread::sleep(Duration::from_secs(600));
    }
    let start = Instant::now();
    pg.all_reduce(std::slice::from_ref(&tensor), ReduceOp::Sum)
        .map_err(|e| format!("after {:.1}s: {e}", start.elapsed().as_secs_f64()))
}

fn bench(pg: &ProcessGroup, megabytes: usize) -> Check {
    const REPEATS: u32 = 10;
    const BUCKET_BYTES: usize = 25 << 20;
    let numel = (megabytes * 1_000_000 / 4) as i64;
    let tensor = Tensor::ones([numel], (Kind::Float, pg.device()));
    pg.all_reduce(std::slice::from_ref(&tensor), ReduceOp::Sum).map_err(|e| e.to_string())?;
    pg.barrier().map_err(|e| e.to_string())?;
    // The all-reduce waits for its completion; a CUDA tensor read back here also waits for the device.
    let _ = tensor.double_value(&[0]);
    let seconds = time_per_call(REPEATS, || {
        pg.all_reduce(std::slice::from_ref(&tensor), ReduceOp::Avg).map_err(|e| e.to_string())?;
        let _ = tensor.double_value(&[0]);
        Ok(())
    })?;
    report(pg, &format!("all_reduce (Avg) of one {megabytes} MB f32 tensor"), megabytes, seconds);

    // The same volume as 1 MB gradients, averaged in 25 MiB buckets as a training step does.
    let params: Vec<Tensor> =
        (0..megabytes).map(|_| Tensor::zeros([250_000], (Kind::Float, pg.device())).set_requires_grad(true)).collect();
    Tensor::stack(&params, 0).sum(Kind::Float).backward();
    all_reduce_grads_bucketed(pg, &params, BUCKET_BYTES).map_err(|e| e.to_string())?;
    let seconds = time_per_call(REPEATS, || {
        all_reduce_grads_bucketed(pg, &params, BUCKET_BYTES).map_err(|e| e.to_string())?;
        let _ = params[0].grad().double_value(&[0]);
        Ok(())
    })?;
    report(
        pg,
        &format!("all_reduce_grads_bucketed of {megabytes} x 1 MB gradients, 25 MiB buckets"),
        megabytes,
        seconds,
    );
    Ok(())
}

fn time_per_call(repeats: u32, mut call: impl FnMut() -> Check) -> Result<f64, String> {
    let start = Instant::now();
    for _ in 0..repeats {
        call()?;
    }
    Ok(start.elapsed().as_secs_f64() / repeats as f64)
}

fn report(pg: &ProcessGroup, what: &str, megabytes: usize, seconds: f64) {
    if pg.rank() == 0 {
        println!(
            "{what} over {} ranks ({}, {:?}): {seconds:.3} s per call, {:.0} MB/s",
            pg.world_size(),
            pg.backend(),
            pg.device(),
            megabytes as f64 / seconds
        );
    }
}
