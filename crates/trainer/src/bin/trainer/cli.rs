//! The `trainer` command line's subcommands, arguments and flags (clap).

use std::path::PathBuf;

use backbone::WeightFormat;
use clap::{Args, Parser, Subcommand};
use trainer::bench::BenchMode;
use trainer::config::Config;
use trainer::device::parse_device;
use trainer::distributed::LaunchArgs;
use trainer::solver::AmpDtype;

/// vovdet: Mask R-CNN with VoVNet backbones, trained from scratch on libtorch.
#[derive(Parser)]
#[command(name = "trainer", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) struct ConvertArgs {
    /// Naming of the input file, converted to ours: detectron2 (detectron2's models, the VoVNet authors'
    /// vovnet-detectron2 and CenterMask2 backbones; `vovnet-detectron2` is accepted too), torchvision, or vovdet.
    #[arg(long = "from", value_name = "FORMAT", required_unless_present = "to", conflicts_with = "to")]
    pub(crate) from: Option<WeightFormat>,
    /// Writes our weights (a checkpoint folder or safetensors file) with another framework's names: detectron2.
    #[arg(long = "to", value_name = "FORMAT")]
    pub(crate) to: Option<WeightFormat>,
    /// Input weights (safetensors; convert a .pth or .pkl first with scripts/pth_to_safetensors.py).
    pub(crate) input: PathBuf,
    /// Output weights (safetensors).
    pub(crate) output: PathBuf,
    #[command(flatten)]
    pub(crate) common: ConfigArgs,
}

/// Options every command that reads a config shares.
#[derive(Args)]
pub(crate) struct ConfigArgs {
    /// Experiment file (TOML), given either positionally or with --config.
    #[arg(value_name = "CONFIG")]
    pub(crate) config_file: Option<PathBuf>,
    /// Experiment file (TOML).
    #[arg(long = "config", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Override a config value, e.g. `--set model.backbone.name=V-39` (repeatable; values are TOML literals).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) overrides: Vec<String>,
    /// auto, cpu, cuda or cuda:N (default: the config's `device`, itself `auto` by default).
    #[arg(long)]
    pub(crate) device: Option<String>,
}

impl ConfigArgs {
    pub(crate) fn load(&self) -> anyhow::Result<(Config, tch::Device)> {
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
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub(crate) common: ConfigArgs,
    /// Output folder (shorthand for --set output_dir=DIR).
    #[arg(long, value_name = "DIR")]
    pub(crate) output: Option<PathBuf>,
    /// Resume from the last checkpoint in the output folder, or from the checkpoint folder given.
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    pub(crate) resume: Option<Option<PathBuf>>,
    /// Initialise the model from these weights (checkpoint folder or .safetensors); not a resume.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub(crate) init_weights: Option<PathBuf>,
    /// Scale the LR linearly when the total batch differs from solver.ims_per_batch (shorthand for
    /// --set solver.scale_lr_to_batch=true).
    #[arg(long)]
    pub(crate) lr_scale_to_batch: bool,
    /// Plain log lines instead of a progress bar (shorthand for --set log.quiet=true).
    #[arg(long)]
    pub(crate) quiet: bool,
    #[command(flatten)]
    pub(crate) launch: LaunchArgs,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) common: ConfigArgs,
    /// Weights: a checkpoint folder or a .safetensors file.
    #[arg(long, value_name = "FILE")]
    pub(crate) weights: PathBuf,
    /// Use the checkpoint's EMA weights (saved when solver.ema.enabled is on).
    #[arg(long)]
    pub(crate) ema: bool,
    /// Print one JSON object with every metric instead of the tables.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) launch: LaunchArgs,
}

#[derive(Subcommand)]
pub(crate) enum DataCommand {
    /// Validate the configured datasets and summarise them, without training.
    Check(DataCheckArgs),
    /// Write the synthetic shapes dataset (COCO format).
    Synth(DataSynthArgs),
}

#[derive(Args)]
pub(crate) struct DataCheckArgs {
    #[command(flatten)]
    pub(crate) common: ConfigArgs,
    /// Decode every image instead of reading headers only.
    #[arg(long)]
    pub(crate) decode: bool,
}

#[derive(Args)]
pub(crate) struct DataSynthArgs {
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Training images.
    #[arg(long, default_value_t = 300)]
    pub(crate) train: usize,
    /// Validation images.
    #[arg(long, default_value_t = 50)]
    pub(crate) val: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 160)]
    pub(crate) size: u32,
    /// Seed (the same seed writes identical files).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

#[derive(Args)]
pub(crate) struct PredictArgs {
    #[command(flatten)]
    pub(crate) common: ConfigArgs,
    /// Weights: a checkpoint folder or a .safetensors file with vovdet names.
    #[arg(long, value_name = "FILE")]
    pub(crate) weights: PathBuf,
    /// Use the checkpoint's EMA weights (saved when solver.ema.enabled is on).
    #[arg(long)]
    pub(crate) ema: bool,
    /// An image file or a folder of .jpg/.png files.
    #[arg(long, value_name = "IMAGE_OR_DIR")]
    pub(crate) input: PathBuf,
    /// Folder for the drawn PNGs.
    #[arg(long, value_name = "DIR", default_value = "predictions")]
    pub(crate) out: PathBuf,
    /// Minimum score drawn and written.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) score_thresh: f64,
    /// Also write COCO results (bbox xywh, score, category_id, RLE segmentation) to this file.
    #[arg(long, value_name = "results.json")]
    pub(crate) json: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct CocoEvalArgs {
    /// Ground-truth annotations (COCO instances JSON).
    #[arg(long, value_name = "GT.json")]
    pub(crate) gt: PathBuf,
    /// Detections (COCO results JSON).
    #[arg(long, value_name = "DT.json")]
    pub(crate) dt: PathBuf,
    /// bbox or segm.
    #[arg(long, default_value = "bbox", value_parser = ["bbox", "segm"])]
    pub(crate) iou_type: String,
    /// Print `{"iou_type": ..., "stats": [12 numbers]}`.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct InfoArgs {
    #[command(flatten)]
    pub(crate) common: ConfigArgs,
    /// Input size HxW for GFLOPs and feature shapes.
    #[arg(long, default_value = "800x1344")]
    pub(crate) input: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// What to measure.
    pub(crate) mode: BenchMode,
    #[command(flatten)]
    pub(crate) common: ConfigArgs,
    /// Timed iterations (default: 100 on CUDA, 10 on CPU).
    #[arg(long)]
    pub(crate) iters: Option<usize>,
    /// Untimed warm-up iterations (default: 20 on CUDA, 2 on CPU).
    #[arg(long)]
    pub(crate) warmup: Option<usize>,
    /// Images per iteration (default: 2 for train and data, 1 for infer and backbone; infer takes only 1).
    #[arg(long)]
    pub(crate) batch: Option<i64>,
    /// Input size HxW of the synthetic images (train, infer, backbone).
    #[arg(long, default_value = "800x1344")]
    pub(crate) size: String,
    /// Autocast: `--amp` is fp16 (with the solver's loss scaling for train), `--amp=bf16` bfloat16; on CUDA or CPU.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "fp16", value_name = "DTYPE")]
    pub(crate) amp: Option<AmpDtype>,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    pub(crate) threads: Option<i32>,
    /// Seed of the synthetic inputs and the model initialisation.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}
