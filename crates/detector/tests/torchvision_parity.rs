//! Whole-model parity with torchvision: `maskrcnn_resnet50_fpn` (v1) with seeded random weights, built and run by
//! `tests/python/torchvision_maskrcnn.py` in the repository's `.venv`, its state dict imported into our model
//! configured by `DetectorConfig::torchvision_maskrcnn_r50_fpn`, both run on real COCO images of the coco-mini fixture.

mod common;

use std::path::PathBuf;
use std::process::Command;

use data::pixels::{pad, prepare_test};
use data::transform::RgbImage;
use data::InputConfig;
use detector::torchvision::import_torchvision;
use detector::{DetectorConfig, ImageBatch, MaskRcnn};
use tch::{nn, Device, Kind, Tensor};

/// torchvision's `num_classes` (background included): two foreground classes keep the scores above 0.05.
const TORCHVISION_CLASSES: i64 = 3;

fn python() -> PathBuf {
    let python = common::repo_root().join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup to create the Python test oracles", python.display());
    python
}

/// A fresh temporary folder, removed with its files when the guard drops (also when the test fails).
fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("vovdet-{name}-")).tempdir().unwrap()
}

fn read(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())).into_iter().collect()
}

#[test]
fn matches_torchvision_maskrcnn_resnet50_fpn() {
    let files = ["000000005001.jpg", "000000010764.jpg"];
    let dir = scratch_dir("tv-parity");
    let mut command = Command::new(python());
    command.arg(common::repo_root().join("crates/detector/tests/python/torchvision_maskrcnn.py"));
    command.arg(dir.path()).arg(TORCHVISION_CLASSES.to_string());
    for file in files {
        command.arg(common::coco_mini().join("val2017").join(file));
    }
    let output = command.output().expect("run the torchvision oracle");
    assert!(output.status.success(), "oracle failed: {}", String::from_utf8_lossy(&output.stderr));

    tch::set_num_threads(2);
    let config = DetectorConfig::torchvision_maskrcnn_r50_fpn(TORCHVISION_CLASSES - 1);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MaskRcnn::new(&vs.root(), &config).unwrap();
    let report = import_torchvision(&vs, &dir.path().join("weights.safetensors")).unwrap();
    assert!(report.loaded > 300, "{report:?}");

    let inputs = read(&dir.path().join("inputs.safetensors"));
    let expected = read(&dir.path().join("outputs.safetensors"));
    // The oracle's images are torchvision's `to_tensor` of PIL's decoding (bytes / 255), which gives the bytes
    // back exactly; from them on, the images go through our one input pipeline (the one evaluation and
    // `trainer predict` use) in torchvision's style: normalise, resize, pad.
    let input = InputConfig::torchvision();
    let mut prepared = Vec::new();
    let mut original_sizes = Vec::new();
    for i in 0..files.len() {
        let image = &inputs[&format!("image{i}")];
        let (height, width) = (image.size()[1], image.size()[2]);
        let bytes = (image * 255.0).round().to_kind(Kind::Uint8).permute([1, 2, 0]).contiguous().flatten(0, -1);
        let rgb = RgbImage { width: width as u32, height: height as u32, data: Vec::<u8>::try_from(&bytes).unwrap() };
        original_sizes.push((height, width));
        prepared.push(prepare_test(&rgb, &input).unwrap().0);
    }
    let (images, image_sizes) = pad(&prepared, input.size_divisibility);
    let batch = ImageBatch { images, image_sizes };
    let start = std::time::Instant::now();
    let detections = model.inference(&batch, &original_sizes).unwrap();
    eprintln!(
        "ours: {:.2} s for {} images (2 threads); {}",
        start.elapsed().as_secs_f64(),
        files.len(),
        String::from_utf8_lossy(&output.stdout).trim()
    );

    common::assert_same_detections(&detections, &expected, 1, "torchvision");
}
