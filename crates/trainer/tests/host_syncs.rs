//! Host syncs of training runs, counted on the CPU as a GPU would see them (`log.sync_counts`): with the
//! GPU-shaped step (`[model.static_shapes]`, loader-made bitmap masks, a fixed RoIAlign sampling ratio, batches
//! padded to size buckets), the steps between reads of both presets (V-57 GN and torchvision's R-50-FPN with
//! trainable BN) make no host sync and no blocking transfer; the step of a log line makes one read.

use std::path::Path;

mod common;

use common::{metrics, repo_root, shapes_data, stderr, temp_dir, trainer};

/// A 6-step run of `preset` on 8 synthetic 64-pixel images with the GPU-shaped step and per-step sync counts,
/// one log line (and one checkpoint) at the end, with fewer proposals and RoIs than COCO's (the same operators on
/// smaller tensors); `backbone` and `roi_heads` are added to those sections (TOML).
fn gpu_shaped_config(dir: &Path, preset: &str, backbone: &str, roi_heads: &str) -> String {
    let text = format!(
        r#"base = "{base}"
output_dir = "{out}"
seed = 3
device = "cpu"
{data}[input]
min_size_train = [64]
max_size_train = 128
min_size_test = 64
max_size_test = 128
mask_format = "bitmask"
train_pad_buckets = [[64, 128], [128, 64]]
[model.static_shapes]
enabled = true
[model.backbone]
{backbone}
[model.rpn]
pre_nms_topk_train = 200
post_nms_topk_train = 100
batch_size_per_image = 64
[model.roi_heads]
num_classes = 4
batch_size_per_image = 32
{roi_heads}
[model.box_head]
pooler_sampling_ratio = 2
[model.mask_head]
pooler_sampling_ratio = 2
[solver]
max_iter = 6
ims_per_batch = 2
base_lr = 0.01
steps = [4]
warmup_iters = 2
[checkpoint]
period = 0
[eval]
at_end = false
[log]
period = 6
quiet = true
sync_counts = true
"#,
        base = repo_root().join("configs").join(preset).display(),
        out = dir.join("out").display(),
        data = shapes_data(dir),
    );
    let path = dir.join("gpu_shaped.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Trains `preset` as [`gpu_shaped_config`] says and checks the per-step counts of the one log line.
fn steps_between_reads_do_not_sync(preset: &str, backbone: &str, roi_heads: &str) {
    let dir = temp_dir("host-syncs");
    let config = gpu_shaped_config(&dir, preset, backbone, roi_heads);
    let output = trainer(&["train", &config]);
    assert!(output.status.success(), "{preset}: {}", stderr(&output));
    let records = metrics(&dir.join("out"));
    let line = records.iter().find(|r| r["iteration"] == 6).unwrap_or_else(|| panic!("no line at 6: {records:?}"));
    let per_step = |key: &str| -> Vec<u64> {
        line[key]
            .as_array()
            .unwrap_or_else(|| panic!("{preset}: `{key}` missing in {line}"))
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let (syncs, blocking) = (per_step("host_syncs"), per_step("blocking_transfers"));
    assert_eq!(syncs.len(), 6, "{preset}: one count per step: {line}");
    assert_eq!(&syncs[2..5], [0, 0, 0], "{preset}: host syncs of steps 3..5: {line}");
    assert_eq!(&blocking[2..5], [0, 0, 0], "{preset}: blocking transfers of steps 3..5: {line}");
    assert_eq!(per_step("synchronising_ops")[2..5], [0, 0, 0], "{preset}: {line}");
    // The log line's step reads the steps' values once.
    assert_eq!((syncs[5], blocking[5]), (1, 1), "{preset}: the reading step: {line}");
    assert!(line["total_loss"].as_f64().unwrap().is_finite(), "{line}");
}

#[test]
fn vovnet57_gn_steps_between_reads_make_no_host_sync() {
    steps_between_reads_do_not_sync("vovnet57_maskrcnn.toml", "", "");
}

#[test]
fn torchvision_r50_bn_steps_between_reads_make_no_host_sync() {
    // torchvision's inference preset made trainable from scratch: BatchNorm with batch statistics, nothing frozen,
    // contiguous labels for the synthetic categories.
    steps_between_reads_do_not_sync(
        "torchvision_maskrcnn_r50_fpn.toml",
        "norm = \"BN\"\nfreeze_at = 0",
        "class_layout = \"contiguous\"",
    );
}
