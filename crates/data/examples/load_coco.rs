//! Times loading and validating one COCO instances file (progress bar on a terminal):
//! `cargo run --release -p data --example load_coco -- ANNOTATIONS IMAGE_ROOT [--skip-missing]`.

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (annotations, root) = match (args.first(), args.get(1)) {
        (Some(a), Some(r)) => (a, r),
        _ => return Err("usage: load_coco ANNOTATIONS IMAGE_ROOT [--skip-missing]".into()),
    };
    let missing_images = if args.iter().any(|a| a == "--skip-missing") {
        data::MissingImagePolicy::Skip
    } else {
        data::MissingImagePolicy::Error
    };
    let start = Instant::now();
    let options = data::LoadOptions { missing_images, progress: true, ..Default::default() };
    let dataset = data::CocoDataset::load(annotations.as_ref(), root.as_ref(), options)?;
    let (per_class, crowd) = dataset.instance_counts();
    println!(
        "{} images ({} skipped as missing), {} instances, {} crowd, {} classes in {:.2} s",
        dataset.images.len(),
        dataset.stats.skipped_missing_images.len(),
        per_class.iter().sum::<usize>(),
        crowd,
        dataset.categories.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
