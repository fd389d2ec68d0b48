//! Start-up notices of a training run, each one line for stderr: a `--resume` that finds nothing to resume, what
//! differs between the checkpoint's run and this one, and training images skipped under
//! `data.missing_images = "skip"`. Nothing here stops a run; the errors that must are raised where they arise.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use data::coco::LoadStats;
use toml::Value;

use crate::checkpoint::{Checkpointer, LoadedCheckpoint};

/// Config keys that legitimately change between a run and its resumption (longer schedule, other logging,
/// evaluation or loader settings) and are therefore not reported.
const FREE_TO_CHANGE: [&str; 8] =
    ["output_dir", "device", "solver.max_iter", "log.", "eval.", "checkpoint.", "data.num_workers", "data.prefetch"];

/// For `--resume` without a path: a note when `output_dir` holds no checkpoint at all, so the run will start from
/// iteration 0 (a mistyped folder, or the wrong one). `None` when there is something to resume.
pub fn nothing_to_resume(output_dir: &Path, checkpointer: &Checkpointer) -> Option<String> {
    if !output_dir.exists() {
        return Some(format!(
            "--resume: {} does not exist (mistyped?); starting a new run there from iteration 0",
            output_dir.display()
        ));
    }
    match checkpointer.list() {
        Ok(found) if found.is_empty() => Some(format!(
            "--resume: {} holds no checkpoint (model_NNNNNNN folders); starting from iteration 0",
            output_dir.display()
        )),
        _ => None,
    }
}

/// Every `section.key = value` leaf of a TOML document, keyed by its dotted path.
fn leaves(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Table(table) => {
            for (key, value) in table {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                leaves(&path, value, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn config_leaves(text: &str) -> Option<BTreeMap<String, String>> {
    let value: Value = toml::from_str(text).ok()?;
    let mut out = BTreeMap::new();
    leaves("", &value, &mut out);
    Some(out)
}

/// What differs between the run that wrote `checkpoint` and this one (resolved config `config_toml`, training
/// data fingerprint `dataset_fingerprint`), one warning per difference: the training data, the seed and every
/// other config key except those that may change on a resume (`FREE_TO_CHANGE`).
pub fn resume_differences(checkpoint: &LoadedCheckpoint, config_toml: &str, dataset_fingerprint: &str) -> Vec<String> {
    let from = checkpoint.path.display();
    let mut warnings = Vec::new();
    let before = config_leaves(&checkpoint.config_toml).unwrap_or_default();
    let now = config_leaves(config_toml).unwrap_or_default();
    if checkpoint.manifest.dataset_fingerprint != dataset_fingerprint {
        let paths: Vec<String> = ["data.train.annotations", "data.train.images"]
            .iter()
            .filter(|key| before.get(**key) != now.get(**key))
            .map(|key| format!("{key} was {}, now {}", show(before.get(*key)), show(now.get(*key))))
            .collect();
        let detail = if paths.is_empty() {
            "same paths, but the files or the images they list changed".to_string()
        } else {
            paths.join("; ")
        };
        warnings.push(format!(
            "resuming from {from} with different training data (dataset fingerprint {}, now {dataset_fingerprint}: \
             {detail}); the sampler position no longer means the same images",
            checkpoint.manifest.dataset_fingerprint
        ));
    }
    let data_reported = !warnings.is_empty();
    let keys: BTreeSet<&String> = before.keys().chain(now.keys()).collect();
    for key in keys {
        let free = FREE_TO_CHANGE.iter().any(|p| if p.ends_with('.') { key.starts_with(p) } else { key == p });
        let already = data_reported && matches!(key.as_str(), "data.train.annotations" | "data.train.images");
        if free || already || before.get(key) == now.get(key) {
            continue;
        }
        let what = if key == "seed" {
            " (libtorch's random stream follows the new seed; the data order continues with the checkpoint's)"
        } else {
            ""
        };
        warnings.push(format!(
            "resuming from {from} with {key} = {}, the checkpoint's run had {}{what}",
            show(now.get(key)),
            show(before.get(key))
        ));
    }
    warnings
}

fn show(value: Option<&String>) -> String {
    value.map_or_else(|| "(unset)".to_string(), Clone::clone)
}

/// The start-up warning for training images dropped because their files are missing (`data.missing_images =
/// "skip"`), naming the count and the first few; `None` when nothing was skipped.
pub fn skipped_images(stats: &LoadStats) -> Option<String> {
    let skipped = &stats.skipped_missing_images;
    let (file, image_id) = skipped.first()?;
    Some(format!(
        "skipping {} training image(s) whose files are missing (data.missing_images = \"skip\"), e.g. {} (image id \
         {image_id}); images that fail to decode are skipped and counted as they come up; the running count is \
         logged as skipped_images",
        skipped.len(),
        file.display()
    ))
}
