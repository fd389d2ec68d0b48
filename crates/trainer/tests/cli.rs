//! The `trainer` binary end to end: info, convert, and the one-line errors users see.

use std::path::Path;
use std::process::Command;

mod common;

use common::{repo_root, stderr, temp_dir, trainer};

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn info_json_reports_params_gflops_and_feature_shapes() {
    let output = trainer(&["info", "--config", "configs/vovnet39_maskrcnn.toml", "--input", "224x224", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(info["params"]["backbone"], 25_184_128);
    let params = &info["params"];
    let parts: i64 = ["backbone", "fpn", "rpn", "roi_heads"].iter().map(|k| params[k].as_i64().unwrap()).sum();
    assert_eq!(params["total"].as_i64().unwrap(), parts);
    assert_eq!(info["features"]["stage2"], serde_json::json!([256, 56, 56]));
    assert_eq!(info["features"]["stage5"], serde_json::json!([1024, 7, 7]));
    // Counted by hand from the spec: every conv's k*k*cin/groups*cout*H*W summed over the network.
    let gflops = info["gflops_backbone"].as_f64().unwrap();
    assert!((gflops - 7.0748).abs() < 1e-3, "{gflops}");
    assert!(info["gflops"].as_f64().unwrap() > gflops);
}

#[test]
fn config_errors_are_one_line_and_name_the_key() {
    let dir = temp_dir("errors");
    let config = write_config(&dir, "[model.backbone]\nname = \"V-39\"\nfreez_at = 1\n");
    let output = trainer(&["info", "--config", &config]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("unknown key `model.backbone.freez_at`; did you mean `freeze_at`?"), "{message}");

    let output =
        trainer(&["info", "--config", "configs/vovnet39_maskrcnn.toml", "--set", "model.backbone.gn_groups=24"]);
    let message = stderr(&output);
    assert!(!output.status.success() && message.contains("not divisible by 24 groups"), "{message}");

    let output = trainer(&["info", "--config", "configs/vovnet39_maskrcnn.toml", "--input", "800by1344"]);
    assert!(stderr(&output).contains("--input: size `800by1344`"), "{}", stderr(&output));

    let output = trainer(&["info", "--config", "configs/vovnet39_maskrcnn.toml", "--device", "tpu"]);
    assert!(stderr(&output).contains("--device tpu: expected auto, cpu, cuda or cuda:N"), "{}", stderr(&output));

    let output = trainer(&["info", "--config", "configs/no_such.toml"]);
    assert!(stderr(&output).contains("cannot read config configs/no_such.toml"), "{}", stderr(&output));
}

#[test]
fn convert_imports_a_vovnet_detectron2_pth_through_the_script() {
    let dir = temp_dir("convert");
    let python = repo_root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup first", python.display());
    let pth = dir.join("vovnet.pth");
    let reference_dir = repo_root().join("crates/backbone/tests/python");
    let make_pth = format!(
        "import sys, torch; sys.path.insert(0, {reference_dir:?}); import reference as r; \
         m = r.VoVNet('V-19-slim-dw', True, 'GN', 16); \
         torch.save({{'model': {{'backbone.bottom_up.' + k: v for k, v in m.state_dict().items()}}}}, {pth:?})"
    );
    let status = Command::new(&python).args(["-c", &make_pth]).status().unwrap();
    assert!(status.success());
    let safetensors = dir.join("vovnet.safetensors");
    let status = Command::new(&python)
        .arg(repo_root().join("scripts/pth_to_safetensors.py"))
        .args([&pth, &safetensors])
        .status()
        .unwrap();
    assert!(status.success());
    let config = write_config(&dir, "[model.backbone]\nname = \"V-19-slim-dw\"\ngn_groups = 16\n");
    let converted = dir.join("ours.safetensors");
    let output = trainer(&[
        "convert",
        "--from",
        "vovnet-detectron2",
        "--config",
        &config,
        safetensors.to_str().unwrap(),
        converted.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let names = tch::Tensor::read_safetensors(&converted).unwrap();
    assert!(names.iter().any(|(n, _)| n == "backbone.stage3.0.reduce.conv.weight"));

    // The same file against a model with other widths fails and names the offending tensors.
    let wrong = write_config(&dir, "[model.backbone]\nname = \"V-19-dw\"\n");
    let output = trainer(&[
        "convert",
        "--from",
        "vovnet-detectron2",
        "--config",
        &wrong,
        safetensors.to_str().unwrap(),
        converted.to_str().unwrap(),
    ]);
    let message = stderr(&output);
    assert!(!output.status.success() && message.contains("wrong shape: "), "{message}");
}

#[test]
fn data_synth_and_data_check_on_synthetic_and_real_coco() {
    let dir = temp_dir("data");
    let shapes = dir.join("shapes");
    let output =
        trainer(&["data", "synth", "--out", shapes.to_str().unwrap(), "--train", "6", "--val", "3", "--size", "64"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(shapes.join("annotations/instances_train.json").is_file());

    let coco_tiny = repo_root().join("../shared/datasets/coco-tiny");
    let config = write_config(
        &dir,
        &format!(
            "[model.backbone]\nname = \"V-19\"\n[data.train]\nannotations = \"{0}/annotations/instances_train2017.json\"\n\
             images = \"{0}/train2017\"\n[data.val]\nannotations = \"{0}/annotations/instances_val2017.json\"\n\
             images = \"{0}/val2017\"\n",
            coco_tiny.display()
        ),
    );
    let output = trainer(&["data", "check", "--config", &config]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("80"), "{report}");

    // A missing image file is reported with its name, and the command fails.
    let broken = dir.join("broken");
    std::fs::create_dir_all(broken.join("train2017")).unwrap();
    let config = write_config(
        &dir,
        &format!(
            "[model.backbone]\nname = \"V-19\"\n[data.train]\nannotations = \"{0}/annotations/instances_train2017.json\"\n\
             images = \"{1}\"\n[data.val]\nannotations = \"{0}/annotations/instances_val2017.json\"\n\
             images = \"{0}/val2017\"\n",
            coco_tiny.display(),
            broken.join("train2017").display()
        ),
    );
    let output = trainer(&["data", "check", "--config", &config]);
    assert!(!output.status.success());
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains(".jpg"), "{report}");
    assert!(stderr(&output).contains("problem(s) found"), "{}", stderr(&output));
}

#[test]
fn every_shipped_config_loads_and_builds() {
    let mut count = 0;
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let output = trainer(&["info", "--config", path.to_str().unwrap(), "--input", "64x64", "--json"]);
            assert!(output.status.success(), "{}: {}", path.display(), stderr(&output));
            count += 1;
        }
    }
    assert!(count >= 9, "{count} configs");
}
