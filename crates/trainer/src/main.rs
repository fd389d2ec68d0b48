//! The `trainer` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use backbone::WeightFormat;
use clap::{Args, Parser, Subcommand};
use trainer::bench::{
    bench_backbone, bench_data, bench_infer, bench_train, BenchDetails, BenchMode, BenchOptions, BenchReport,
};
use trainer::checkpoint::WhichWeights;
use trainer::config::Config;
use trainer::convert::{convert, export};
use trainer::device::parse_device;
use trainer::distributed::{join, launch, role, worker_device, LaunchArgs, RankGroup, Role};
use trainer::evaluate::evaluate_weights;
use trainer::info::{model_info, parse_size, render};
use trainer::model::load_model;
use trainer::placement::DdpBackend;
use trainer::predict::{predict, LabelNames, PredictOptions};
use trainer::solver::AmpDtype;
use trainer::train::{train, Resume, TrainOptions};

/// vovdet: Mask R-CNN with VoVNet backbones, trained from scratch on libtorch.
#[derive(Parser)]
#[command(name = "trainer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train (the default: `trainer CONFIG` means `trainer train CONFIG`), evaluating and checkpointing as configured.
    Train(TrainArgs),
    /// Evaluate weights on the validation split (COCO bbox and segm).
    Eval(EvalArgs),
    /// Dataset tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Evaluate a COCO results file against ground truth (pycocotools-exact).
    CocoEval(CocoEvalArgs),
    /// Run a model on images: PNGs with boxes, names, scores and masks drawn, and optional COCO results JSON.
    Predict(PredictArgs),
    /// Parameters per module, GFLOPs at an input size, and the backbone's output shapes.
    Info(InfoArgs),
    /// Speed benchmarks (detectron2 protocol: medians after a warm-up).
    Bench(BenchArgs),
    /// Rewrite a safetensors file from another framework's parameter names into ours, checking every name and shape.
    Convert(ConvertArgs),
}

#[derive(Args)]
struct ConvertArgs {
    /// Naming of the input file, converted to ours: detectron2 (detectron2's models, the VoVNet authors'
    /// vovnet-detectron2 and CenterMask2 backbones; `vovnet-detectron2` is accepted too), torchvision, or vovdet.
    #[arg(long = "from", value_name = "FORMAT", required_unless_present = "to", conflicts_with = "to")]
    from: Option<WeightFormat>,
    /// Writes our weights (a checkpoint folder or safetensors file) with another framework's names: detectron2.
    #[arg(long = "to", value_name = "FORMAT")]
    to: Option<WeightFormat>,
    /// Input weights (safetensors; convert a .pth or .pkl first with scripts/pth_to_safetensors.py).
    input: PathBuf,
    /// Output weights (safetensors).
    output: PathBuf,
    #[command(flatten)]
    common: ConfigArgs,
}

/// Options every command that reads a config shares.
#[derive(Args)]
struct ConfigArgs {
    /// Experiment file (TOML), given either positionally or with --config.
    #[arg(value_name = "CONFIG")]
    config_file: Option<PathBuf>,
    /// Experiment file (TOML).
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override a config value, e.g. `--set model.backbone.name=V-39` (repeatable; values are TOML literals).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// auto, cpu, cuda or cuda:N (default: the config's `device`, itself `auto` by default).
    #[arg(long)]
    device: Option<String>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<(Config, tch::Device)> {
        let path = match (&self.config_file, &self.config) {
            (Some(path), None) | (None, Some(path)) => path,
            (Some(_), Some(_)) => anyhow::bail!("give the config once: positionally or with --config"),
            (None, None) => anyhow::bail!("no config file: pass CONFIG or --config FILE"),
        };
        let config = Config::load(path, &self.overrides)?;
        let device = parse_device(self.device.as_deref().unwrap_or(&config.device))?;
        Ok((config, device))
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    common: ConfigArgs,
    /// Output folder (shorthand for --set output_dir=DIR).
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Resume from the last checkpoint in the output folder, or from the checkpoint folder given.
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// Initialise the model from these weights (checkpoint folder or .safetensors); not a resume.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    init_weights: Option<PathBuf>,
    /// Scale the LR linearly when the total batch differs from solver.ims_per_batch (shorthand for
    /// --set solver.scale_lr_to_batch=true).
    #[arg(long)]
    lr_scale_to_batch: bool,
    /// Plain log lines instead of a progress bar (shorthand for --set log.quiet=true).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    launch: LaunchArgs,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    common: ConfigArgs,
    /// Weights: a checkpoint folder or a .safetensors file.
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    /// Use the checkpoint's EMA weights (saved when solver.ema.enabled is on).
    #[arg(long)]
    ema: bool,
    /// Print one JSON object with every metric instead of the tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    launch: LaunchArgs,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Validate the configured datasets and summarise them, without training.
    Check(DataCheckArgs),
    /// Write the synthetic shapes dataset (COCO format).
    Synth(DataSynthArgs),
}

#[derive(Args)]
struct DataCheckArgs {
    #[command(flatten)]
    common: ConfigArgs,
    /// Decode every image instead of reading headers only.
    #[arg(long)]
    decode: bool,
}

#[derive(Args)]
struct DataSynthArgs {
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Training images.
    #[arg(long, default_value_t = 300)]
    train: usize,
    /// Validation images.
    #[arg(long, default_value_t = 50)]
    val: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 160)]
    size: u32,
    /// Seed (the same seed writes identical files).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    common: ConfigArgs,
    /// Weights: a checkpoint folder or a .safetensors file with vovdet names.
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    /// Use the checkpoint's EMA weights (saved when solver.ema.enabled is on).
    #[arg(long)]
    ema: bool,
    /// An image file or a folder of .jpg/.png files.
    #[arg(long, value_name = "IMAGE_OR_DIR")]
    input: PathBuf,
    /// Folder for the drawn PNGs.
    #[arg(long, value_name = "DIR", default_value = "predictions")]
    out: PathBuf,
    /// Minimum score drawn and written.
    #[arg(long, default_value_t = 0.5)]
    score_thresh: f64,
    /// Also write COCO results (bbox xywh, score, category_id, RLE segmentation) to this file.
    #[arg(long, value_name = "results.json")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct CocoEvalArgs {
    /// Ground-truth annotations (COCO instances JSON).
    #[arg(long, value_name = "GT.json")]
    gt: PathBuf,
    /// Detections (COCO results JSON).
    #[arg(long, value_name = "DT.json")]
    dt: PathBuf,
    /// bbox or segm.
    #[arg(long, default_value = "bbox", value_parser = ["bbox", "segm"])]
    iou_type: String,
    /// Print `{"iou_type": ..., "stats": [12 numbers]}`.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    common: ConfigArgs,
    /// Input size HxW for GFLOPs and feature shapes.
    #[arg(long, default_value = "800x1344")]
    input: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// What to measure.
    mode: BenchMode,
    #[command(flatten)]
    common: ConfigArgs,
    /// Timed iterations (default: 100 on CUDA, 10 on CPU).
    #[arg(long)]
    iters: Option<usize>,
    /// Untimed warm-up iterations (default: 20 on CUDA, 2 on CPU).
    #[arg(long)]
    warmup: Option<usize>,
    /// Images per iteration (default: 2 for train and data, 1 for infer and backbone; infer takes only 1).
    #[arg(long)]
    batch: Option<i64>,
    /// Input size HxW of the synthetic images (train, infer, backbone).
    #[arg(long, default_value = "800x1344")]
    size: String,
    /// Autocast: `--amp` is fp16 (with the solver's loss scaling for train), `--amp=bf16` bfloat16; on CUDA or CPU.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "fp16", value_name = "DTYPE")]
    amp: Option<AmpDtype>,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Seed of the synthetic inputs and the model initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

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
