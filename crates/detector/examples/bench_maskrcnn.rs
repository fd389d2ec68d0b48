//! CPU benchmark of Mask R-CNN R-50-FPN (the torchvision preset): forward+backward time of a training step and
//! inference time per image, printed as JSON next to torchvision's `maskrcnn_resnet50_fpn` measured by
//! `bench_maskrcnn_torchvision.py` on identical synthetic inputs, with the same thread count.
//!
//! `cargo run -p detector --example bench_maskrcnn -- [THREADS] [ITERS] [HEIGHT] [WIDTH]` (defaults 2, 3, 800,
//! 1088; sides multiples of 32; needs the repository's `.venv`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use detector::structures::ImageBatch;
use detector::{DetectorConfig, GtInstances, GtMasks, MaskRcnn};
use tch::{nn, Device, Kind, Tensor};

/// Three rectangular instances per `height x width` image, as boxes, labels (1-based for torchvision) and bitmaps.
fn instances(height: i64, width: i64) -> (Tensor, Tensor, Tensor) {
    let (sx, sy) = (width as f32 / 1088.0, height as f32 / 800.0);
    let boxes = [[100.0f32, 120.0, 400.0, 500.0], [500.0, 200.0, 900.0, 700.0], [50.0, 600.0, 300.0, 780.0]]
        .map(|b| [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy].map(f32::round));
    let masks = Tensor::zeros([3, height, width], (Kind::Uint8, Device::Cpu));
    for (i, b) in boxes.iter().enumerate() {
        let _ = masks
            .get(i as i64)
            .narrow(0, b[1] as i64, (b[3] - b[1]) as i64)
            .narrow(1, b[0] as i64, (b[2] - b[0]) as i64)
            .fill_(1);
    }
    let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
    (Tensor::from_slice(&flat).view([3, 4]), Tensor::from_slice(&[1i64, 5, 17]), masks)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: i32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let iters: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let height: i64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(800);
    let width: i64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1088);
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let config = DetectorConfig::torchvision_maskrcnn_r50_fpn(90);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MaskRcnn::new(&vs.root(), &config).expect("build the model");
    backbone::freeze(&vs, "backbone.", model.backbone());

    let images = Tensor::randn([2, 3, height, width], (Kind::Float, Device::Cpu));
    let batch = ImageBatch { images: images.shallow_clone(), image_sizes: vec![(height, width); 2] };
    let (boxes, labels, masks) = instances(height, width);
    let targets: Vec<GtInstances> = (0..2)
        .map(|_| GtInstances {
            boxes: boxes.shallow_clone(),
            labels: &labels - 1,
            masks: GtMasks::Bitmaps(masks.shallow_clone()),
            sampling_seed: None,
        })
        .collect();
    let train_step = || {
        let losses = model.forward_train(&batch, &targets).expect("training forward");
        let total = losses.values().map(|l| l.shallow_clone()).reduce(|a, b| a + b).expect("five losses");
        total.backward();
    };
    let time = |f: &dyn Fn()| {
        f();
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        start.elapsed().as_secs_f64() / iters as f64
    };
    let ours_train = time(&train_step);
    let single = ImageBatch { images: images.narrow(0, 0, 1), image_sizes: vec![(height, width)] };
    let ours_infer = time(&|| {
        model.inference(&single, &[(height, width)]).expect("inference");
    });

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup", python.display());
    let input = std::env::temp_dir().join(format!("vovdet-bench-{}.safetensors", std::process::id()));
    Tensor::write_safetensors(
        &[("images", &images), ("boxes", &boxes), ("labels", &labels), ("masks", &masks)],
        &input,
    )
    .expect("write the benchmark inputs");
    let output = Command::new(python)
        .arg(root.join("crates/detector/examples/bench_maskrcnn_torchvision.py"))
        .arg(&input)
        .arg(threads.to_string())
        .arg(iters.to_string())
        .output()
        .expect("run the torchvision benchmark");
    let _ = std::fs::remove_file(&input);
    assert!(output.status.success(), "torchvision benchmark failed: {}", String::from_utf8_lossy(&output.stderr));
    let theirs = String::from_utf8_lossy(&output.stdout);
    println!(
        "{{\"threads\": {threads}, \"iters\": {iters}, \"size\": \"2x{height}x{width} train, 1x{height}x{width} infer\", \
         \"ours_train_step_s\": {ours_train:.3}, \"ours_inference_s_per_image\": {ours_infer:.3}, \"torchvision\": {}}}",
        theirs.trim()
    );
}
