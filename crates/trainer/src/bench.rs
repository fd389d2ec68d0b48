//! `trainer bench`: speed and memory measurements following detectron2's protocol (untimed warm-up iterations,
//! then timed ones; CUDA synchronised before every timer read).
//!
//! - `train`: the training step of `trainer train` between reads (forward under autocast when `--amp`,
//!   backward, the solver's device-side step, the losses recorded on the device; see
//!   [`crate::engine::StepLog`]) on one fixed synthetic batch built once (see [`crate::synthetic::SyntheticInputs`]), so that no
//!   data loading is timed. Throughput is the mean over the timed iterations; the losses are read once at the
//!   end.
//! - `infer`: batch 1; the model call (forward to detections, which includes the on-device mask pasting at the
//!   image size, as in detectron2's and torchvision's model calls), end to end (host pixels to detections on the
//!   host), and the mask pasting alone, each a median.
//! - `data`: the training loader alone on the config's train split.
//! - `backbone`: forward latency, GFLOPs, achieved GFLOP/s and parameters of the backbone.
//!
//! With the config's `channels_last`, `train`, `infer` and `backbone` run with channels-last (NHWC) weights and
//! inputs, as training does.

use std::time::Instant;

use anyhow::Context;
use data::loader::{Loader, LoaderOptions};
use data::sampler::TrainSampler;
use detector::config::OutputStyle;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::autocast::autocast;
use crate::config::Config;
use crate::datasets::load_train_split;
use crate::distributed::RankGroup;
use crate::engine::{forward_backward, StepLog};
use crate::evaluate::HostDetections;
use crate::layout::{images_to_channels_last, to_channels_last, variables_to_channels_last};
use crate::memory::{peak_memory, reset_peak_memory, PeakMemorySource};
use crate::model::{build_model, BuiltModel};
use crate::op_count::{count_ops, SyncCounts};
use crate::solver::{AmpDtype, Solver};
use crate::synthetic::{image_batch, SyntheticInputs};

/// What to measure: the `MODE` argument of `trainer bench` (its variants' documentation is the command's help)
/// and the `mode` of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// Training step (forward, backward, solver step) on fixed synthetic inputs: mean images/s, median s/iter.
    Train,
    /// Batch-1 inference: model time, end to end (host pixels to host detections) and mask pasting, per image.
    Infer,
    /// The training loader alone on the config's train split: images/s.
    Data,
    /// Forward latency, GFLOPs, GFLOP/s, parameters and peak memory of the backbone alone.
    Backbone,
}

/// Settings shared by the benchmark modes.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Timed iterations.
    pub iters: usize,
    /// Untimed iterations before timing.
    pub warmup: usize,
    /// Images per iteration.
    pub batch: i64,
    /// Input `[height, width]` of the synthetic images (not used by `data`, which reads the config's sizes).
    pub size: [i64; 2],
    /// Where to run.
    pub device: Device,
    /// Autocast dtype (`--amp`, `--amp=bf16`), on CUDA or CPU; `None` runs in float32.
    pub amp: Option<AmpDtype>,
    /// Seed of the synthetic inputs and of the model's initialisation.
    pub seed: u64,
    /// The config file's name, for the report.
    pub config_file: String,
}

/// One benchmark's result; `--json` prints it as one object.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// What was measured.
    pub mode: BenchMode,
    /// The config file.
    pub config: String,
    /// Backbone name from the config.
    pub backbone: String,
    /// Foreground classes of the model (the synthetic labels are drawn below it).
    pub num_classes: i64,
    /// Images per iteration.
    pub batch: i64,
    /// Input `[height, width]`; null for `data`, whose sizes come from the config's `[input]`.
    pub size: Option<[i64; 2]>,
    /// Device string.
    pub device: String,
    /// The autocast dtype, null when off.
    pub amp: Option<AmpDtype>,
    /// Whether the weights and inputs were channels-last (the config's `channels_last`).
    pub channels_last: bool,
    /// Intra-op threads libtorch used.
    pub threads: i32,
    /// Timed iterations.
    pub iters: usize,
    /// Untimed warm-up iterations.
    pub warmup: usize,
    /// Median seconds of one timed iteration (for `infer`: of the model call on one image).
    pub seconds_per_iter: f64,
    /// `train` and `data`: images of all timed iterations over their total time (the mean); `infer` and
    /// `backbone`: batch over the median.
    pub images_per_second: f64,
    /// Peak memory in bytes over the benchmark (model, inputs, warm-up and timed iterations); null if unreadable.
    pub peak_memory_bytes: Option<u64>,
    /// What `peak_memory_bytes` measures.
    pub peak_memory_source: PeakMemorySource,
    /// Mode-specific results.
    #[serde(flatten)]
    pub details: BenchDetails,
}

/// Results only some modes have.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BenchDetails {
    /// `train`.
    Train {
        /// Mean seconds per timed iteration.
        mean_seconds_per_iter: f64,
        /// Sum of the losses of the last (counted) iteration, read once after all of them (a sanity value: finite,
        /// and falling over iterations).
        last_total_loss: f64,
        /// Checksum of the synthetic inputs (pixel sum plus box coordinate sum), equal in
        /// `scripts/bench_torchvision.py` when both draw the same numbers from torch's CPU generator.
        input_checksum: f64,
        /// libtorch operators dispatched by one more (untimed) training step (its thread and autograd's work):
        /// about one kernel launch each on CUDA.
        ops_per_iter: u64,
        /// Of those, the ones that make the host wait for a CUDA device (see
        /// [`crate::op_count::SYNCHRONISING_OPS`]).
        synchronising_ops_per_iter: u64,
        /// Points where the host waits for the device in that step: the synchronising operators plus the tensors
        /// copied to the host through the `transfer` crate (counted on the CPU as they would happen on a GPU).
        host_syncs_per_iter: u64,
        /// Host<->device copies in that step: the `transfer` crate's uploads, downloads and moves, plus the
        /// scalar reads (`aten::_local_scalar_dense`).
        transfers_per_iter: u64,
        /// Of those, the ones the host waits for: downloads, moves and scalar reads (uploads go through pinned
        /// memory without blocking).
        blocking_transfers_per_iter: u64,
        /// The most frequent operators of that step, with their counts.
        top_ops: Vec<(String, u64)>,
    },
    /// `infer`.
    Infer {
        /// Median seconds from host `u8` pixels to detections (boxes, scores, labels, pasted masks) on the host.
        end_to_end_seconds_per_image: f64,
        /// Median seconds of pasting the image's detected masks alone (part of the model call).
        paste_masks_seconds_per_image: f64,
        /// Mean detections per image (the test score threshold is 0, so a randomly initialised model yields
        /// `detections_per_image` of them and the mask head and pasting are exercised).
        detections_per_image: f64,
        /// Checksum of the synthetic inputs, as for `train`.
        input_checksum: f64,
    },
    /// `data`.
    Data {
        /// Loader worker threads.
        num_workers: usize,
    },
    /// `backbone`.
    Backbone {
        /// Input `[batch, height, width]`.
        input: [i64; 3],
        /// Multiply-accumulates of one forward pass of the whole batch, in units of 1e9.
        gflops: f64,
        /// Achieved GFLOP/s at the median time (the paper's GPU-computation efficiency).
        gflops_per_second: f64,
        /// Trainable parameters of the backbone.
        params: i64,
    },
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

/// Waits for the device's queued work, so that host timers measure it.
fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Runs `step` `warmup` times untimed, then `iters` times timed; returns the seconds of each timed run.
fn time_iterations(options: &BenchOptions, mut step: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
    for _ in 0..options.warmup {
        step()?;
    }
    synchronize(options.device);
    let mut times = Vec::with_capacity(options.iters);
    for _ in 0..options.iters {
        let start = Instant::now();
        step()?;
        synchronize(options.device);
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn check_options(options: &BenchOptions) -> anyhow::Result<()> {
    anyhow::ensure!(options.iters > 0, "--iters must be at least 1");
    anyhow::ensure!(options.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(options.size.iter().all(|&s| s > 0), "--size must be positive");
    Ok(())
}

/// Peak memory since the benchmark's start, or null with a warning when the statistics cannot be read.
fn measured_peak(device: Device) -> (Option<u64>, PeakMemorySource) {
    let source = if device.is_cuda() { PeakMemorySource::CudaMaxMemoryAllocated } else { PeakMemorySource::PeakRss };
    match peak_memory(device) {
        Ok((bytes, source)) => (Some(bytes), source),
        Err(e) => {
            log::warn!("{e}");
            (None, source)
        }
    }
}

/// Starts the peak-memory window, warning (not failing) when it cannot be reset.
fn start_peak_window(device: Device) {
    if let Err(e) = reset_peak_memory(device) {
        log::warn!("{e}; the peak memory covers the whole process");
    }
}

fn report(
    mode: BenchMode,
    config: &Config,
    options: &BenchOptions,
    times: &[f64],
    images_per_second: f64,
    details: BenchDetails,
) -> BenchReport {
    let (peak_memory_bytes, peak_memory_source) = measured_peak(options.device);
    BenchReport {
        mode,
        config: options.config_file.clone(),
        backbone: config.model.backbone.name.clone(),
        num_classes: config.model.roi_heads.num_classes,
        batch: options.batch,
        size: (mode != BenchMode::Data).then_some(options.size),
        device: format!("{:?}", options.device),
        amp: options.amp,
        channels_last: config.channels_last,
        threads: tch::get_num_threads(),
        iters: options.iters,
        warmup: options.warmup,
        seconds_per_iter: median(times.to_vec()),
        images_per_second,
        peak_memory_bytes,
        peak_memory_source,
        details,
    }
}

/// `trainer bench train`: the training step on fixed synthetic inputs; see the module documentation.
pub fn bench_train(config: &Config, options: &BenchOptions) -> anyhow::Result<BenchReport> {
    check_options(options)?;
    start_peak_window(options.device);
    let device = options.device;
    tch::manual_seed(options.seed as i64);
    let BuiltModel { vs, model } = build_model(config, device, &RankGroup::single())?;
    backbone::freeze(&vs, "backbone.", model.backbone());
    if config.channels_last {
        variables_to_channels_last(&vs);
    }
    let mut solver_config = config.solver.clone();
    solver_config.accumulate = 1;
    solver_config.ims_per_batch = options.batch as u64;
    solver_config.amp.enabled = options.amp.is_some();
    solver_config.amp.dtype = options.amp.unwrap_or(AmpDtype::Fp16);
    let mut solver = Solver::from_var_store(&vs, &solver_config)?;
    let inputs = SyntheticInputs::new(config, options.batch, options.size, options.seed, device)?;
    let mut log = StepLog::new();
    let mut step = || -> anyhow::Result<()> {
        // As in `trainer train` between reads: forward and backward, the solver's device-side step, recorded in
        // the step log; nothing is read on the host.
        let losses = forward_backward(&model, &inputs.batch, &inputs.targets, options.amp, &solver.loss_multiplier())?;
        let prepared = solver.prepare_step()?;
        let step = solver.update(&prepared, Some(&losses.values))?;
        log.record(&losses, 1, &step);
        Ok(())
    };
    let times = time_iterations(options, &mut step)?;
    let copies_before = transfer::counts();
    let (counted, mut counts) = count_ops(&mut step)?;
    counted?;
    let copies = transfer::counts().since(&copies_before);
    // The one read of the whole benchmark, as `trainer train` reads at a log line: it also stops on a failed step.
    let read = log.read()?.context("the benchmark ran steps")?;
    if let Some(failure) = &read.first_failure {
        return Err(failure.error().into());
    }
    let last_total_loss = read.losses.values().sum();
    // aten operators only, as scripts/bench_torchvision.py counts them.
    counts.retain(|name, _| name.starts_with("aten::"));
    let mut top_ops: Vec<(String, u64)> = counts.iter().map(|(name, &count)| (name.clone(), count)).collect();
    top_ops.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top_ops.truncate(15);
    let syncs = SyncCounts::of(&counts, &copies);
    let total: f64 = times.iter().sum();
    let details = BenchDetails::Train {
        mean_seconds_per_iter: total / times.len() as f64,
        last_total_loss,
        input_checksum: inputs.checksum,
        ops_per_iter: counts.values().sum(),
        synchronising_ops_per_iter: syncs.synchronising_ops,
        host_syncs_per_iter: syncs.host_syncs,
        transfers_per_iter: syncs.transfers,
        blocking_transfers_per_iter: syncs.blocking_transfers,
        top_ops,
    };
    let images_per_second = (options.batch as usize * times.len()) as f64 / total;
    Ok(report(BenchMode::Train, config, options, &times, images_per_second, details))
}

/// `trainer bench infer`: seconds per image at batch 1; see the module documentation.
pub fn bench_infer(config: &Config, options: &BenchOptions) -> anyhow::Result<BenchReport> {
    check_options(options)?;
    anyhow::ensure!(options.batch == 1, "bench infer measures batch 1 (detectron2's protocol); drop --batch");
    start_peak_window(options.device);
    let device = options.device;
    let mut config = config.clone();
    config.model.roi_heads.score_thresh_test = 0.0;
    tch::manual_seed(options.seed as i64);
    let BuiltModel { vs, model } = build_model(&config, device, &RankGroup::single())?;
    if config.channels_last {
        variables_to_channels_last(&vs);
    }
    let inputs = SyntheticInputs::new(&config, 1, options.size, options.seed, device)?;
    let sizes = inputs.batch.image_sizes.clone();
    let style = config.model.roi_heads.output_style;
    let threshold = config.model.mask_head.mask_threshold;
    let resolution = config.model.mask_head.pooler_resolution * 2;

    let mut detections = 0usize;
    let mut model_runs = 0usize;
    let mut boxes = Tensor::zeros([0, 4], (Kind::Float, device));
    let model_times = time_iterations(options, || {
        let mut output = autocast(device, options.amp, || model.inference(&inputs.batch, &sizes))??;
        let image = output.remove(0);
        detections += image.boxes.size()[0] as usize;
        model_runs += 1;
        boxes = image.boxes;
        Ok(())
    })?;
    let end_to_end_times = time_iterations(options, || {
        let mut batch = image_batch(&inputs.pixels, &config, device)?;
        if config.channels_last {
            batch = images_to_channels_last(batch);
        }
        let mut output = autocast(device, options.amp, || model.inference(&batch, &sizes))??;
        HostDetections::new(&output.remove(0))?;
        Ok(())
    })?;
    // The pasting alone, on RoI mask probabilities of the model's size at the detected boxes.
    let (h, w) = sizes[0];
    let roi_masks = Tensor::rand([boxes.size()[0], resolution, resolution], (Kind::Float, device));
    let paste_times = time_iterations(options, || {
        let _ = match style {
            OutputStyle::Detectron2 => detector::ops::paste_masks(&roi_masks, &boxes, h, w, threshold),
            OutputStyle::Torchvision => detector::ops::paste_masks_torchvision(&roi_masks, &boxes, h, w).gt(threshold),
        };
        Ok(())
    })?;
    let seconds = median(model_times.clone());
    let details = BenchDetails::Infer {
        end_to_end_seconds_per_image: median(end_to_end_times),
        paste_masks_seconds_per_image: median(paste_times),
        detections_per_image: detections as f64 / model_runs.max(1) as f64,
        input_checksum: inputs.checksum,
    };
    Ok(report(BenchMode::Infer, &config, options, &model_times, 1.0 / seconds, details))
}

/// `trainer bench data`: batches per second of the training loader alone (the config's train split, sampler,
/// augmentation, workers and prefetch), converted to images per second.
pub fn bench_data(config: &Config, options: &BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(options.amp.is_none(), "--amp does not apply to bench data");
    let options = BenchOptions { device: Device::Cpu, ..options.clone() };
    check_options(&options)?;
    start_peak_window(Device::Cpu);
    let train_set = load_train_split(config, false)?;
    let data_config = config.data.as_ref().context("the config has no [data] section")?;
    let sampler =
        TrainSampler::new(&train_set, options.batch as usize, 0, 1, data_config.aspect_ratio_grouping, options.seed)?;
    let loader_options = LoaderOptions::from_config(data_config);
    let mut loader = Loader::train(std::sync::Arc::new(train_set), config.input.clone(), sampler, loader_options)?;
    let times = time_iterations(&options, || {
        loader.next().context("the training loader stopped")??;
        Ok(())
    })?;
    let total: f64 = times.iter().sum();
    let images_per_second = (options.batch as usize * times.len()) as f64 / total;
    let details = BenchDetails::Data { num_workers: loader_options.num_workers };
    Ok(report(BenchMode::Data, config, &options, &times, images_per_second, details))
}

/// `trainer bench backbone`: the backbone's forward pass (inference mode, no gradients) on random input.
pub fn bench_backbone(config: &Config, options: &BenchOptions) -> anyhow::Result<BenchReport> {
    check_options(options)?;
    start_peak_window(options.device);
    let vs = tch::nn::VarStore::new(options.device);
    let backbone = backbone::Backbone::new(&(vs.root() / "backbone"), &config.model.backbone, None)?;
    let params = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let [h, w] = options.size;
    let mut input = Tensor::randn([options.batch, 3, h, w], (Kind::Float, options.device));
    if config.channels_last {
        variables_to_channels_last(&vs);
        input = to_channels_last(&input);
    }
    let forward = || tch::no_grad(|| autocast(options.device, options.amp, || backbone.forward_t(&input, false)));
    let (first, macs) = backbone::flops::count_macs(forward);
    first?;
    let times = time_iterations(options, || {
        forward()?;
        Ok(())
    })?;
    let seconds = median(times.clone());
    let gflops = macs as f64 / 1e9;
    let details =
        BenchDetails::Backbone { input: [options.batch, h, w], gflops, gflops_per_second: gflops / seconds, params };
    Ok(report(BenchMode::Backbone, config, options, &times, options.batch as f64 / seconds, details))
}
