//! The `trainer` command line.

mod cli;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use trainer::bench::{
    bench_backbone, bench_data, bench_infer, bench_train, BenchDetails, BenchMode, BenchOptions, BenchReport,
};
use trainer::checkpoint::WhichWeights;
use trainer::convert::{convert, export};
use trainer::distributed::{join, launch, role, worker_device, LaunchArgs, RankGroup, Role};
use trainer::evaluate::evaluate_weights;
use trainer::info::{model_info, parse_size, render};
use trainer::model::load_model;
use trainer::placement::DdpBackend;
use trainer::predict::{predict, LabelNames, PredictOptions};
use trainer::train::{train, Resume, TrainOptions};

use cli::{Cli, Command, DataCommand};

/// One human-readable line for a benchmark result.
fn bench_summary(r: &BenchReport) -> String {
    let memory = r.peak_memory_bytes.map_or("n/a".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64));
    let size = r.size.map_or("config sizes".into(), |[h, w]| format!("{h}x{w}"));
    let head = format!(
        "{:?} {} batch {} {size} on {} ({} threads{}{}): {:.4} s/iter (median), {:.2} img/s, peak memory {memory}",
        r.mode,
        r.backbone,
        r.batch,
        r.device,
        r.threads,
        r.amp.map_or(String::new(), |dtype| format!(", AMP {dtype:?}")),
        if r.channels_last { ", channels-last" } else { "" },
        r.seconds_per_iter,
        r.images_per_second,
    );
    match &r.details {
        BenchDetails::Train { mean_seconds_per_iter, last_total_loss, .. } => {
            format!("{head}; mean {mean_seconds_per_iter:.4} s/iter, last loss {last_total_loss:.4}")
        }
        BenchDetails::Infer {
            end_to_end_seconds_per_image,
            paste_masks_seconds_per_image,
            detections_per_image,
            ..
        } => {
            format!(
                "{head}; end to end {end_to_end_seconds_per_image:.4} s/img, mask pasting \
                 {paste_masks_seconds_per_image:.4} s/img, {detections_per_image:.0} detections/img"
            )
        }
        BenchDetails::Data { num_workers } => format!("{head}; {num_workers} loader workers"),
        BenchDetails::Backbone { gflops, gflops_per_second, params, .. } => {
            format!("{head}; {gflops:.1} GFLOPs, {gflops_per_second:.1} GFLOP/s, {:.2}M params", *params as f64 / 1e6)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(mut args) => {
            if let Some(dir) = &args.output {
                args.common.overrides.push(format!("output_dir={:?}", dir.display().to_string()));
            }
            if args.lr_scale_to_batch {
                args.common.overrides.push("solver.scale_lr_to_batch=true".into());
            }
            if args.quiet {
                args.common.overrides.push("log.quiet=true".into());
            }
            let (config, device) = args.common.load()?;
            let Some((device, group)) = distributed_role(&args.launch, device, config.ddp.backend)? else {
                println!("all workers finished");
                return Ok(());
            };
            let resume = match args.resume {
                None => Resume::No,
                Some(None) => Resume::Last,
                Some(Some(path)) => Resume::From(path),
            };
            let main = group.is_main();
            let options = TrainOptions { resume, init_weights: args.init_weights, device, group };
            let outcome = train(&config, &options)?;
            if !main {
                return Ok(());
            }
            if outcome.interrupted {
                println!("stopped at iteration {}; continue with --resume", outcome.iteration);
            } else {
                println!("finished {} iterations; outputs in {}", outcome.iteration, config.output_dir.display());
            }
        }
        Command::Eval(args) => {
            let (config, device) = args.common.load()?;
            let Some((device, group)) = distributed_role(&args.launch, device, config.ddp.backend)? else {
                return Ok(());
            };
            let outcome =
                evaluate_weights(&config, &args.weights, WhichWeights::from_ema_flag(args.ema), device, &group)?;
            if !group.is_main() {
                return Ok(());
            }
            if args.json {
                println!("{}", serde_json::to_string(&outcome.metrics)?);
            } else {
                print!("{}", outcome.report);
            }
        }
        Command::Data(DataCommand::Check(args)) => {
            let (config, _) = args.common.load()?;
            let data = config.data.as_ref().context("the config has no [data] section")?;
            if let Some(synth) = &data.synth {
                data::synth::ensure(synth)?;
            }
            let report = data::check::check(data, args.decode, true);
            print!("{report}");
            anyhow::ensure!(report.problem_count() == 0, "{} problem(s) found", report.problem_count());
        }
        Command::Data(DataCommand::Synth(args)) => {
            let options =
                data::synth::SynthOptions { train: args.train, val: args.val, size: args.size, seed: args.seed };
            let summary = data::synth::generate(&args.out, &options)?;
            println!(
                "wrote {} train and {} val instances to {}",
                summary.instances.0,
                summary.instances.1,
                args.out.display()
            );
        }
        Command::Predict(args) => {
            let (config, device) = args.common.load()?;
            let model = load_model(
                &config,
                &args.weights,
                WhichWeights::from_ema_flag(args.ema),
                device,
                &RankGroup::single(),
            )?;
            let labels = LabelNames::for_config(&config)?;
            let options = PredictOptions {
                input: args.input,
                out: args.out.clone(),
                score_thresh: args.score_thresh,
                json: args.json,
            };
            let count = predict(&config, &model.model, &labels, &options, device)?;
            println!("{count} detections; pictures in {}", args.out.display());
        }
        Command::CocoEval(args) => {
            let iou_type = args.iou_type.parse().map_err(anyhow::Error::msg)?;
            println!("{}", trainer::coco_eval::coco_eval_report(&args.gt, &args.dt, iou_type, args.json)?);
        }
        Command::Info(args) => {
            let (config, device) = args.common.load()?;
            let input = parse_size(&args.input).context("--input")?;
            let info = model_info(&config, input, device)?;
            if args.json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                print!("{}", render(&info));
            }
        }
        Command::Convert(args) => {
            let (config, _) = args.common.load()?;
            match (args.from, args.to) {
                (_, Some(format)) => {
                    let count = export(&config, format, &args.input, &args.output)?;
                    println!("wrote {count} tensors with {format}'s names into {}", args.output.display());
                }
                (Some(format), None) => {
                    let report = convert(&config, format, &args.input, &args.output)?;
                    println!("converted {} tensors into {}", report.loaded, args.output.display());
                    if !report.ignored.is_empty() {
                        println!("ignored (no weights): {}", report.ignored.join(", "));
                    }
                }
                (None, None) => anyhow::bail!("convert needs --from FORMAT or --to FORMAT"),
            }
        }
        Command::Bench(args) => {
            let (config, device) = args.common.load()?;
            if let Some(threads) = args.threads {
                anyhow::ensure!(threads > 0, "--threads must be at least 1");
                tch::set_num_threads(threads);
            }
            let size = parse_size(&args.size).context("--size")?;
            let cuda = device.is_cuda();
            let default_batch = if matches!(args.mode, BenchMode::Train | BenchMode::Data) { 2 } else { 1 };
            let config_file = args.common.config_file.as_ref().or(args.common.config.as_ref());
            let options = BenchOptions {
                iters: args.iters.unwrap_or(if cuda { 100 } else { 10 }),
                warmup: args.warmup.unwrap_or(if cuda { 20 } else { 2 }),
                batch: args.batch.unwrap_or(default_batch),
                size,
                device,
                amp: args.amp,
                seed: args.seed,
                config_file: config_file.map(|p| p.display().to_string()).unwrap_or_default(),
            };
            let result = match args.mode {
                BenchMode::Train => bench_train(&config, &options)?,
                BenchMode::Infer => bench_infer(&config, &options)?,
                BenchMode::Data => bench_data(&config, &options)?,
                BenchMode::Backbone => bench_backbone(&config, &options)?,
            };
            if args.json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!("{}", bench_summary(&result));
            }
        }
    }
    Ok(())
}

/// Resolves the launch flags and environment: `None` after launching (and waiting for) worker processes,
/// otherwise the device and rank group this process runs with.
fn distributed_role(
    args: &LaunchArgs,
    device: tch::Device,
    backend: DdpBackend,
) -> anyhow::Result<Option<(tch::Device, RankGroup)>> {
    match role(args, backend)? {
        Role::Single => Ok(Some((device, RankGroup::single()))),
        Role::Launcher(plan) => launch(&plan).map(|()| None),
        Role::Worker(plan) => {
            let device = worker_device(&plan, device, backend)?;
            Ok(Some((device, join(&plan, device, backend)?)))
        }
    }
}

/// Subcommand names, so that `trainer CONFIG` can mean `trainer train CONFIG`.
const SUBCOMMANDS: [&str; 9] = ["train", "eval", "data", "coco-eval", "info", "bench", "convert", "help", "predict"];

/// glibc's malloc hands every freed block above its mmap threshold back to the kernel and page-faults a fresh one
/// in at the next allocation. libtorch's CPU tensors are such blocks and a training step allocates thousands, so
/// the step spent a third of its time in the kernel. Keeping freed memory in the heap instead measured 1.45x
/// faster on the CPU (R-50-FPN training step at 512x512: 3.2-3.3 s to 2.2 s; peak RSS +15%; `trainer bench
/// train`). Environment variables (`MALLOC_MMAP_THRESHOLD_`, ...) still override this, as glibc reads them first.
fn keep_freed_memory_in_the_heap() {
    let set_by_user = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    if set_by_user {
        return;
    }
    // SAFETY: mallopt only changes allocator tunables; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 512 << 20);
    }
}

/// Prints the library's `log` records (the trainer's and its crates') to standard error, as the trainer's own
/// messages have always looked: warnings as `warning: ...`, errors as `error: ...`, information as it is.
/// Debug and trace records are dropped.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        match record.level() {
            log::Level::Error => eprintln!("error: {}", record.args()),
            log::Level::Warn => eprintln!("warning: {}", record.args()),
            _ => eprintln!("{}", record.args()),
        }
    }

    fn flush(&self) {}
}

fn main() -> ExitCode {
    keep_freed_memory_in_the_heap();
    static LOGGER: StderrLogger = StderrLogger;
    // Only fails when a logger is already set, which nothing else in this process does.
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(first) = argv.get(1).and_then(|a| a.to_str()) {
        if !first.starts_with('-') && !SUBCOMMANDS.contains(&first) {
            argv.insert(1, "train".into());
        }
    }
    let cli = Cli::parse_from(argv);
    trainer::panics::install_quiet_hook();
    match trainer::panics::catch(|| run(cli)).and_then(|result| result) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", trainer::report::error_report(&err));
            ExitCode::FAILURE
        }
    }
}
