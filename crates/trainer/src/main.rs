//! The `trainer` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use backbone::WeightFormat;
use clap::{Args, Parser, Subcommand, ValueEnum};
use trainer::bench::{bench_backbone, BenchOptions};
use trainer::config::Config;
use trainer::convert::convert;
use trainer::device::parse_device;
use trainer::info::{model_info, parse_size, render};

/// vovdet: Mask R-CNN with VoVNet backbones, trained from scratch on libtorch.
#[derive(Parser)]
#[command(name = "trainer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parameters per module, GFLOPs at an input size, and the backbone's output shapes.
    Info(InfoArgs),
    /// Speed benchmarks (detectron2 protocol: medians after a warm-up).
    Bench(BenchArgs),
    /// Rewrite a safetensors file from another framework's parameter names into ours, checking every name and shape.
    Convert(ConvertArgs),
}

#[derive(Args)]
struct ConvertArgs {
    /// Naming of the input file: vovnet-detectron2 (the authors' VoVNet code), torchvision, or vovdet.
    #[arg(long = "from", value_name = "FORMAT")]
    format: WeightFormat,
    /// Input weights (safetensors; convert a .pth first with scripts/pth_to_safetensors.py).
    input: PathBuf,
    /// Output weights with vovdet's names.
    output: PathBuf,
    #[command(flatten)]
    common: ConfigArgs,
}

/// Options every command that reads a config shares.
#[derive(Args)]
struct ConfigArgs {
    /// Experiment file (TOML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Override a config value, e.g. `--set model.backbone.name=V-39` (repeatable; values are TOML literals).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// auto, cpu, cuda or cuda:N (default: the config's `device`, itself `auto` by default).
    #[arg(long)]
    device: Option<String>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<(Config, tch::Device)> {
        let config = Config::load(&self.config, &self.overrides)?;
        let device = parse_device(self.device.as_deref().unwrap_or(&config.device))?;
        Ok((config, device))
    }
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

#[derive(Clone, Copy, ValueEnum)]
enum BenchMode {
    /// Forward latency, GFLOPs, GFLOP/s, parameters and peak memory of the backbone alone.
    Backbone,
}

#[derive(Args)]
struct BenchArgs {
    /// What to measure.
    mode: BenchMode,
    #[command(flatten)]
    common: ConfigArgs,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Images per iteration.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Input size HxW.
    #[arg(long, default_value = "800x1344")]
    size: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
            let report = convert(&config, args.format, &args.input, &args.output)?;
            println!("converted {} tensors into {}", report.loaded, args.output.display());
            if !report.ignored.is_empty() {
                println!("ignored (no weights): {}", report.ignored.join(", "));
            }
        }
        Command::Bench(args) => {
            let (config, device) = args.common.load()?;
            let size = parse_size(&args.size).context("--size")?;
            let options = BenchOptions { iters: args.iters, warmup: args.warmup, batch: args.batch, size, device };
            match args.mode {
                BenchMode::Backbone => {
                    let result = bench_backbone(&config, &options)?;
                    if args.json {
                        println!("{}", serde_json::to_string(&result)?);
                    } else {
                        println!(
                            "{} {}x{}x{}: {:.4} s/iter, {:.2} img/s, {:.1} GFLOPs, {:.1} GFLOP/s, {:.2}M params",
                            result.backbone,
                            result.input[0],
                            result.input[1],
                            result.input[2],
                            result.seconds_per_iter,
                            result.images_per_second,
                            result.gflops,
                            result.gflops_per_second,
                            result.params as f64 / 1e6
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
