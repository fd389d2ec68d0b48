//! The training loop: data, model, solver, checkpoints with exact resume, logging, periodic evaluation, and a
//! clean stop on Ctrl-C (SIGINT/SIGTERM) that saves a checkpoint first.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use data::batch::{Batch, TargetMask};
use data::coco::{CocoDataset, LoadOptions};
use data::loader::{Loader, LoaderOptions};
use data::sampler::{SamplerState, TrainSampler};
use detector::ops::polygons_to_bitmask;
use detector::structures::{GtInstances, GtMasks, ImageBatch};
use detector::MaskRcnn;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tch::{nn, Device, Tensor};

use crate::autocast::autocast;
use crate::checkpoint::{
    init_weights, named_variables, resume_from, torch_seed, CheckpointContents, Checkpointer, LoadedCheckpoint,
};
use crate::coco_eval::GroundTruth;
use crate::config::Config;
use crate::distributed::RankGroup;
use crate::evaluate::{evaluate, EvalOutcome};
use crate::events::{EventWriter, MetricsWriter};
use crate::panics;
use crate::solver::{check_losses, AmpDtype, Solver, SolverState, StepReport};

/// Where training starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// A fresh run (the output folder may not hold checkpoints).
    No,
    /// The last valid checkpoint of the output folder (falling back to older ones with a warning).
    Last,
    /// This checkpoint folder.
    From(PathBuf),
}

/// Command-line choices that are not part of the experiment config.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Resume behaviour.
    pub resume: Resume,
    /// Weights to initialise from (fine-tuning); not a resume.
    pub init_weights: Option<PathBuf>,
    /// Device to train on.
    pub device: Device,
    /// The ranks of a distributed run ([`RankGroup::single`] for one process).
    pub group: RankGroup,
}

/// How a training run ended.
#[derive(Debug)]
pub struct TrainOutcome {
    /// Completed iterations.
    pub iteration: u64,
    /// True when stopped by SIGINT/SIGTERM (a checkpoint was saved).
    pub interrupted: bool,
    /// The last evaluation, if any ran.
    pub last_eval: Option<EvalOutcome>,
}

/// Set by the signal handler; checked once per iteration.
static STOP: AtomicBool = AtomicBool::new(false);

fn install_signal_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // A second handler cannot be installed in the same process (tests); the first one keeps working.
        let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst));
    });
}

/// Loads a split with the config's missing-image policy, with the COCO-location hint when its files are absent.
pub fn load_split(config: &Config, name: &str, progress: bool) -> anyhow::Result<CocoDataset> {
    let data = config.data.as_ref().context(
        "the config has no [data] section: set data.train.annotations, data.train.images, data.val.annotations and \
         data.val.images",
    )?;
    if let Some(synth) = &data.synth {
        if data::synth::ensure(synth)? {
            eprintln!("generated the synthetic dataset in {}", synth.out.display());
        }
    }
    let split = if name == "train" { &data.train } else { &data.val };
    let options = LoadOptions::from_config(data, progress);
    CocoDataset::load_split(split, name, options).map_err(|e| {
        let missing = split.annotations.to_vec().iter().any(|p| !p.exists());
        let hint = if missing {
            " (COCO 2017 is expected under datasets/coco/{annotations,train2017,val2017}; point \
             data.train.annotations, data.train.images, data.val.annotations and data.val.images elsewhere with \
             --set or in the config)"
        } else {
            ""
        };
        anyhow::anyhow!("{e}{hint}")
    })
}

/// A cheap fingerprint of a dataset (annotation files, image count, categories) for checkpoint manifests.
pub fn fingerprint(dataset: &CocoDataset) -> String {
    let mut text = format!("{} images;", dataset.images.len());
    for source in &dataset.sources {
        let size = std::fs::metadata(source).map(|m| m.len()).unwrap_or(0);
        text.push_str(&format!("{}:{size};", source.display()));
    }
    text.push_str(&format!("categories {:?}", dataset.categories.ids()));
    format!("{:016x}", data::rng::mix(&text.bytes().map(u64::from).collect::<Vec<_>>()))
}

/// The training split as training reads it: [`load_split`], then, with `data.filter_empty`, without the images
/// that have no non-crowd annotation.
pub fn load_train_split(config: &Config, progress: bool) -> anyhow::Result<CocoDataset> {
    let mut train_set = load_split(config, "train", progress)?;
    if config.data.as_ref().is_some_and(|d| d.filter_empty) {
        train_set.filter_for_training();
    }
    Ok(train_set)
}

/// Converts the loader's batch into the detector's inputs (each target carries its sampler seed for the
/// detector's per-image RPN/RoI sampling).
pub fn model_inputs(batch: Batch) -> (ImageBatch, Vec<GtInstances>) {
    let seeds = batch.sample_seeds;
    let targets = batch
        .targets
        .into_iter()
        .zip(&batch.image_sizes)
        .enumerate()
        .map(|(i, (target, &(height, width)))| {
            let all_polygons = target.masks.iter().all(|m| matches!(m, TargetMask::Polygons(_)));
            let masks = if all_polygons {
                GtMasks::Polygons(
                    target
                        .masks
                        .into_iter()
                        .map(|m| if let TargetMask::Polygons(p) = m { p } else { vec![] })
                        .collect(),
                )
            } else {
                let device = target.boxes.device();
                let bitmaps: Vec<Tensor> = target
                    .masks
                    .iter()
                    .map(|m| match m {
                        TargetMask::Bitmap(b) => b.to_device(device),
                        TargetMask::Polygons(parts) => polygons_to_bitmask(parts, height, width).to_device(device),
                    })
                    .collect();
                GtMasks::Bitmaps(Tensor::stack(&bitmaps, 0))
            };
            GtInstances { boxes: target.boxes, labels: target.labels, masks, sampling_seed: seeds.get(i).copied() }
        })
        .collect();
    (ImageBatch { images: batch.images, image_sizes: batch.image_sizes }, targets)
}

/// One micro-batch of training: the forward pass (under autocast in `amp`'s dtype when set; the solver's fp16
/// loss scaler handles the gradients), then backward of the summed losses times `loss_multiplier`. Returns each
/// loss's value (one host read); a libtorch panic becomes an error.
pub fn forward_backward(
    model: &MaskRcnn,
    images: &ImageBatch,
    targets: &[GtInstances],
    amp: Option<AmpDtype>,
    loss_multiplier: f64,
) -> anyhow::Result<BTreeMap<String, f64>> {
    panics::catch(|| -> anyhow::Result<BTreeMap<String, f64>> {
        let losses = autocast(images.images.device(), amp, || model.forward_train(images, targets))??;
        let values = losses.iter().map(|(k, v)| (k.clone(), v.double_value(&[]))).collect();
        (total_loss(&losses) * loss_multiplier).backward();
        Ok(values)
    })?
}

/// Sum of named losses as one scalar tensor.
fn total_loss(losses: &BTreeMap<String, Tensor>) -> Tensor {
    let mut terms = losses.values();
    let first = terms.next().expect("the model returns at least one loss").shallow_clone();
    terms.fold(first, |acc, l| acc + l)
}

/// Builds the model for `config` on `device`, checking the class count against the dataset.
pub fn build_detector(config: &Config, num_classes: usize, device: Device) -> anyhow::Result<(nn::VarStore, MaskRcnn)> {
    build_detector_in(config, num_classes, device, &RankGroup::single())
}

/// [`build_detector`] for one rank of `group`: SyncBN layers all-reduce their batch statistics over its ranks.
pub fn build_detector_in(
    config: &Config,
    num_classes: usize,
    device: Device,
    group: &RankGroup,
) -> anyhow::Result<(nn::VarStore, MaskRcnn)> {
    anyhow::ensure!(
        config.model.roi_heads.num_classes == num_classes as i64,
        "model.roi_heads.num_classes = {} but the dataset has {num_classes} categories",
        config.model.roi_heads.num_classes
    );
    let vs = nn::VarStore::new(device);
    let reducer = group.process_group().map(|g| g as Arc<dyn backbone::BatchStatsReducer>);
    let model = MaskRcnn::with_reducer(&vs.root(), &config.model, reducer)?;
    Ok((vs, model))
}

/// `tensor` laid out channels-last (NHWC) when it is 4-D `[N, C, H, W]`: same shape and values, channels
/// innermost, with the strides of PyTorch's `tensor.contiguous(memory_format=torch.channels_last)` (so libtorch
/// recognises the layout even for size-1 dimensions). Other tensors, and tensors already in that layout, are
/// returned as shallow clones.
pub fn to_channels_last(tensor: &Tensor) -> Tensor {
    let size = tensor.size();
    let [_, channels, height, width] = size[..] else { return tensor.shallow_clone() };
    let strides = [height * width * channels, 1, width * channels, channels];
    if tensor.stride() == strides {
        return tensor.shallow_clone();
    }
    let mut out = Tensor::empty_strided(&size, strides, (tensor.kind(), tensor.device()));
    out.copy_(tensor);
    out
}

/// Re-lays out every 4-D variable of `vs` (the convolution weights) channels-last in place, as PyTorch's
/// `model.to(memory_format=torch.channels_last)` does (`param.data = ...`): every handle on a variable (the
/// model's layers, the solver) sees the new layout, values unchanged. Gradients and momentum buffers created
/// afterwards follow it.
pub fn variables_to_channels_last(vs: &nn::VarStore) {
    let _no_grad = tch::no_grad_guard();
    for (_, mut variable) in vs.variables() {
        if variable.dim() == 4 {
            let data = to_channels_last(&variable.detach());
            variable.set_data(&data);
        }
    }
}

/// The images of `batch` channels-last (see [`to_channels_last`]).
pub fn images_to_channels_last(batch: ImageBatch) -> ImageBatch {
    ImageBatch { images: to_channels_last(&batch.images), image_sizes: batch.image_sizes }
}

/// Re-lays out the solver's momentum buffers channels-last after a resume (they are read back in the standard
/// layout), so that they match their channels-last parameters and the multi-tensor update keeps its fast path.
fn momentum_to_channels_last(solver: &mut Solver) -> anyhow::Result<()> {
    let state = solver.state_dict();
    if state.tensors.is_empty() {
        return Ok(());
    }
    let tensors = state.tensors.iter().map(|(name, t)| (name.clone(), to_channels_last(t))).collect();
    solver.load_state_dict(&SolverState { tensors, scalars: state.scalars })?;
    Ok(())
}

/// Rank 0's training log: console lines, `metrics.jsonl` and TensorBoard. The console shows a progress bar only
/// when standard error is an interactive terminal and `log.quiet` is off, with the log lines above it (or on
/// standard output when only that is redirected). Otherwise (`> run.log 2>&1`, nohup, SLURM, CI) there is no bar
/// and every line goes to standard output in full, so a redirected run's file holds all of them.
struct Logger {
    metrics: MetricsWriter,
    events: Option<EventWriter>,
    bar: Option<ProgressBar>,
    /// Training images skipped so far under `data.missing_images = "skip"` (logged as `skipped_images`).
    skipped_images: usize,
}

impl Logger {
    /// The progress bar of a run of `max_iter` iterations starting at `start`, when there is one (see [`Logger`]).
    fn progress_bar(quiet: bool, start: u64, max_iter: u64) -> Option<ProgressBar> {
        if quiet || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(max_iter), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("valid template"),
        );
        bar.set_position(start);
        Some(bar)
    }

    /// Prints `text` (one line or several) in full.
    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) if std::io::stdout().is_terminal() => bar.println(text),
            _ => println!("{text}"),
        }
    }

    /// Writes one iteration's losses, learning rate and timing to the console, metrics.jsonl and TensorBoard.
    #[allow(clippy::too_many_arguments)]
    fn iteration(
        &mut self,
        iteration: u64,
        max_iter: u64,
        losses: &BTreeMap<String, f64>,
        report: &StepReport,
        seconds: f64,
        data_time: f64,
        ims_per_batch: u64,
        max_memory_bytes: Option<u64>,
    ) -> anyhow::Result<()> {
        let total: f64 = losses.values().sum();
        let images_per_second = ims_per_batch as f64 / seconds;
        let mut record = serde_json::Map::new();
        record.insert("iteration".into(), json!(iteration));
        record.insert("total_loss".into(), json!(total));
        for (key, value) in losses {
            record.insert(key.clone(), json!(value));
        }
        record.insert("lr".into(), json!(report.lr));
        record.insert("time".into(), json!(seconds));
        record.insert("data_time".into(), json!(data_time));
        record.insert("images_per_second".into(), json!(images_per_second));
        if let Some(scale) = report.loss_scale {
            record.insert("loss_scale".into(), json!(scale));
        }
        if self.skipped_images > 0 {
            record.insert("skipped_images".into(), json!(self.skipped_images));
        }
        if let Some(bytes) = max_memory_bytes {
            record.insert("max_mem_mb".into(), json!(bytes as f64 / (1 << 20) as f64));
        }
        let eta_seconds = seconds * max_iter.saturating_sub(iteration) as f64;
        let timing = LineTiming { eta_seconds, seconds, data_time, max_memory_bytes };
        self.line(&iteration_line(iteration, total, losses, report.lr, &timing));
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {total:.3}"));
        }
        self.metrics.write(&serde_json::Value::Object(record.clone()))?;
        if let Some(events) = &mut self.events {
            let scalars: Vec<(String, f64)> = record
                .iter()
                .filter(|(k, _)| *k != "iteration")
                .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
                .collect();
            let pairs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            events.add_scalars(iteration, &pairs)?;
            events.flush()?;
        }
        Ok(())
    }

    fn eval(&mut self, iteration: u64, outcome: &EvalOutcome) -> anyhow::Result<()> {
        self.line(outcome.report.trim_end());
        let mut record = serde_json::Map::new();
        record.insert("iteration".into(), json!(iteration));
        for (key, value) in &outcome.metrics {
            record.insert(key.clone(), json!(value));
        }
        self.metrics.write(&serde_json::Value::Object(record))?;
        if let Some(events) = &mut self.events {
            for (key, value) in &outcome.metrics {
                events.add_scalar(key, *value, iteration)?;
            }
            for (image_id, picture) in &outcome.pictures {
                events.add_image_rgb(
                    &format!("predictions/{image_id}"),
                    picture.width,
                    picture.height,
                    &picture.data,
                    iteration,
                )?;
            }
            events.flush()?;
        }
        Ok(())
    }
}

/// Timing part of an [`iteration_line`]: the estimated time left, seconds per iteration and per data fetch, and the
/// CUDA caching allocator's peak (absent on the CPU).
struct LineTiming {
    eta_seconds: f64,
    seconds: f64,
    data_time: f64,
    max_memory_bytes: Option<u64>,
}

/// One periodic console line in detectron2's layout: `eta: 0:41:10  iter: 220  total_loss: 1.234  loss_box_reg:
/// 0.1234  ...  lr: 0.02  time: 0.7300  data_time: 0.0020  max_mem: 1234M`.
fn iteration_line(iteration: u64, total: f64, losses: &BTreeMap<String, f64>, lr: f64, timing: &LineTiming) -> String {
    let eta = timing.eta_seconds.max(0.0).round() as u64;
    let mut line =
        format!("eta: {}:{:02}:{:02}  iter: {iteration}  total_loss: {total:.4}", eta / 3600, eta / 60 % 60, eta % 60);
    for (name, value) in losses {
        line.push_str(&format!("  {name}: {value:.4}"));
    }
    line.push_str(&format!("  lr: {lr:.6}  time: {:.4}  data_time: {:.4}", timing.seconds, timing.data_time));
    if let Some(bytes) = timing.max_memory_bytes {
        line.push_str(&format!("  max_mem: {:.0}M", bytes as f64 / (1 << 20) as f64));
    }
    line
}

/// Trains as configured; see the module documentation. In a distributed run every rank calls this with its
/// [`RankGroup`]: rank 0's weights are broadcast at the start, gradients are averaged after the last micro-batch
/// of each iteration, the ranks agree once per iteration on the logged losses and on stopping, and only rank 0
/// writes logs, TensorBoard events, checkpoints and evaluation results.
pub fn train(config: &Config, options: &TrainOptions) -> anyhow::Result<TrainOutcome> {
    install_signal_handler();
    STOP.store(false, Ordering::SeqCst);
    let group = &options.group;
    let (rank, world_size, main) = (group.rank(), group.world_size(), group.is_main());
    let output_dir = config.output_dir.clone();
    let config_toml = config.to_toml();
    let checkpointer = Checkpointer::new(&output_dir, &config.checkpoint);
    if main && options.resume == Resume::Last {
        if let Some(note) = crate::notices::nothing_to_resume(&output_dir, &checkpointer) {
            eprintln!("warning: {note}");
        }
    }
    if main {
        std::fs::create_dir_all(&output_dir).with_context(|| format!("cannot create {}", output_dir.display()))?;
        // Staging folders of a save that failed (a full disk) are never valid checkpoints; they go first.
        checkpointer.remove_stale_temporaries()?;
        std::fs::write(output_dir.join("config.toml"), &config_toml)
            .with_context(|| format!("cannot write {}", output_dir.join("config.toml").display()))?;
    }

    let quiet = config.log.quiet || !main;
    let train_set = load_train_split(config, !quiet)?;
    let val_set = Arc::new(load_split(config, "val", !quiet)?);
    let val_annotations = val_set.sources.first().context("the validation split has no annotation file")?.clone();
    anyhow::ensure!(
        val_set.sources.len() == 1,
        "evaluation needs one validation annotation file; data.val.annotations lists {}",
        val_set.sources.len()
    );

    if options.device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(config.cudnn_benchmark);
    }
    tch::manual_seed(config.seed as i64);
    let (vs, model) = build_detector_in(config, train_set.categories.len(), options.device, group)?;
    match &options.init_weights {
        Some(path) => {
            let missing = init_weights(&vs, path)?;
            if !missing.is_empty() && main {
                eprintln!(
                    "warning: {} has no values for {} variables (kept their initialisation)",
                    path.display(),
                    missing.len()
                );
            }
        }
        None => config.model.backbone.check_from_scratch()?,
    }
    backbone::freeze(&vs, "backbone.", model.backbone());

    let mut solver_config = config.solver.clone();
    if solver_config.scale_lr_to_batch {
        if let Some(scaling) = solver_config.scale_to_batch(solver_config.ims_per_batch) {
            if main {
                eprintln!("{}", scaling.message);
            }
        }
    }
    let images_per_micro_batch = solver_config.accumulate * world_size as u64;
    anyhow::ensure!(
        solver_config.ims_per_batch.is_multiple_of(images_per_micro_batch),
        "solver.ims_per_batch = {} is not a multiple of solver.accumulate ({}) x the number of processes ({world_size})",
        solver_config.ims_per_batch,
        solver_config.accumulate
    );
    let micro_batch = (solver_config.ims_per_batch / images_per_micro_batch) as usize;
    let amp = solver_config.amp.enabled.then_some(solver_config.amp.dtype);
    let mut solver = Solver::from_var_store(&vs, &solver_config)?;
    // Every rank reads the checkpoint (the output folder must be shared between machines to resume).
    let resumed: Option<LoadedCheckpoint> = match &options.resume {
        Resume::No => None,
        Resume::Last => checkpointer.resume(&vs, &mut solver)?.map(|r| {
            for warning in r.warnings.iter().filter(|_| main) {
                eprintln!("warning: {warning}");
            }
            r.checkpoint
        }),
        Resume::From(path) => Some(resume_from(path, &vs, &mut solver)?),
    };
    // In name order (named_variables sorts), the same on every rank.
    let variables = named_variables(&vs);
    group.broadcast_from_main(&variables.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>())?;
    if config.channels_last {
        variables_to_channels_last(&vs);
        momentum_to_channels_last(&mut solver)?;
    }
    let parameters = vs.trainable_variables();
    let start = solver.iteration();
    let max_iter = solver_config.max_iter;
    if main && resumed.is_none() && !checkpointer.list()?.is_empty() {
        eprintln!(
            "warning: {} holds checkpoints of an earlier run; this run starts from iteration 0 (pass --resume to \
             continue that run instead)",
            output_dir.display()
        );
    }

    let data_config = config.data.as_ref().expect("checked by load_split");
    let mut sampler =
        TrainSampler::new(&train_set, micro_batch, rank, world_size, data_config.aspect_ratio_grouping, config.seed)?;
    if let Some(checkpoint) = &resumed {
        let state: SamplerState = serde_json::from_value(checkpoint.state.sampler.clone())
            .with_context(|| format!("checkpoint {}: sampler state", checkpoint.path.display()))?;
        sampler.restore(state);
        if main {
            eprintln!("resumed from {} at iteration {start}", checkpoint.path.display());
        }
    }
    let dataset_fingerprint = fingerprint(&train_set);
    let skipped_at_load = train_set.stats.skipped_missing_images.len();
    if main {
        let notices = crate::notices::skipped_images(&train_set.stats).into_iter().chain(
            resumed.iter().flat_map(|c| crate::notices::resume_differences(c, &config_toml, &dataset_fingerprint)),
        );
        for notice in notices {
            eprintln!("warning: {notice}");
        }
    }
    let mut loader =
        Loader::train(Arc::new(train_set), config.input.clone(), sampler, LoaderOptions::from_config(data_config))?;
    // Only rank 0 computes COCO metrics.
    let gt = if main { Some(GroundTruth::load(&val_annotations)?) } else { None };

    let mut logger = if main {
        let metrics_path = output_dir.join("metrics.jsonl");
        let metrics = if start > 0 {
            MetricsWriter::open_resumed(&metrics_path, start)?
        } else {
            MetricsWriter::open(&metrics_path)?
        };
        let events =
            if config.log.tensorboard { Some(EventWriter::create(&output_dir.join("tensorboard"))?) } else { None };
        let bar = Logger::progress_bar(quiet, start, max_iter);
        Some(Logger { metrics, events, bar, skipped_images: skipped_at_load })
    } else {
        None
    };

    let save = |solver: &Solver, loader: &Loader, iteration: u64| -> anyhow::Result<PathBuf> {
        let model_tensors = named_variables(&vs);
        let contents = CheckpointContents {
            model: &model_tensors,
            solver: &solver.state_dict(),
            sampler: serde_json::to_value(loader.sampler_state())?,
            rng: json!({"torch": "manual_seed(torch_seed(seed, iteration)) at every iteration", "seed": config.seed}),
            config_toml: &config_toml,
            device: format!("{:?}", options.device),
            dataset_fingerprint: dataset_fingerprint.clone(),
        };
        Ok(checkpointer.save(iteration, &contents)?)
    };

    let mut last_eval = None;
    let mut window_start = Instant::now();
    let mut data_seconds = 0.0;
    let mut window_iters = 0u64;
    let mut iteration = start;
    let mut stop_agreed = false;
    while iteration < max_iter {
        if stop_agreed {
            // All ranks agreed on this iteration; the sampler state is the one after the last finished step.
            if let Some(logger) = &logger {
                let path = save(&solver, &loader, iteration)?;
                logger.line(&format!("interrupted: saved {} at iteration {iteration}", path.display()));
                if let Some(bar) = &logger.bar {
                    bar.abandon();
                }
            }
            group.barrier().with_context(|| format!("rank {rank}: iteration {iteration}: stopping"))?;
            return Ok(TrainOutcome { iteration, interrupted: true, last_eval });
        }
        tch::manual_seed(torch_seed(config.seed, iteration));
        let mut loss_sums: BTreeMap<String, f64> = BTreeMap::new();
        for _ in 0..solver_config.accumulate {
            let fetch = Instant::now();
            let batch = loader.next().context("the training loader stopped")??.to_device(options.device);
            data_seconds += fetch.elapsed().as_secs_f64();
            let (mut images, targets) = model_inputs(batch);
            if config.channels_last {
                images = images_to_channels_last(images);
            }
            let values = forward_backward(&model, &images, &targets, amp, solver.loss_multiplier())
                .with_context(|| format!("rank {rank}: iteration {}: forward and backward pass", iteration + 1))?;
            for (key, value) in values {
                *loss_sums.entry(key).or_default() += value;
            }
        }
        group
            .average_gradients(&parameters)
            .with_context(|| format!("rank {rank}: iteration {}: averaging gradients", iteration + 1))?;
        let local: Vec<f64> = loss_sums.values().map(|v| v / solver_config.accumulate as f64).collect();
        let (means, stop) = group
            .agree(&local, STOP.load(Ordering::SeqCst))
            .with_context(|| format!("rank {rank}: iteration {}: agreeing on losses", iteration + 1))?;
        stop_agreed = stop;
        let logged: BTreeMap<String, f64> = loss_sums.keys().cloned().zip(means).collect();
        check_losses(iteration, logged.iter().map(|(k, v)| (k.as_str(), *v)))?;
        let report = solver.step()?;
        iteration += 1;
        window_iters += 1;

        if let Some(logger) = &mut logger {
            if let Some(bar) = &logger.bar {
                bar.set_position(iteration);
            }
            if iteration % config.log.period.max(1) == 0 || iteration == max_iter {
                let seconds = window_start.elapsed().as_secs_f64() / window_iters as f64;
                let data_time = data_seconds / window_iters as f64;
                // CUDA: the caching allocator's peak since the start, as detectron2's `max_mem`.
                let max_memory = match options.device {
                    Device::Cuda(index) => {
                        crate::memory::cuda_memory_stats(index).ok().map(|s| s.peak_allocated_bytes as u64)
                    }
                    _ => None,
                };
                logger.skipped_images = skipped_at_load + loader.skipped();
                logger.iteration(
                    iteration,
                    max_iter,
                    &logged,
                    &report,
                    seconds,
                    data_time,
                    solver_config.ims_per_batch,
                    max_memory,
                )?;
                window_start = Instant::now();
                data_seconds = 0.0;
                window_iters = 0;
            }
        }

        let eval_due = (config.eval.period > 0 && iteration % config.eval.period == 0)
            || (iteration == max_iter && config.eval.at_end);
        let mut eval_metrics = None;
        if eval_due {
            let results_dir = output_dir.join("inference");
            let outcome =
                evaluate(&model, config, val_set.clone(), gt.as_ref(), options.device, Some(&results_dir), group)
                    .with_context(|| format!("rank {rank}: iteration {iteration}: evaluation"))?;
            if let Some(logger) = &mut logger {
                logger.eval(iteration, &outcome)?;
            }
            eval_metrics = Some(outcome.metrics.clone());
            last_eval = Some(outcome);
        }
        if main && checkpointer.is_due(iteration, max_iter) {
            let path = save(&solver, &loader, iteration)?;
            if let Some(metrics) = &eval_metrics {
                checkpointer.update_best(&path, metrics)?;
            }
        }
    }
    if let Some(bar) = logger.as_ref().and_then(|l| l.bar.as_ref()) {
        bar.finish_and_clear();
    }
    group.barrier().with_context(|| format!("rank {rank}: iteration {iteration}: finishing"))?;
    Ok(TrainOutcome { iteration, interrupted: false, last_eval })
}

/// Loads `weights` (a checkpoint folder or a safetensors file with our names) into the model variables of `vs`,
/// refusing a file that lacks any of them, then lays the convolution weights out channels-last when the config's
/// `channels_last` is set. For evaluation and prediction, which need every weight.
pub fn load_weights(config: &Config, vs: &nn::VarStore, weights: &Path) -> anyhow::Result<()> {
    let missing = init_weights(vs, weights)?;
    anyhow::ensure!(
        missing.is_empty(),
        "{} lacks {} model variables (e.g. `{}`); convert foreign weights with `trainer convert`",
        weights.display(),
        missing.len(),
        missing[0]
    );
    if config.channels_last {
        variables_to_channels_last(vs);
    }
    Ok(())
}

/// `trainer eval`: loads weights (a checkpoint folder or a safetensors file) and evaluates the validation split,
/// sharded over the ranks of `group` when distributed.
pub fn evaluate_weights(
    config: &Config,
    weights: &Path,
    device: Device,
    group: &RankGroup,
) -> anyhow::Result<EvalOutcome> {
    let val_set = Arc::new(load_split(config, "val", !config.log.quiet && group.is_main())?);
    let annotations = val_set.sources.first().context("the validation split has no annotation file")?.clone();
    let (vs, model) = build_detector_in(config, val_set.categories.len(), device, group)?;
    load_weights(config, &vs, weights)?;
    let gt = if group.is_main() { Some(GroundTruth::load(&annotations)?) } else { None };
    let results_dir = config.output_dir.join("inference");
    evaluate(&model, config, val_set, gt.as_ref(), device, Some(&results_dir), group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iteration_lines_have_detectron2s_layout() {
        let losses: BTreeMap<String, f64> = [("loss_cls".to_string(), 0.5), ("loss_mask".to_string(), 0.25)].into();
        let timing = LineTiming { eta_seconds: 2470.4, seconds: 0.73, data_time: 0.002, max_memory_bytes: None };
        assert_eq!(
            iteration_line(220, 0.75, &losses, 0.02, &timing),
            "eta: 0:41:10  iter: 220  total_loss: 0.7500  loss_cls: 0.5000  loss_mask: 0.2500  lr: 0.020000  time: \
             0.7300  data_time: 0.0020"
        );
        let timing = LineTiming { eta_seconds: 90061.0, max_memory_bytes: Some(3 << 30), ..timing };
        let line = iteration_line(1, 1.0, &BTreeMap::new(), 0.001, &timing);
        assert!(line.starts_with("eta: 25:01:01  iter: 1  total_loss: 1.0000  lr: 0.001000"), "{line}");
        assert!(line.ends_with("  max_mem: 3072M"), "{line}");
    }
}
