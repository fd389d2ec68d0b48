//! `trainer train`: builds what a run needs (output folder, data, model, solver, the resumed state, loader,
//! log) and runs the [`Trainer`] with its hooks: logging, periodic evaluation, checkpoints with exact resume,
//! best-model tracking, and a clean stop on Ctrl-C (SIGINT/SIGTERM) that saves a checkpoint first.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use data::coco::CocoDataset;
use data::loader::{Loader, LoaderOptions};
use data::sampler::{SamplerState, TrainSampler};
use tch::{nn, Device};

use crate::checkpoint::{init_weights, named_variables, resume_from, Checkpointer, LoadedCheckpoint, WhichWeights};
use crate::coco_eval::GroundTruth;
use crate::config::Config;
use crate::datasets::{fingerprint, load_split, load_train_split};
use crate::distributed::RankGroup;
use crate::engine::hooks::{
    BestCheckpointer, EmaUpdater, EvalHook, PeriodicCheckpointer, PeriodicWriter, RankBarrier, SignalStop,
};
use crate::engine::{CheckpointInfo, DeviceFeed, Hook, Logger, TrainOutcome, Trainer};
use crate::gradients::GradientAveraging;
use crate::layout::{momentum_to_channels_last, variables_to_channels_last};
use crate::model::{build_for_dataset, BuiltModel};
use crate::solver::{ModelEma, Solver, SolverConfig};

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

/// Trains as configured; see the module documentation. In a distributed run every rank calls this with its
/// [`RankGroup`]: rank 0's weights are broadcast at the start, gradients are averaged after the last micro-batch
/// of each iteration, the ranks agree once per iteration on the logged losses and on stopping, and only rank 0
/// writes logs, TensorBoard events, checkpoints and evaluation results.
pub fn train(config: &Config, options: &TrainOptions) -> anyhow::Result<TrainOutcome> {
    anyhow::ensure!(
        !config.eval.use_ema || config.solver.ema.enabled,
        "eval.use_ema = true needs solver.ema.enabled = true (there is no EMA to evaluate)"
    );
    config.log.cuda_sync_debug.check(options.device)?;
    let (signal_stop, stop_signal) = SignalStop::install();
    let group = &options.group;
    let (world_size, main) = (group.world_size(), group.is_main());
    let output_dir = config.output_dir.clone();
    let config_toml = config.to_toml();
    let checkpointer = Checkpointer::new(&output_dir, &config.checkpoint);
    prepare_output_dir(config, options, &checkpointer, &config_toml)?;

    let quiet = config.log.quiet || !main;
    let train_set = load_train_split(config, !quiet)?;
    let val_set = Arc::new(load_split(config, "val", !quiet)?);
    let val_annotations = val_set.sources.first().context("the validation split has no annotation file")?.clone();
    anyhow::ensure!(
        val_set.sources.len() == 1,
        "evaluation needs one validation annotation file; data.val.annotations lists {}",
        val_set.sources.len()
    );

    let BuiltModel { vs, model } = initial_model(config, options, train_set.categories.len())?;

    let solver_config = solver_config(config, world_size, main)?;
    let micro_batch = (solver_config.ims_per_batch / (solver_config.accumulate * world_size as u64)) as usize;
    let mut solver = Solver::from_var_store(&vs, &solver_config)?;
    let resumed = resume(options, &checkpointer, &vs, &mut solver)?;
    // In name order (named_variables sorts), the same on every rank.
    let variables = named_variables(&vs);
    group.broadcast_from_main(&variables.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>())?;
    if config.channels_last {
        variables_to_channels_last(&vs);
        momentum_to_channels_last(&mut solver)?;
    }
    let gradients = GradientAveraging::new(group, &vs.trainable_variables(), &config.ddp)?;
    let ema = model_ema(&vs, &solver_config, resumed.as_ref(), main)?;
    let start = solver.iteration();
    let max_iter = solver_config.max_iter;
    if main && resumed.is_none() && !checkpointer.list()?.is_empty() {
        log::warn!(
            "{} holds checkpoints of an earlier run; this run starts from iteration 0 (pass --resume to \
             continue that run instead)",
            output_dir.display()
        );
    }

    let sampler = train_sampler(config, &train_set, micro_batch, group, resumed.as_ref(), start)?;
    let dataset_fingerprint = fingerprint(&train_set);
    let skipped_at_load = train_set.stats.skipped_missing_images.len();
    if main {
        let notices = crate::notices::skipped_images(&train_set.stats).into_iter().chain(
            resumed.iter().flat_map(|c| crate::notices::resume_differences(c, &config_toml, &dataset_fingerprint)),
        );
        for notice in notices {
            log::warn!("{notice}");
        }
    }
    let data_config = config.data.as_ref().expect("checked by load_split");
    let loader =
        Loader::train(Arc::new(train_set), config.input.clone(), sampler, LoaderOptions::from_config(data_config))?;
    // Only rank 0 computes COCO metrics.
    let gt = if main { Some(GroundTruth::load(&val_annotations)?) } else { None };
    let logger = if main {
        Some(Logger::open(&output_dir, start, max_iter, quiet, config.log.tensorboard, skipped_at_load)?)
    } else {
        None
    };

    let trainer = Trainer {
        model,
        vs,
        solver,
        ema,
        feed: DeviceFeed::new(loader, options.device)?,
        group: group.clone(),
        device: options.device,
        checkpointer,
        checkpoint_info: CheckpointInfo { config_toml, dataset_fingerprint },
        logger,
        seed: config.seed,
        accumulate: solver_config.accumulate,
        amp: solver_config.amp.enabled.then_some(solver_config.amp.dtype),
        channels_last: config.channels_last,
        max_iter,
        iteration: start,
        stop_signal,
        gradients,
        losses: Default::default(),
        report: None,
        last_read: None,
        step_log: Default::default(),
        sync_counts: config.log.sync_counts.then(Vec::new),
        cuda_sync_debug: config.log.cuda_sync_debug,
        data_seconds: 0.0,
        stop_agreed: false,
        interrupted: false,
        last_eval: None,
        last_checkpoint: None,
    };
    // After a step: the EMA update, the log line, then the evaluation (logged after it), the checkpoint, the best
    // model (which needs both), and the stop (which saves its own checkpoint); the barrier comes after training.
    let mut hooks: Vec<Box<dyn Hook + '_>> = vec![
        Box::new(EmaUpdater),
        Box::new(PeriodicWriter::new(config.log.period, solver_config.ims_per_batch, skipped_at_load)),
        Box::new(EvalHook::new(config, val_set, gt)),
        Box::new(PeriodicCheckpointer),
        Box::new(BestCheckpointer),
        Box::new(signal_stop),
        Box::new(RankBarrier),
    ];
    trainer.run(&mut hooks)
}

/// The EMA of the weights when `solver.ema` is on: the `resumed` checkpoint's, or the current weights' when it
/// has none (rank 0 (`main`) says so). Built after the weights' final layout, as it keeps handles to them.
fn model_ema(
    vs: &nn::VarStore,
    solver_config: &SolverConfig,
    resumed: Option<&LoadedCheckpoint>,
    main: bool,
) -> anyhow::Result<Option<ModelEma>> {
    if !solver_config.ema.enabled {
        return Ok(None);
    }
    let mut ema = ModelEma::new(vs, &solver_config.ema);
    if let Some(checkpoint) = resumed {
        match &checkpoint.ema {
            Some(state) => ema
                .load_state_dict(state)
                .with_context(|| format!("checkpoint {}: ema.safetensors", checkpoint.path.display()))?,
            None if main => log::warn!(
                "{} has no EMA of the weights (saved with solver.ema off); the EMA starts from its weights",
                checkpoint.path.display()
            ),
            None => {}
        }
    }
    Ok(Some(ema))
}

/// Rank 0's preparation of the output folder: the note when `--resume` finds nothing to resume, the folder
/// itself, the removal of staging folders of a failed save, and the resolved `config.toml`.
fn prepare_output_dir(
    config: &Config,
    options: &TrainOptions,
    checkpointer: &Checkpointer,
    config_toml: &str,
) -> anyhow::Result<()> {
    if !options.group.is_main() {
        return Ok(());
    }
    let output_dir = &config.output_dir;
    if options.resume == Resume::Last {
        if let Some(note) = crate::notices::nothing_to_resume(output_dir, checkpointer) {
            log::warn!("{note}");
        }
    }
    std::fs::create_dir_all(output_dir).with_context(|| format!("cannot create {}", output_dir.display()))?;
    // Staging folders of a save that failed (a full disk) are never valid checkpoints; they go first.
    checkpointer.remove_stale_temporaries()?;
    std::fs::write(output_dir.join("config.toml"), config_toml)
        .with_context(|| format!("cannot write {}", output_dir.join("config.toml").display()))?;
    Ok(())
}

/// The run's solver settings: the config's, with the learning rate scaled to the batch when
/// `solver.scale_lr_to_batch` asks for it; the batch must split evenly over the accumulated micro-batches of the
/// `world_size` processes. Rank 0 (`main`) prints the scaling.
fn solver_config(config: &Config, world_size: usize, main: bool) -> anyhow::Result<SolverConfig> {
    let mut solver_config = config.solver.clone();
    if solver_config.scale_lr_to_batch {
        if let Some(scaling) = solver_config.scale_to_batch(solver_config.ims_per_batch) {
            if main {
                log::info!("{}", scaling.message);
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
    Ok(solver_config)
}

/// The model at the start of training (before a resume): built for the dataset's `num_classes` categories from
/// the experiment seed, initialised from `--init-weights` (or checked to train from scratch), its frozen backbone
/// stages frozen; cuDNN's benchmark mode set as configured.
fn initial_model(config: &Config, options: &TrainOptions, num_classes: usize) -> anyhow::Result<BuiltModel> {
    if options.device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(config.cudnn_benchmark);
    }
    tch::manual_seed(config.seed as i64);
    let BuiltModel { vs, model } = build_for_dataset(config, num_classes, options.device, &options.group)?;
    match &options.init_weights {
        Some(path) => {
            let missing = init_weights(&vs, path, WhichWeights::Model)?;
            if !missing.is_empty() && options.group.is_main() {
                log::warn!(
                    "{} has no values for {} variables (kept their initialisation)",
                    path.display(),
                    missing.len()
                );
            }
        }
        None => config.model.backbone.check_from_scratch()?,
    }
    backbone::freeze(&vs, "backbone.", model.backbone());
    Ok(BuiltModel { vs, model })
}

/// Restores the model and solver as `--resume` asks (nothing, the output folder's last valid checkpoint, or a
/// given one); returns the checkpoint read.
fn resume(
    options: &TrainOptions,
    checkpointer: &Checkpointer,
    vs: &nn::VarStore,
    solver: &mut Solver,
) -> anyhow::Result<Option<LoadedCheckpoint>> {
    // Every rank reads the checkpoint (the output folder must be shared between machines to resume).
    Ok(match &options.resume {
        Resume::No => None,
        Resume::Last => checkpointer.resume(vs, solver)?.map(|r| {
            for warning in r.warnings.iter().filter(|_| options.group.is_main()) {
                log::warn!("{warning}");
            }
            r.checkpoint
        }),
        Resume::From(path) => Some(resume_from(path, vs, solver)?),
    })
}

/// This rank's training sampler over `train_set` in micro-batches of `micro_batch` images, at the position of
/// the `resumed` checkpoint (iteration `start`) when there is one.
fn train_sampler(
    config: &Config,
    train_set: &CocoDataset,
    micro_batch: usize,
    group: &RankGroup,
    resumed: Option<&LoadedCheckpoint>,
    start: u64,
) -> anyhow::Result<TrainSampler> {
    let data_config = config.data.as_ref().expect("checked by load_split");
    let mut sampler = TrainSampler::new(
        train_set,
        micro_batch,
        group.rank(),
        group.world_size(),
        data_config.aspect_ratio_grouping,
        config.seed,
    )?;
    if let Some(checkpoint) = resumed {
        let state: SamplerState = serde_json::from_value(checkpoint.state.sampler.clone())
            .with_context(|| format!("checkpoint {}: sampler state", checkpoint.path.display()))?;
        sampler.restore(state);
        if group.is_main() {
            log::info!("resumed from {} at iteration {start}", checkpoint.path.display());
        }
    }
    Ok(sampler)
}
