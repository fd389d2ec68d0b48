//! Loader throughput (not a test): images/s for decode + shorter-side resize (detectron2 training sizes 640..800,
//! max 1333) + flip + target transforms + batching (normalise, pad to 32) on a COCO split.
//!
//! `cargo run --release -p data --example bench_loader -- [--workers N] [--batches B] [--batch-size S] [--root DIR]`
//! (train split of `--root`, a COCO layout with `annotations/instances_train2017.json` and `train2017/`; default: the
//! repository's 7-image fixture `tests/data/coco-mini`; `crates/data/README.md`'s numbers are on coco-tiny's 80).

use std::sync::Arc;
use std::time::Instant;

use data::config::{InputConfig, MissingImagePolicy};
use data::{CocoDataset, LoadOptions, Loader, LoaderOptions, TrainSampler};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let workers: usize = value("--workers").map_or(Ok(1), |v| v.parse())?;
    let batches: usize = value("--batches").map_or(Ok(80), |v| v.parse())?;
    let batch_size: usize = value("--batch-size").map_or(Ok(2), |v| v.parse())?;
    let root = value("--root").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/coco-mini"),
        std::path::PathBuf::from,
    );
    let dataset = Arc::new(CocoDataset::load(
        &root.join("annotations/instances_train2017.json"),
        &root.join("train2017"),
        LoadOptions::default(),
    )?);
    let input = InputConfig::default();
    let sampler = TrainSampler::new(&dataset, batch_size, 0, 1, true, 0)?;
    let options =
        LoaderOptions { num_workers: workers, prefetch: 2 * workers.max(1), missing_images: MissingImagePolicy::Error };
    let mut loader = Loader::train(dataset, input, sampler, options)?;
    // Warm-up: fill the prefetch queue and touch the files once.
    for batch in (&mut loader).take(workers.max(1) * 2) {
        batch?;
    }
    let start = Instant::now();
    let mut images = 0;
    for batch in (&mut loader).take(batches) {
        images += batch?.image_ids.len();
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("rust workers={workers} images={images} seconds={seconds:.2} images_per_s={:.1}", images as f64 / seconds);
    Ok(())
}
