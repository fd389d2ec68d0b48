//! `trainer eval` and `trainer predict` feed the model through the same input pipeline (`[input]`, `data::pixels`):
//! on the same images with the same weights they give the same detections, and `trainer eval` equals
//! `predict --json` followed by `coco-eval`. Shown for the from-scratch GN recipe (detectron2's resize style) and
//! for the torchvision preset (torchvision's resize style and its category-id labels, evaluated on a COCO
//! annotation file with 80 categories).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{coco_mini, stderr, temp_dir, trainer};
use serde_json::Value;
use tch::{nn, Device};
use trainer::config::Config;

/// The `[data]` and `[eval]` sections of both configs: coco-mini's validation split only (eval and predict need
/// no training split), no pictures.
fn validation_split() -> String {
    let mini = coco_mini();
    format!(
        r#"[data]
num_workers = 2
[data.val]
annotations = "{mini}/annotations/instances_val2017.json"
images = "{mini}/val2017"
[eval]
vis_images = 0
"#,
        mini = mini.display()
    )
}

/// A small from-scratch GN model for coco-mini's 80 categories, scoring every detection (random weights).
fn scratch_config(dir: &Path) -> String {
    let text = format!(
        r#"output_dir = "{out}"
device = "cpu"
{model}[input]
min_size_test = 160
max_size_test = 256
{validation}"#,
        out = dir.join("run").display(),
        model = common::tiny_model(80)
            .replace("[model.roi_heads]\n", "[model.roi_heads]\nscore_thresh_test = 0.0\ndetections_per_image = 20\n"),
        validation = validation_split(),
    );
    let path = dir.join("scratch.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The torchvision preset on coco-mini's validation split at a small size, scoring every detection.
fn torchvision_config(dir: &Path) -> String {
    let preset = common::repo_root().join("configs/torchvision_maskrcnn_r50_fpn.toml");
    let text = format!(
        r#"base = "{preset}"
output_dir = "{out}"
device = "cpu"
[model.roi_heads]
score_thresh_test = 0.0
detections_per_image = 20
[input]
min_size_test = 192
max_size_test = 320
{validation}"#,
        preset = preset.display(),
        out = dir.join("run").display(),
        validation = validation_split(),
    );
    let path = dir.join("torchvision.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Seeded random weights for the config's model, written as a safetensors file.
fn random_weights(config: &str, dir: &Path) -> String {
    let config = Config::load(Path::new(config), &[]).unwrap();
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = detector::MaskRcnn::new(&vs.root(), &config.model).unwrap();
    let path = dir.join("weights.safetensors");
    vs.save(&path).unwrap();
    path.to_str().unwrap().to_string()
}

fn run(args: &[&str]) -> String {
    let output = trainer(args);
    assert!(output.status.success(), "trainer {args:?} failed: {}", stderr(&output));
    String::from_utf8(output.stdout).unwrap()
}

/// COCO results grouped by image id, each image's detections in file order.
fn by_image(results: &Path) -> BTreeMap<u64, Vec<Value>> {
    let text = std::fs::read_to_string(results).unwrap();
    let mut grouped: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for detection in serde_json::from_str::<Vec<Value>>(&text).unwrap() {
        grouped.entry(detection["image_id"].as_u64().unwrap()).or_default().push(detection);
    }
    grouped
}

/// Runs `eval` and `predict` with the same weights on coco-mini's validation images and checks they agree, down
/// to the metrics `coco-eval` computes from predict's file. Returns the number of detections compared.
fn eval_equals_predict(config: &str, dir: &Path) -> usize {
    let weights = random_weights(config, dir);
    let metrics: BTreeMap<String, f64> =
        serde_json::from_str(run(&["eval", config, "--weights", &weights, "--json"]).trim()).unwrap();
    let predicted = dir.join("predicted.json");
    let images = coco_mini().join("val2017");
    let pictures = dir.join("pictures");
    run(&[
        "predict",
        config,
        "--weights",
        &weights,
        "--input",
        images.to_str().unwrap(),
        "--out",
        pictures.to_str().unwrap(),
        "--score-thresh",
        "0",
        "--json",
        predicted.to_str().unwrap(),
    ]);
    let evaluated = by_image(&dir.join("run/inference/coco_instances_results.json"));
    let predicted_by_image = by_image(&predicted);
    assert_eq!(evaluated.len(), 7, "every validation image has detections");
    assert_eq!(evaluated.keys().collect::<Vec<_>>(), predicted_by_image.keys().collect::<Vec<_>>());
    let mut compared = 0;
    for (image_id, ours) in &evaluated {
        let theirs = &predicted_by_image[image_id];
        assert_eq!(ours.len(), theirs.len(), "image {image_id}: detection count");
        for (a, b) in ours.iter().zip(theirs) {
            assert_eq!(a, b, "image {image_id}: eval and predict disagree");
            compared += 1;
        }
    }
    let gt = coco_mini().join("annotations/instances_val2017.json");
    for iou_type in ["bbox", "segm"] {
        let args = ["coco-eval", "--gt", gt.to_str().unwrap(), "--dt", predicted.to_str().unwrap()];
        let report = run(&[&args[..], &["--iou-type", iou_type, "--json"]].concat());
        let stats: Value = serde_json::from_str(report.trim()).unwrap();
        let ap = stats["stats"][0].as_f64().unwrap();
        assert_eq!(ap, metrics[&format!("{iou_type}/AP")], "{iou_type} AP of eval and of predict + coco-eval");
    }
    compared
}

#[test]
fn eval_and_predict_agree_for_the_scratch_gn_recipe() {
    let dir = temp_dir("eval-predict-scratch");
    let config = scratch_config(&dir);
    let compared = eval_equals_predict(&config, &dir);
    assert_eq!(compared, 7 * 20);
}

#[test]
fn eval_and_predict_agree_for_the_torchvision_preset_with_category_id_labels() {
    let dir = temp_dir("eval-predict-torchvision");
    let config = torchvision_config(&dir);
    let loaded = Config::load(Path::new(&config), &[]).unwrap();
    assert_eq!(loaded.input.resize_style, data::ResizeStyle::Torchvision);
    assert_eq!(loaded.model.roi_heads.num_classes, 90, "torchvision's 91-way layout against 80 COCO categories");
    // Detections of the 10 labels no COCO category has are left out by both.
    let compared = eval_equals_predict(&config, &dir);
    assert!(compared > 7 * 15, "{compared} detections");
    // Category ids are labels + 1, and every one is a COCO category of the annotation file.
    let gt: Value =
        serde_json::from_str(&std::fs::read_to_string(coco_mini().join("annotations/instances_val2017.json")).unwrap())
            .unwrap();
    let ids: Vec<u64> = gt["categories"].as_array().unwrap().iter().map(|c| c["id"].as_u64().unwrap()).collect();
    for detections in by_image(&dir.join("predicted.json")).values() {
        for detection in detections {
            assert!(ids.contains(&detection["category_id"].as_u64().unwrap()), "{detection}");
        }
    }
}
