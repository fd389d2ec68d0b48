//! `trainer bench`: speed measurements following detectron2's protocol (medians after a warm-up).

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::Config;

/// Settings shared by the benchmark modes.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Timed iterations.
    pub iters: usize,
    /// Untimed iterations before timing.
    pub warmup: usize,
    /// Images per iteration.
    pub batch: i64,
    /// Input `[height, width]`.
    pub size: [i64; 2],
    /// Where to run.
    pub device: Device,
}

/// Result of `trainer bench backbone`.
#[derive(Debug, Serialize)]
pub struct BackboneBench {
    /// Backbone name from the config.
    pub backbone: String,
    /// Input `[batch, height, width]`.
    pub input: [i64; 3],
    /// Median seconds of one forward pass (no gradients) over the timed iterations.
    pub seconds_per_iter: f64,
    /// Images per second at the median.
    pub images_per_second: f64,
    /// Multiply-accumulates of one forward pass of the whole batch, in units of 1e9.
    pub gflops: f64,
    /// Achieved GFLOP/s at the median time (the paper's GPU-computation efficiency).
    pub gflops_per_second: f64,
    /// Trainable parameters of the backbone.
    pub params: i64,
    /// Peak memory: `VmHWM` of the process on CPU; null on CUDA until the CUDA allocator stats are exposed.
    pub peak_memory_bytes: Option<u64>,
    /// Device string.
    pub device: String,
    /// Intra-op threads libtorch used.
    pub threads: i32,
}

/// Median of a non-empty list of seconds.
pub fn median(mut seconds: Vec<f64>) -> f64 {
    seconds.sort_by(f64::total_cmp);
    let n = seconds.len();
    if n % 2 == 1 {
        seconds[n / 2]
    } else {
        (seconds[n / 2 - 1] + seconds[n / 2]) / 2.0
    }
}

/// Peak resident memory of this process (`VmHWM` from `/proc/self/status`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Times the backbone's forward pass (inference mode, no gradients) on random input.
pub fn bench_backbone(config: &Config, options: &BenchOptions) -> anyhow::Result<BackboneBench> {
    anyhow::ensure!(options.iters > 0, "--iters must be at least 1");
    let vs = tch::nn::VarStore::new(options.device);
    let backbone = backbone::Backbone::new(&(vs.root() / "backbone"), &config.model.backbone, None)?;
    let params = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let [h, w] = options.size;
    let input = Tensor::randn([options.batch, 3, h, w], (Kind::Float, options.device));
    let forward = || tch::no_grad(|| backbone.forward_t(&input, false));
    let (_, macs) = backbone::flops::count_macs(forward);
    for _ in 0..options.warmup {
        forward();
    }
    synchronize(options.device);
    let mut times = Vec::with_capacity(options.iters);
    for _ in 0..options.iters {
        let start = Instant::now();
        forward();
        synchronize(options.device);
        times.push(start.elapsed().as_secs_f64());
    }
    let seconds = median(times);
    let gflops = macs as f64 / 1e9;
    Ok(BackboneBench {
        backbone: config.model.backbone.name.clone(),
        input: [options.batch, h, w],
        seconds_per_iter: seconds,
        images_per_second: options.batch as f64 / seconds,
        gflops,
        gflops_per_second: gflops / seconds,
        params,
        peak_memory_bytes: if options.device == Device::Cpu { peak_rss_bytes() } else { None },
        device: format!("{:?}", options.device),
        threads: tch::get_num_threads(),
    })
}
