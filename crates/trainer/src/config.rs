//! Experiment configuration: TOML files with typed sections, `base = "other.toml"` inheritance, typed
//! `--set section.key=value` overrides, unknown keys rejected with the key's path and the nearest valid name, and
//! the resolved config written back out as TOML.

use std::path::{Path, PathBuf};

use data::config::{DataConfig, InputConfig};
use detector::config::DetectorConfig;
use serde::{Deserialize, Serialize};
use toml::Value;

use crate::checkpoint::CheckpointConfig;
use crate::events::LogConfig;
use crate::gradients::DdpConfig;
use crate::solver::SolverConfig;

/// Errors in reading, merging, overriding or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The file is not valid TOML.
    #[error("config {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    /// `base` files that include each other.
    #[error("config {path}: `base` inheritance forms a cycle")]
    BaseCycle { path: String },
    /// A `--set` argument without `=` or with an empty key.
    #[error("--set {0}: expected section.key=value")]
    SetSyntax(String),
    /// A `--set` path that walks through a non-table value.
    #[error("--set {key}: `{parent}` is not a section")]
    SetPath { key: String, parent: String },
    /// An unknown key, with the closest valid name when one is close.
    #[error("{origin}: unknown key `{key}`{suggestion}")]
    UnknownKey { origin: String, key: String, suggestion: String },
    /// A value of the wrong type or out of range.
    #[error("{origin}: `{key}`: {message}")]
    Invalid { origin: String, key: String, message: String },
}

fn default_output_dir() -> PathBuf {
    PathBuf::from("output")
}
fn default_device() -> String {
    "auto".into()
}

/// The `[eval]` section: COCO evaluation on the validation split during and after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every this many iterations; 0 evaluates only at the end.
    pub period: u64,
    /// Evaluate when training finishes.
    pub at_end: bool,
    /// Evaluate on the first N validation images only (quick checks); absent means all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_images: Option<usize>,
    /// Validation images drawn with their predictions into TensorBoard at each evaluation.
    pub vis_images: usize,
    /// Evaluate the EMA of the weights instead of the weights themselves (needs `solver.ema.enabled`); the
    /// best checkpoint is then chosen by the EMA's metrics.
    pub use_ema: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { period: 0, at_end: true, max_images: None, vis_images: 4, use_ema: false }
    }
}

/// A whole experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Folder for checkpoints, logs and the resolved config.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// Seed of every random generator.
    #[serde(default)]
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// cuDNN benchmark mode on CUDA (detectron2's `CUDNN_BENCHMARK`): faster convolutions when input sizes
    /// repeat, a re-tuning pause for every new size otherwise. Off by default, as in detectron2.
    #[serde(default)]
    pub cudnn_benchmark: bool,
    /// Channels-last (NHWC) memory format for the 4-D weights and the input images in `train`, `eval` and
    /// `bench` (PyTorch's `model.to(memory_format=torch.channels_last)`): feature maps then stay NHWC through the
    /// network, which cuDNN's tensor-core convolutions prefer under fp16 autocast (oneDNN's CPU convolutions gain
    /// too). Same results up to float rounding; checkpoints are written in the standard layout. Off by default
    /// (detectron2's layout).
    #[serde(default)]
    pub channels_last: bool,
    /// The model (`[model]`, `[model.backbone]`, `[model.fpn]`, `[model.rpn]`, `[model.roi_heads]`, ...).
    pub model: DetectorConfig,
    /// Datasets (`data.train.*`, `data.val.*`); needed by train, eval and data check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataConfig>,
    /// How images become the network's input (resize, augmentation, normalisation, padding), in training,
    /// evaluation, `predict` and `bench` alike.
    #[serde(default)]
    pub input: InputConfig,
    /// Optimizer and schedule.
    #[serde(default)]
    pub solver: SolverConfig,
    /// Gradient averaging in multi-process training.
    #[serde(default)]
    pub ddp: DdpConfig,
    /// Checkpoint period, retention and best-model selection.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Evaluation schedule.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Console, metrics.jsonl and TensorBoard logging.
    #[serde(default)]
    pub log: LogConfig,
}

impl Config {
    /// Loads `path` (following `base` links), applies `overrides` (`section.key=value`, the value parsed as a TOML
    /// literal and otherwise taken as a string), and checks every key and type.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let mut value = load_with_bases(path, &mut Vec::new())?;
        for assignment in overrides {
            apply_override(&mut value, assignment)?;
        }
        let origin = if overrides.is_empty() {
            path.display().to_string()
        } else {
            format!("{} (with --set overrides)", path.display())
        };
        if value.get("model").and_then(|m| m.get("input")).is_some() {
            return Err(ConfigError::Invalid {
                origin,
                key: "model.input".into(),
                message: "[model.input] was merged into [input], the one description of the input that training, \
                          evaluation and predict share: move its keys there (format, value_range, pixel_mean, \
                          pixel_std, size_divisibility, min_size_test, max_size_test, resize_style) and delete it"
                    .into(),
            });
        }
        from_value(value, &origin)
    }

    /// The config as TOML, as written to `output_dir/config.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config always serialises to TOML")
    }
}

/// Reads a TOML file and merges it over its `base` chain (paths relative to the including file).
fn load_with_bases(path: &Path, seen: &mut Vec<PathBuf>) -> Result<Value, ConfigError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: display.clone(), source })?;
    let mut value: Value =
        toml::from_str(&text).map_err(|e| ConfigError::Syntax { path: display.clone(), message: e.to_string() })?;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if seen.contains(&canonical) {
        return Err(ConfigError::BaseCycle { path: display });
    }
    seen.push(canonical);
    let base = match value.as_table_mut().and_then(|t| t.remove("base")) {
        None => return Ok(value),
        Some(Value::String(base)) => base,
        Some(other) => {
            return Err(ConfigError::Invalid {
                origin: display,
                key: "base".into(),
                message: format!("expected a file path string, found {}", other.type_str()),
            })
        }
    };
    let base_path = path.parent().unwrap_or(Path::new(".")).join(base);
    let mut merged = load_with_bases(&base_path, seen)?;
    merge(&mut merged, value);
    Ok(merged)
}

/// Deep-merges `top` over `bottom`: tables merge key by key, anything else is replaced.
fn merge(bottom: &mut Value, top: Value) {
    match (bottom, top) {
        (Value::Table(bottom), Value::Table(top)) => {
            for (key, value) in top {
                match bottom.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        bottom.insert(key, value);
                    }
                }
            }
        }
        (bottom, top) => *bottom = top,
    }
}

/// Applies one `section.key=value` override.
fn apply_override(root: &mut Value, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| ConfigError::SetSyntax(assignment.into()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::SetSyntax(assignment.into()));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = root.as_table_mut().expect("a config file is a table");
    for (depth, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table.entry(part.to_string()).or_insert_with(|| Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::SetPath { key: key.into(), parent: parts[..=depth].join(".") })?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Deserialises a merged TOML value, turning serde's messages into errors that name the key path.
fn from_value<T: serde::de::DeserializeOwned>(value: Value, origin: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
            // serde_path_to_error's path already ends with the unknown field.
            let key = if path == "." || path.is_empty() { field.to_string() } else { path };
            let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            let nearest = valid
                .iter()
                .map(|v| (strsim::levenshtein(field, v), *v))
                .min()
                .filter(|(distance, v)| *distance <= (v.len().max(field.len()) / 2).max(2));
            let suggestion = match nearest {
                Some((_, v)) => format!("; did you mean `{v}`?"),
                None if !valid.is_empty() => format!("; valid keys here: {}", valid.join(", ")),
                None => String::new(),
            };
            ConfigError::UnknownKey { origin: origin.into(), key, suggestion }
        } else {
            ConfigError::Invalid { origin: origin.into(), key: path, message }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A temporary folder removed when the guard drops.
    fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("vovdet-config-{tag}-")).tempdir().unwrap()
    }

    #[test]
    fn an_old_model_input_section_is_refused_with_where_its_keys_went() {
        let dir = temp_dir("model-input");
        let path =
            write(dir.path(), "old.toml", "[model.backbone]\nname = \"V-39\"\n[model.input]\nformat = \"RGB\"\n");
        let error = Config::load(&path, &[]).unwrap_err().to_string();
        assert!(error.contains("old.toml") && error.contains("model.input") && error.contains("[input]"), "{error}");
        let set = ["model.input.min_size_test=640".to_string()];
        let error =
            Config::load(&write(dir.path(), "new.toml", "[model.backbone]\nname = \"V-39\"\n"), &set).unwrap_err();
        assert!(error.to_string().contains("--set") && error.to_string().contains("model.input"), "{error}");
    }

    #[test]
    fn absent_keys_take_each_sections_default() {
        assert_eq!(toml::from_str::<SolverConfig>("").unwrap(), SolverConfig::default());
        assert_eq!(toml::from_str::<CheckpointConfig>("").unwrap(), CheckpointConfig::default());
        assert_eq!(toml::from_str::<EvalConfig>("").unwrap(), EvalConfig::default());
        assert_eq!(toml::from_str::<LogConfig>("").unwrap(), LogConfig::default());
        // A partial section keeps the defaults of the keys it leaves out, nested sections included.
        let solver: SolverConfig = toml::from_str("base_lr = 0.01\n[amp]\nenabled = true\n").unwrap();
        let amp = crate::solver::AmpConfig { enabled: true, ..Default::default() };
        assert_eq!(solver, SolverConfig { base_lr: 0.01, amp, ..SolverConfig::default() });
        // `model` stays required.
        let missing = toml::from_str::<Config>("seed = 1").unwrap_err().to_string();
        assert!(missing.contains("model"), "{missing}");
    }

    #[test]
    fn base_inheritance_and_overrides_merge_deeply() {
        let guard = temp_dir("base");
        let dir = guard.path();
        write(dir, "base.toml", "seed = 3\n[model.backbone]\nname = \"V-39\"\ngn_groups = 16\n");
        let child = write(dir, "child.toml", "base = \"base.toml\"\n[model.backbone]\nname = \"V-57\"\n");
        let config = Config::load(&child, &["seed=7".into(), "output_dir=out/x".into()]).unwrap();
        assert_eq!(config.model.backbone.name, "V-57");
        assert_eq!(config.model.backbone.gn_groups, 16);
        assert_eq!(config.seed, 7);
        assert_eq!(config.output_dir, PathBuf::from("out/x"));
        let reparsed: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(reparsed, config);
    }

    #[test]
    fn unknown_keys_name_the_path_and_the_nearest_valid_key() {
        let guard = temp_dir("unknown");
        let dir = guard.path();
        let path = write(dir, "bad.toml", "[model.backbone]\nname = \"V-39\"\ngn_group = 16\n");
        let message = Config::load(&path, &[]).unwrap_err().to_string();
        assert!(message.contains("unknown key `model.backbone.gn_group`"), "{message}");
        assert!(message.contains("did you mean `gn_groups`?"), "{message}");
        let good = write(dir, "good.toml", "[model.backbone]\nname = \"V-39\"\n");
        let message = Config::load(&good, &["sed=1".into()]).unwrap_err().to_string();
        assert!(message.contains("unknown key `sed`; did you mean `seed`?"), "{message}");
    }

    #[test]
    fn typed_overrides_reject_wrong_types_with_the_key() {
        let guard = temp_dir("typed");
        let dir = guard.path();
        let path = write(dir, "c.toml", "[model.backbone]\nname = \"V-39\"\n");
        let message = Config::load(&path, &["seed=abc".into()]).unwrap_err().to_string();
        assert!(message.contains("`seed`") && message.contains("invalid type"), "{message}");
        assert!(matches!(Config::load(&path, &["seed".into()]), Err(ConfigError::SetSyntax(_))));
        let message = Config::load(&path, &["model.backbone.name.x=1".into()]).unwrap_err().to_string();
        assert!(message.contains("`model.backbone.name` is not a section"), "{message}");
        let message = Config::load(&path, &["seed.x=1".into()]).unwrap_err().to_string();
        assert!(message.contains("`seed`: invalid type: map"), "{message}");
    }

    #[test]
    fn base_cycles_and_missing_files_are_reported() {
        let guard = temp_dir("cycle");
        let dir = guard.path();
        let a = write(dir, "a.toml", "base = \"b.toml\"\n");
        write(dir, "b.toml", "base = \"a.toml\"\n");
        assert!(matches!(Config::load(&a, &[]), Err(ConfigError::BaseCycle { .. })));
        let message = Config::load(&dir.join("missing.toml"), &[]).unwrap_err().to_string();
        assert!(message.contains("missing.toml"), "{message}");
        let syntax = write(dir, "syntax.toml", "[model\n");
        let message = Config::load(&syntax, &[]).unwrap_err().to_string();
        assert!(message.contains("syntax.toml") && message.contains("not valid TOML"), "{message}");
    }
}
