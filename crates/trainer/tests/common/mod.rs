//! Helpers shared by the tests that run the `trainer` binary.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tch::Tensor;

/// The repository root (the binary runs there, so relative config paths resolve as for users).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The repository's real-COCO fixture, `<repo>/tests/data/coco-mini` (14 COCO 2017 images; see its PROVENANCE.md).
pub fn coco_mini() -> PathBuf {
    let path = repo_root().join("tests/data/coco-mini");
    assert!(path.is_dir(), "the coco-mini fixture is missing at {}", path.display());
    path
}

/// A fresh, empty temporary folder for one test; it is removed with everything in it when dropped, so the
/// suite leaves nothing behind in the system's temporary folder, even when a test fails.
pub struct TestDir(tempfile::TempDir);

impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        self.0.path()
    }
}

/// A fresh [`TestDir`] whose name starts with `tag`.
pub fn temp_dir(tag: &str) -> TestDir {
    TestDir(tempfile::Builder::new().prefix(&format!("vovdet-trainer-{tag}-")).tempdir().unwrap())
}

/// The model tensors of a checkpoint folder, sorted by name.
pub fn checkpoint_weights(checkpoint: &Path) -> Vec<(String, Tensor)> {
    checkpoint_tensors(checkpoint, "model.safetensors")
}

/// The tensors of one safetensors `file` of a checkpoint folder, sorted by name.
pub fn checkpoint_tensors(checkpoint: &Path, file: &str) -> Vec<(String, Tensor)> {
    let mut tensors = Tensor::read_safetensors(checkpoint.join(file)).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// Every record of a run folder's `metrics.jsonl`, in order.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// Lines of a run folder's `metrics.jsonl` so far (0 before it exists), for polling a running trainer.
pub fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

/// Polls `done` every 100 ms; fails the test naming `what` when `limit` passes first.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `trainer` with `args` from the repository root.
pub fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).current_dir(repo_root()).output().unwrap()
}

/// The standard error of a finished command, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The `[model]` sections of a tiny V-19-slim-dw GN Mask R-CNN with `num_classes` classes.
pub fn tiny_model(num_classes: usize) -> String {
    format!(
        r#"[model.backbone]
name = "V-19-slim-dw"
gn_groups = 16
[model.fpn]
out_channels = 32
gn_groups = 8
[model.anchors]
sizes = [[8.0], [16.0], [32.0], [64.0], [128.0]]
[model.rpn]
pre_nms_topk_train = 200
post_nms_topk_train = 100
pre_nms_topk_test = 100
post_nms_topk_test = 50
batch_size_per_image = 64
[model.roi_heads]
num_classes = {num_classes}
batch_size_per_image = 32
[model.box_head]
conv_dim = 32
fc_dim = 64
gn_groups = 8
[model.mask_head]
conv_dim = 32
gn_groups = 8
"#
    )
}

/// The `[data]` sections of 8 training and 4 validation synthetic 64-pixel images, generated on first use into
/// `dir/shapes`.
pub fn shapes_data(dir: &Path) -> String {
    let shapes = dir.join("shapes");
    format!(
        r#"[data]
num_workers = 2
prefetch = 2
[data.synth]
out = "{shapes}"
train = 8
val = 4
size = 64
seed = 1
[data.train]
annotations = "{shapes}/annotations/instances_train.json"
images = "{shapes}/train"
[data.val]
annotations = "{shapes}/annotations/instances_val.json"
images = "{shapes}/val"
"#,
        shapes = shapes.display()
    )
}

/// A tiny V-19-slim-dw Mask R-CNN on 8 synthetic 64-pixel images (generated on first use into `dir/shapes`).
pub fn tiny_config(dir: &Path) -> String {
    let text = format!(
        r#"output_dir = "{out}"
seed = 3
device = "cpu"
{model}{data}[input]
min_size_train = [56, 64, 72]
max_size_train = 128
min_size_test = 64
max_size_test = 128
[solver]
max_iter = 6
ims_per_batch = 2
base_lr = 0.01
steps = [4]
warmup_iters = 2
[checkpoint]
period = 2
keep_last = 10
[eval]
at_end = false
vis_images = 2
[log]
period = 1
quiet = true
"#,
        model = tiny_model(4),
        data = shapes_data(dir),
        out = dir.join("out").display(),
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}
