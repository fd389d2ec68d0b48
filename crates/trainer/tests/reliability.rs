//! The faults of issue 15 as the `trainer` binary meets them: damaged checkpoints wherever weights are loaded,
//! a full disk during a save, stale staging folders, skipped images, resuming into a changed or empty run, the
//! iteration numbering of the NaN error, absurd loader settings, and `data check` on a broken dataset. Every
//! test trains the tiny model of `common::tiny_config` on its own synthetic data.

mod common;

use std::path::Path;
use std::process::Command;

use common::{metrics, stderr, temp_dir, tiny_config, trainer};

/// Trains `config` for `iterations` into `out` and asserts success.
fn train(config: &str, out: &Path, iterations: u32) {
    let max_iter = format!("solver.max_iter={iterations}");
    let output = trainer(&["train", config, "--output", out.to_str().unwrap(), "--set", &max_iter]);
    assert!(output.status.success(), "{}", stderr(&output));
}

fn flip_a_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_flipped_byte_in_a_checkpoint_is_refused_by_eval_predict_and_init_weights() {
    let dir = temp_dir("checksums");
    let config = tiny_config(&dir);
    let out = dir.join("out");
    train(&config, &out, 1);
    let checkpoint = out.join("model_0000001");
    let bare = dir.join("bare.safetensors");
    std::fs::copy(checkpoint.join("model.safetensors"), &bare).unwrap();
    flip_a_byte(&checkpoint.join("model.safetensors"));
    let weights = checkpoint.to_str().unwrap();
    let val = dir.join("shapes/val");
    let pictures = dir.join("pictures");
    let init = dir.join("init");
    let commands: [Vec<&str>; 3] = [
        vec!["eval", &config, "--weights", weights],
        vec![
            "predict",
            &config,
            "--weights",
            weights,
            "--input",
            val.to_str().unwrap(),
            "--out",
            pictures.to_str().unwrap(),
        ],
        vec![
            "train",
            &config,
            "--init-weights",
            weights,
            "--output",
            init.to_str().unwrap(),
            "--set",
            "solver.max_iter=1",
        ],
    ];
    for args in commands {
        let output = trainer(&args);
        let message = stderr(&output);
        assert!(!output.status.success(), "{} accepted a corrupted checkpoint", args[0]);
        assert!(message.contains("model.safetensors") && message.contains("CRC32"), "{}: {message}", args[0]);
        assert!(!message.contains("panicked"), "{message}");
    }
    // A bare safetensors file has no manifest: used, with one note saying it cannot be checked.
    let output = trainer(&["eval", &config, "--weights", bare.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stderr(&output).matches("without a checkpoint manifest").count(), 1, "{}", stderr(&output));
}

#[test]
fn stale_staging_folders_are_removed_at_start_up_and_absurd_worker_counts_fail_cleanly() {
    let dir = temp_dir("staging");
    let config = tiny_config(&dir);
    let out = dir.join("out");
    train(&config, &out, 1);
    // What a save killed by a full disk leaves behind.
    let stale = out.join(".tmp-model_0000009");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 1 << 20]).unwrap();
    let output =
        trainer(&["train", &config, "--output", out.to_str().unwrap(), "--resume", "--set", "data.num_workers=20000"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains("data.num_workers = 20000"), "{message}");
    assert!(!message.contains("fatal runtime error") && !message.contains("panicked"), "{message}");
    assert!(!stale.exists(), "the stale staging folder survived the start of training");
}

/// Runs `script` in a private mount namespace (where `sh` may mount a tmpfs); `None` when this machine does not
/// allow one.
fn in_mount_namespace(script: &str) -> Option<std::process::Output> {
    let probe = Command::new("unshare").args(["--mount", "--map-root-user", "true"]).output().ok()?;
    if !probe.status.success() {
        return None;
    }
    Some(Command::new("unshare").args(["--mount", "--map-root-user", "sh", "-c", script]).output().unwrap())
}

#[test]
fn a_full_disk_during_a_save_is_reported_once_in_words_and_the_run_resumes() {
    let dir = temp_dir("disk-full");
    let config = tiny_config(&dir);
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let run = disk.join("run");
    // A checkpoint of the tiny model is 12.7 MiB: on 30 MiB with 6 MiB of other files the second save fails;
    // freeing those 6 MiB makes room for it again. The synthetic dataset is generated outside the small disk.
    let trainer_exe = env!("CARGO_BIN_EXE_trainer");
    let script = format!(
        "set -u; mount -t tmpfs -o size=30m tmpfs {disk} || {{ echo MOUNT_FAILED; exit 1; }}; \
         head -c 6291456 /dev/zero > {disk}/ballast; \
         {trainer_exe} train {config} --output {run} --set solver.max_iter=4 --set checkpoint.period=2 \
         --set checkpoint.keep_last=1 > {dir}/first.out 2> {dir}/first.err; echo first=$?; \
         ls -a {run} > {dir}/after-first; \
         rm {disk}/ballast; {trainer_exe} train {config} --output {run} --resume --set solver.max_iter=4 \
         --set checkpoint.period=2 --set checkpoint.keep_last=1 > {dir}/second.out 2> {dir}/second.err; \
         echo second=$?; \
         ls -a {run} > {dir}/after-second",
        disk = disk.display(),
        run = run.display(),
        dir = dir.display(),
    );
    let Some(output) = in_mount_namespace(&script) else {
        eprintln!("skipped: this machine allows no private mount namespace for a small tmpfs");
        return;
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("MOUNT_FAILED"), "mounting the tmpfs failed: {}", stderr(&output));
    let first = std::fs::read_to_string(dir.join("first.err")).unwrap();
    assert!(stdout.contains("first=1"), "{stdout}\n{first}");
    let error = first.lines().last().unwrap();
    assert!(error.contains("no space left on device") && error.contains("continue with --resume"), "{first}");
    assert_eq!(first.to_lowercase().matches("no space left on device").count(), 1, "{first}");
    assert!(!first.contains("IoError(") && !first.contains("Os {"), "debug formatting: {first}");
    let after_first = std::fs::read_to_string(dir.join("after-first")).unwrap();
    assert!(!after_first.contains(".tmp-"), "the failed save left its staging folder: {after_first}");
    let second = std::fs::read_to_string(dir.join("second.err")).unwrap();
    assert!(stdout.contains("second=0"), "{stdout}\n{second}");
    assert!(std::fs::read_to_string(dir.join("after-second")).unwrap().contains("model_0000004"));
}

#[test]
fn skipped_images_are_announced_at_start_and_counted_in_the_metrics() {
    let dir = temp_dir("skipped");
    let config = tiny_config(&dir);
    let shapes = dir.join("shapes");
    let synth = ["data", "synth", "--out", shapes.to_str().unwrap(), "--train", "8", "--val", "4", "--size", "64"];
    let output = trainer(&[&synth[..], &["--seed", "1"]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    std::fs::remove_file(shapes.join("train/000005.png")).unwrap();
    let out = dir.join("out");
    let output = trainer(&[
        "train",
        &config,
        "--output",
        out.to_str().unwrap(),
        "--set",
        "solver.max_iter=2",
        "--set",
        "data.missing_images=\"skip\"",
    ]);
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert_eq!(message.matches("skipping 1 training image(s)").count(), 1, "{message}");
    assert!(message.contains("000005.png (image id 5)"), "{message}");
    let records = metrics(&out);
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["skipped_images"] == 1), "{records:?}");
}

#[test]
fn resume_names_what_changed_and_says_when_there_is_nothing_to_resume() {
    let dir = temp_dir("resume-warnings");
    let config = tiny_config(&dir);
    let out = dir.join("out");
    train(&config, &out, 2);
    let resume = |extra: &[&str]| {
        let mut args = vec!["train", &config, "--output", out.to_str().unwrap(), "--resume"];
        args.extend_from_slice(extra);
        let output = trainer(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        stderr(&output)
    };
    let message = resume(&["--set", "seed=4", "--set", "solver.max_iter=3"]);
    assert!(message.contains("with seed = 4, the checkpoint's run had 3"), "{message}");
    assert!(!message.contains("different training data"), "{message}");

    // Another training set: a second synthetic dataset with more images.
    let other = dir.join("other");
    let synth = ["data", "synth", "--out", other.to_str().unwrap(), "--train", "10", "--val", "4", "--size", "64"];
    assert!(trainer(&synth).status.success());
    let annotations =
        format!("data.train.annotations=\"{}\"", other.join("annotations/instances_train.json").display());
    let images = format!("data.train.images=\"{}\"", other.join("train").display());
    let message = resume(&["--set", &annotations, "--set", &images, "--set", "solver.max_iter=4", "--set", "seed=4"]);
    assert!(message.contains("different training data") && message.contains("data.train.annotations was"), "{message}");

    // A folder without checkpoints, and one that does not exist (a typo).
    for (folder, expected) in [(dir.join("shapes"), "holds no checkpoint"), (dir.join("oput"), "does not exist")] {
        let output = trainer(&[
            "train",
            &config,
            "--output",
            folder.to_str().unwrap(),
            "--resume",
            "--set",
            "solver.max_iter=1",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
    }
}

#[test]
fn the_nan_error_numbers_iterations_as_the_log_does() {
    let dir = temp_dir("nan-numbering");
    let config = tiny_config(&dir);
    let out = dir.join("out");
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
        "solver.max_iter=50",
    ]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    // `iter 3/50  ...`, or detectron2's `eta: ...  iter: 3  ...`.
    let iteration_of = |line: &str| -> Option<u64> {
        let rest = line.strip_prefix("iter ").or_else(|| line.split("iter: ").nth(1))?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let logged: Vec<u64> = stdout.lines().filter_map(iteration_of).collect();
    let message = stderr(&output);
    let failed: u64 = message
        .split("iteration ")
        .find(|rest| rest.contains(": loss term") || rest.contains(": the gradient norm"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no iteration in the error: {message}"));
    assert_eq!(failed, logged.last().copied().unwrap_or(0) + 1, "log:\n{stdout}\nerror: {message}");
}

#[test]
fn data_check_reports_every_problem_of_a_broken_dataset_in_one_run() {
    let dir = temp_dir("data-check");
    let config = tiny_config(&dir);
    let shapes = dir.join("shapes");
    let synth = ["data", "synth", "--out", shapes.to_str().unwrap(), "--train", "8", "--val", "4", "--size", "64"];
    assert!(trainer(&[&synth[..], &["--seed", "1"]].concat()).status.success());
    // One odd-length polygon, one absurd box, one missing image and one truncated image in train.
    let json_path = shapes.join("annotations/instances_train.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let annotations = json["annotations"].as_array_mut().unwrap();
    annotations[0]["segmentation"][0].as_array_mut().unwrap().pop();
    annotations[1]["bbox"][0] = serde_json::json!(1e30);
    let (odd, huge) = (annotations[0]["id"].clone(), annotations[1]["id"].clone());
    std::fs::write(&json_path, json.to_string()).unwrap();
    std::fs::remove_file(shapes.join("train/000007.png")).unwrap();
    let truncated = shapes.join("train/000008.png");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    let output = trainer(&["data", "check", &config, "--decode"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("4 problem(s) found"), "{}\n{stdout}", stderr(&output));
    assert!(stdout.contains(&format!("annotation id {odd}: polygon part 0 has an odd number")), "{stdout}");
    assert!(stdout.contains(&format!("annotation id {huge}: bbox [1e30")), "{stdout}");
    assert!(stdout.contains("000007.png: image id 7: image file is missing"), "{stdout}");
    assert!(stdout.contains("000008.png: image id 8: cannot decode image"), "{stdout}");
}
