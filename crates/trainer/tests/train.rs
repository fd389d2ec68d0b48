//! The training loop end to end on a tiny model and a tiny synthetic dataset: exact resume, Ctrl-C, NaN losses,
//! evaluation outputs and the errors users see.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{
    checkpoint_tensors, checkpoint_weights, coco_mini, metrics, metrics_lines, repo_root, stderr, temp_dir,
    tiny_config, trainer, wait_for,
};

#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let dir = temp_dir("resume");
    let config = tiny_config(&dir);
    let straight = dir.join("straight");
    let output = trainer(&["train", &config, "--output", straight.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    let resumed = dir.join("resumed");
    let output = trainer(&["train", &config, "--output", resumed.to_str().unwrap(), "--set", "solver.max_iter=3"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = trainer(&["train", &config, "--output", resumed.to_str().unwrap(), "--resume"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("resumed from"), "{}", stderr(&output));

    let a = checkpoint_weights(&straight.join("model_0000006"));
    let b = checkpoint_weights(&resumed.join("model_0000006"));
    assert_eq!(a.len(), b.len());
    for ((name_a, ta), (name_b, tb)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b);
        assert!(ta.equal(tb), "{name_a} differs after resume");
    }
    // The logged losses and learning rates of every iteration match too (timings naturally differ).
    let records = |p: &Path| -> Vec<serde_json::Value> {
        let mut records = metrics(p);
        for record in &mut records {
            for timing in ["time", "data_time", "images_per_second"] {
                record.as_object_mut().unwrap().remove(timing);
            }
        }
        records
    };
    assert_eq!(records(&straight).len(), 6);
    assert_eq!(records(&straight), records(&resumed));
}

/// With `solver.ema` on: the EMA resumes bit for bit, it differs from the weights, the training run's evaluation
/// (`eval.use_ema`) is `trainer eval --ema` of the same checkpoint (identical COCO results), and `--ema` on a
/// checkpoint without an EMA or on a bare weights file is a clear error.
#[test]
fn ema_resumes_exactly_and_is_what_eval_use_ema_and_eval_ema_evaluate() {
    let dir = temp_dir("ema");
    let config = tiny_config(&dir);
    let ema = [
        "--set",
        "solver.ema.enabled=true",
        "--set",
        "solver.ema.decay=0.9",
        "--set",
        "solver.ema.warmup=2",
        "--set",
        "model.roi_heads.score_thresh_test=0.0",
    ];
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", &config, "--output", out.to_str().unwrap()];
        args.extend(ema);
        args.extend(extra);
        let output = trainer(&args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        output
    };
    let straight = dir.join("straight");
    let output = run(&straight, &["--set", "eval.at_end=true", "--set", "eval.use_ema=true"]);
    assert!(stderr(&output).contains("evaluating the EMA"), "{}", stderr(&output));
    let resumed = dir.join("resumed");
    run(&resumed, &["--set", "solver.max_iter=3"]);
    run(&resumed, &["--resume"]);
    let last = |run: &Path| run.join("model_0000006");
    for file in ["model.safetensors", "ema.safetensors"] {
        let (a, b) = (checkpoint_tensors(&last(&straight), file), checkpoint_tensors(&last(&resumed), file));
        assert_eq!(a.len(), b.len());
        for ((name, ta), (_, tb)) in a.iter().zip(&b) {
            assert!(ta.equal(tb), "{file}: {name} differs after resume");
        }
    }
    let (weights, averages) =
        (checkpoint_weights(&last(&straight)), checkpoint_tensors(&last(&straight), "ema.safetensors"));
    assert!(weights.iter().zip(&averages).any(|((_, w), (_, a))| !w.equal(a)), "the EMA equals the weights");

    let evaluate = |name: &str, weights: &Path, extra: &[&str]| {
        let out = dir.join(name);
        let set_output = format!("output_dir={:?}", out.to_str().unwrap());
        let mut args = vec!["eval", &config, "--weights", weights.to_str().unwrap(), "--json", "--set", &set_output];
        args.extend(["--set", "model.roi_heads.score_thresh_test=0.0"]);
        args.extend(extra);
        let output = trainer(&args);
        (output.status.success(), stderr(&output), out.join("inference/coco_instances_results.json"))
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap();
    let trained = read(&straight.join("inference/coco_instances_results.json"));
    let (ok, err, with_ema) = evaluate("eval-ema", &last(&straight), &["--ema"]);
    assert!(ok, "{err}");
    assert!(trained.len() > 100, "the evaluation should have detections: {trained}");
    assert_eq!(read(&with_ema), trained, "eval --ema differs from the training run's eval.use_ema evaluation");
    let (ok, err, without) = evaluate("eval-model", &last(&straight), &[]);
    assert!(ok, "{err}");
    assert_ne!(read(&without), trained, "the model's own weights evaluate exactly as their EMA");

    let plain = dir.join("plain");
    let output = trainer(&["train", &config, "--output", plain.to_str().unwrap(), "--set", "solver.max_iter=2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (ok, err, _) = evaluate("eval-no-ema", &plain.join("model_0000002"), &["--ema"]);
    assert!(!ok && err.contains("model_0000002") && err.contains("no EMA weights"), "{err}");
    let bare = last(&straight).join("model.safetensors");
    let (ok, err, _) = evaluate("eval-bare", &bare, &["--ema"]);
    assert!(!ok && err.contains("--ema needs a checkpoint folder"), "{err}");
    let output =
        trainer(&["train", &config, "--output", dir.join("bad").to_str().unwrap(), "--set", "eval.use_ema=true"]);
    assert!(!output.status.success() && stderr(&output).contains("eval.use_ema"), "{}", stderr(&output));
}

#[test]
fn evaluation_writes_results_metrics_and_tensorboard_images() {
    let dir = temp_dir("eval");
    let config = tiny_config(&dir);
    let out = dir.join("run");
    let output = trainer(&[
        "train",
        &config,
        "--output",
        out.to_str().unwrap(),
        "--set",
        "solver.max_iter=2",
        "--set",
        "eval.at_end=true",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Evaluation results for segm:"), "{stdout}");
    assert!(stdout.contains(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] ="), "{stdout}");
    assert!(out.join("inference/coco_instances_results.json").is_file());
    let last = metrics(&out).pop().unwrap();
    assert!(last["segm/AP"].is_number() && last["bbox/AP50"].is_number(), "{last}");

    // Standalone evaluation of the saved checkpoint gives the same numbers.
    let output = trainer(&["eval", &config, "--weights", out.join("model_0000002").to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let standalone: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(standalone["segm/AP"], last["segm/AP"]);
    assert_eq!(standalone["bbox/AP"], last["bbox/AP"]);

    // predict draws one PNG per image and writes COCO results that coco-eval reads back.
    let pictures = dir.join("pictures");
    let results = dir.join("results.json");
    let output = trainer(&[
        "predict",
        &config,
        "--weights",
        out.join("model_0000002").to_str().unwrap(),
        "--input",
        dir.join("shapes/val").to_str().unwrap(),
        "--out",
        pictures.to_str().unwrap(),
        "--score-thresh",
        "0",
        "--json",
        results.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read_dir(&pictures).unwrap().count(), 4);
    let gt = dir.join("shapes/annotations/instances_val.json");
    let output = trainer(&["coco-eval", "--gt", gt.to_str().unwrap(), "--dt", results.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["stats"].as_array().unwrap().len(), 12);
}

#[test]
fn sigint_saves_a_checkpoint_and_exits_cleanly() {
    let dir = temp_dir("sigint");
    let config = tiny_config(&dir);
    let out = dir.join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["train", &config, "--output", out.to_str().unwrap(), "--set", "solver.max_iter=100000"])
        .args(["--set", "checkpoint.period=0"])
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("training to log 2 iterations", Duration::from_secs(240), || metrics_lines(&out) >= 2);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("interrupted: saved") && stdout.contains("continue with --resume"), "{stdout}");
    let pointer = std::fs::read_to_string(out.join("last_checkpoint")).unwrap();
    assert!(out.join(pointer.trim()).join("model.safetensors").is_file(), "{pointer}");
}

#[test]
fn a_non_finite_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint() {
    let dir = temp_dir("nan");
    let config = tiny_config(&dir);
    let out = dir.join("run");
    let output = trainer(&[
        "train",
        &config,
        "--output",
        out.to_str().unwrap(),
        "--set",
        "solver.base_lr=1e30",
        "--set",
        "solver.warmup_iters=0",
        "--set",
        "checkpoint.period=1",
        "--set",
        "solver.max_iter=50",
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    let error = message.trim().lines().last().unwrap();
    assert!(
        error.starts_with("error: iteration ") && error.contains("loss term") && error.contains("NaN"),
        "{message}"
    );
    assert!(error.contains("the last checkpoint is untouched"), "{message}");
    let pointer = std::fs::read_to_string(out.join("last_checkpoint")).unwrap();
    let output = trainer(&["eval", &config, "--weights", out.join(pointer.trim()).to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "the last good checkpoint must load: {}", stderr(&output));
}

#[test]
fn missing_dataset_and_scratch_freezing_are_clear_errors() {
    let dir = temp_dir("errors");
    let config = tiny_config(&dir);
    // Without the synthetic-data section and with a COCO path that does not exist.
    let text = std::fs::read_to_string(&config).unwrap();
    let start = text.find("[data.synth]").unwrap();
    let end = text.find("[data.train]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let missing = dir.join("no_coco.toml");
    std::fs::write(&missing, text).unwrap();
    let output = trainer(&[
        "train",
        missing.to_str().unwrap(),
        "--set",
        "data.train.annotations=\"datasets/coco/annotations/instances_train2017.json\"",
    ]);
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    assert!(message.contains("instances_train2017.json"), "{message}");
    assert!(message.contains("COCO 2017 is expected under datasets/coco/"), "{message}");

    let output = trainer(&["train", &config, "--set", "model.backbone.freeze_at=2"]);
    let message = stderr(&output);
    assert!(!output.status.success() && message.contains("from-scratch training"), "{message}");
}

/// Mixed precision on the CPU exercises the autocast code paths that CUDA training takes (half and bfloat16
/// activations through the FPN, RoIAlign's float32 computation, float32 losses, the fp16 loss scaler): both
/// dtypes train, their first losses differ from float32's (autocast was on) but stay close to them, and the fp16
/// run logs its loss scale.
#[test]
fn mixed_precision_trains_in_fp16_and_bf16() {
    let dir = temp_dir("amp");
    let config = tiny_config(&dir);
    let first_losses = |name: &str, amp: &[&str]| -> serde_json::Value {
        let out = dir.join(name);
        let mut args = vec!["train", &config, "--output", out.to_str().unwrap(), "--set", "solver.max_iter=3"];
        args.extend_from_slice(amp);
        let output = trainer(&args);
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let records = metrics(&out);
        assert_eq!(records.len(), 3, "{name}");
        assert!(records.iter().all(|r| r["total_loss"].as_f64().is_some_and(f64::is_finite)), "{name}: {records:?}");
        records[0].clone()
    };
    let float32 = first_losses("fp32", &[]);
    assert!(float32.get("loss_scale").is_none(), "{float32}");
    for dtype in ["fp16", "bf16"] {
        let dtype_key = format!("solver.amp.dtype=\"{dtype}\"");
        let mixed = first_losses(dtype, &["--set", "solver.amp.enabled=true", "--set", &dtype_key]);
        assert_eq!(mixed.get("loss_scale").is_some(), dtype == "fp16", "{dtype}: {mixed}");
        let (ours, reference) = (mixed["total_loss"].as_f64().unwrap(), float32["total_loss"].as_f64().unwrap());
        assert_ne!(ours, reference, "{dtype}: the loss is float32's exactly; autocast was not on");
        assert!((ours - reference).abs() < 0.05 * reference, "{dtype}: {ours} vs float32 {reference}");
    }
}

/// The CI smoke version of the coco-tiny overfit run (`configs/coco_tiny_overfit.toml`) on the repository's
/// coco-mini fixture instead of the user-supplied coco-tiny: real COCO images, 80 classes, crowd regions,
/// multi-part polygons and a single-channel JPEG go through training, checkpointing and COCO evaluation.
#[test]
fn coco_tiny_smoke_trains_and_evaluates_on_real_coco_data() {
    let dir = temp_dir("coco-tiny");
    let out = dir.join("run");
    let fixture = coco_mini();
    let annotations =
        format!("data.train.annotations={}", fixture.join("annotations/instances_train2017.json").display());
    let images = format!("data.train.images={}", fixture.join("train2017").display());
    // As in the config, evaluation runs on the training images (an overfit check).
    let val_annotations = annotations.replacen("data.train", "data.val", 1);
    let val_images = images.replacen("data.train", "data.val", 1);
    let output = trainer(&[
        "train",
        "configs/coco_tiny_overfit.toml",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
        "--set",
        &annotations,
        "--set",
        &images,
        "--set",
        &val_annotations,
        "--set",
        &val_images,
        "--set",
        "solver.max_iter=2",
        "--set",
        "solver.ims_per_batch=2",
        "--set",
        "eval.period=0",
        "--set",
        "input.min_size_train=[128]",
        "--set",
        "input.min_size_test=128",
        "--set",
        "input.max_size_test=192",
        "--set",
        "model.rpn.pre_nms_topk_test=200",
        "--set",
        "model.rpn.post_nms_topk_test=50",
        "--set",
        "model.roi_heads.detections_per_image=20",
        "--set",
        "eval.vis_images=1",
        "--set",
        "device=\"cpu\"",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let last = metrics(&out).pop().unwrap();
    assert!(last["bbox/AP"].is_number() && last["segm/AP"].is_number(), "{last}");
    assert!(out.join("model_0000002/model.safetensors").is_file());
}
