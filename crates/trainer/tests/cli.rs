//! The `trainer` binary end to end: info, convert, and the one-line errors users see.

use std::path::Path;
use std::process::Command;

mod common;

use common::{coco_mini, repo_root, stderr, temp_dir, tiny_config, trainer};

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

    // CUDA's sync debug mode on the CPU is refused before anything is written.
    let out = dir.join("sync-debug");
    let args = ["train", "configs/demo_shapes.toml", "--output", out.to_str().unwrap(), "--device", "cpu"];
    let output = trainer(&[&args[..], &["--set", "log.cuda_sync_debug=\"warn\""]].concat());
    let message = stderr(&output);
    assert!(
        !output.status.success() && message.contains("log.cuda_sync_debug = \"warn\" needs a CUDA device"),
        "{message}"
    );
    assert!(!out.exists(), "the refused run created {}", out.display());
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

    let coco_mini = coco_mini();
    let config = write_config(
        &dir,
        &format!(
            "[model.backbone]\nname = \"V-19\"\n[data.train]\nannotations = \"{0}/annotations/instances_train2017.json\"\n\
             images = \"{0}/train2017\"\n[data.val]\nannotations = \"{0}/annotations/instances_val2017.json\"\n\
             images = \"{0}/val2017\"\n",
            coco_mini.display()
        ),
    );
    let output = trainer(&["data", "check", "--config", &config]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = String::from_utf8_lossy(&output.stdout);
    // The fixture's JSON (tests/data/coco-mini/PROVENANCE.md): train 84 annotations of which 1 crowd, val 147 of
    // which 4 crowd; no box is empty.
    for line in [
        "[train] images: 7  instances: 83  crowd: 1  dropped empty boxes: 0  skipped missing images: 0",
        "[val] images: 7  instances: 143  crowd: 4  dropped empty boxes: 0  skipped missing images: 0",
    ] {
        assert!(report.contains(line), "{line} not in\n{report}");
    }

    // A missing image file is reported with its name, and the command fails.
    let broken = dir.join("broken");
    std::fs::create_dir_all(broken.join("train2017")).unwrap();
    let config = write_config(
        &dir,
        &format!(
            "[model.backbone]\nname = \"V-19\"\n[data.train]\nannotations = \"{0}/annotations/instances_train2017.json\"\n\
             images = \"{1}\"\n[data.val]\nannotations = \"{0}/annotations/instances_val2017.json\"\n\
             images = \"{0}/val2017\"\n",
            coco_mini.display(),
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

/// Runs `trainer bench MODE` on the demo config with `extra` arguments and returns its JSON, checking the keys
/// every mode reports.
fn bench_json(mode: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["bench", mode, "--config", "configs/demo_shapes.toml", "--device", "cpu", "--json"];
    args.extend_from_slice(extra);
    let output = trainer(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["mode"], mode);
    assert_eq!(report["config"], "configs/demo_shapes.toml");
    assert_eq!(report["backbone"], "V-19-slim");
    assert_eq!(report["num_classes"], 4);
    assert_eq!(report["device"], "Cpu");
    assert_eq!(
        report["amp"],
        extra.iter().find_map(|a| a.strip_prefix("--amp=")).map_or(serde_json::Value::Null, |d| d.into())
    );
    assert_eq!(report["peak_memory_source"], "peak_rss");
    for key in ["seconds_per_iter", "images_per_second", "peak_memory_bytes", "threads", "batch", "iters"] {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("`{key}` missing or not a number in {report}"));
        assert!(value > 0.0 && value.is_finite(), "{key} = {value}");
    }
    report
}

#[test]
fn bench_train_reports_throughput_loss_and_memory_as_json() {
    // bfloat16 autocast on the CPU: the mixed-precision step that CUDA runs in fp16 or bf16.
    let report =
        bench_json("train", &["--size", "96x128", "--batch", "2", "--iters", "2", "--warmup", "1", "--amp=bf16"]);
    assert_eq!(report["size"], serde_json::json!([96, 128]));
    assert_eq!(report["batch"], 2);
    let loss = report["last_total_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    let seconds = report["seconds_per_iter"].as_f64().unwrap();
    let mean = report["mean_seconds_per_iter"].as_f64().unwrap();
    let images_per_second = report["images_per_second"].as_f64().unwrap();
    assert!((images_per_second - 2.0 / mean).abs() < 1e-6 * images_per_second, "{report}");
    assert!(seconds > 0.0 && seconds <= 2.0 * mean, "{report}");
    // Host syncs and copies of one step, counted on the CPU as a GPU would make them (issue: a step without
    // either). A ratchet: these are the counts of the current step; moving work to the device lowers them, and
    // nothing may raise them.
    let count = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("`{key}` missing in {report}"));
    let (syncs, sync_ops) = (count("host_syncs_per_iter"), count("synchronising_ops_per_iter"));
    let (transfers, blocking) = (count("transfers_per_iter"), count("blocking_transfers_per_iter"));
    println!(
        "one training step: {syncs} host syncs ({sync_ops} operators), {transfers} transfers ({blocking} blocking)"
    );
    assert!(sync_ops <= syncs && blocking <= transfers, "{report}");
    assert!(
        syncs <= 13 && transfers <= 17 && blocking <= 11,
        "a change added host syncs or transfers to the training step: {report}"
    );
}

/// With `[model.static_shapes]`, bitmap mask targets from the loader and fixed RoIAlign sampling, a training step
/// between reads makes no host sync and no blocking transfer (counted on the CPU as a GPU would make them): the
/// detector reads nothing, the solver's step is conditional on the device, and the losses stay there.
#[test]
fn bench_train_with_static_shapes_does_not_sync() {
    let report = bench_json(
        "train",
        &[
            "--size",
            "96x128",
            "--batch",
            "2",
            "--iters",
            "2",
            "--warmup",
            "2",
            "--set",
            "model.static_shapes.enabled=true",
            "--set",
            "input.mask_format=\"bitmask\"",
            "--set",
            "model.box_head.pooler_sampling_ratio=2",
            "--set",
            "model.mask_head.pooler_sampling_ratio=2",
        ],
    );
    let count = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("`{key}` missing in {report}"));
    assert_eq!(count("synchronising_ops_per_iter"), 0, "{report}");
    assert_eq!((count("host_syncs_per_iter"), count("blocking_transfers_per_iter")), (0, 0), "{report}");
    assert!(report["last_total_loss"].as_f64().unwrap().is_finite(), "{report}");
}

#[test]
fn bench_infer_reports_model_end_to_end_and_pasting_times_as_json() {
    let report = bench_json("infer", &["--size", "96x128", "--iters", "2", "--warmup", "1"]);
    assert_eq!(report["batch"], 1);
    // Score threshold 0: a randomly initialised model still returns detections_per_image (100) detections.
    assert_eq!(report["detections_per_image"], 100.0);
    for key in ["end_to_end_seconds_per_image", "paste_masks_seconds_per_image"] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {report}");
    }
    let output = trainer(&["bench", "infer", "configs/demo_shapes.toml", "--device", "cpu", "--batch", "2"]);
    assert!(stderr(&output).contains("bench infer measures batch 1"), "{}", stderr(&output));
    let output = trainer(&["bench", "train", "configs/demo_shapes.toml", "--device", "cpu", "--amp=fp32"]);
    assert!(stderr(&output).contains("invalid value 'fp32' for '--amp[=<DTYPE>]'"), "{}", stderr(&output));
}

#[test]
fn bench_data_reports_loader_throughput_as_json() {
    let dir = temp_dir("bench-data");
    let shapes = dir.join("shapes");
    let set = |key: &str, value: String| format!("{key}={value:?}");
    let overrides = [
        set("data.synth.out", shapes.display().to_string()),
        "data.synth.train=8".to_string(),
        "data.synth.val=2".to_string(),
        set("data.train.annotations", shapes.join("annotations/instances_train.json").display().to_string()),
        set("data.train.images", shapes.join("train").display().to_string()),
        set("data.val.annotations", shapes.join("annotations/instances_val.json").display().to_string()),
        set("data.val.images", shapes.join("val").display().to_string()),
    ];
    let mut args = vec!["--iters", "3", "--warmup", "1"];
    for value in &overrides {
        args.extend(["--set", value.as_str()]);
    }
    let report = bench_json("data", &args);
    assert_eq!(report["size"], serde_json::Value::Null);
    assert_eq!(report["num_workers"], 1);
}

/// `trainer train CONFIG > run.log 2>&1`, as nohup, SLURM and CI run it: without a terminal there is no progress
/// bar, and the file receives every periodic iteration line (detectron2's layout), the evaluation tables in full
/// and the final line.
#[test]
fn training_with_redirected_output_writes_the_whole_log_to_the_file() {
    let dir = temp_dir("redirect");
    let config = tiny_config(&dir);
    let log_path = dir.join("run.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["train", &config, "--set", "log.quiet=false", "--set", "log.period=2", "--set", "eval.at_end=true"])
        .current_dir(repo_root())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{text}");
    // 6 iterations logged every 2: iterations 2, 4 and 6.
    let iterations: Vec<&str> = text.lines().filter(|l| l.starts_with("eta: ")).collect();
    assert_eq!(iterations.len(), 3, "{text}");
    for (line, iteration) in iterations.iter().zip([2, 4, 6]) {
        assert!(line.contains(&format!("  iter: {iteration}  total_loss: ")), "{line}");
        for key in ["loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc", "lr", "time", "data_time"]
        {
            assert!(line.contains(&format!("  {key}: ")), "{key} missing from {line}");
        }
    }
    for iou_type in ["bbox", "segm"] {
        assert!(text.contains(&format!("Evaluation results for {iou_type}:")), "{text}");
    }
    let ap_lines = text.lines().filter(|l| l.starts_with(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all"));
    assert_eq!(ap_lines.count(), 2, "{text}");
    assert!(text.contains("| category ") && text.contains("| circle "), "per-class table missing: {text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("finished 6 iterations; outputs in "), "last line: {last}");
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "terminal control characters in the file: {text:?}");
}
