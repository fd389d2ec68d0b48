//! Crash-safe checkpoints for exact resume.
//!
//! Layout: one folder per checkpoint in the output folder, named by completed optimizer steps,
//! `output_dir/model_{iteration:07}/` holding
//! - `model.safetensors`: the model weights;
//! - `solver.safetensors`: the momentum buffers;
//! - `ema.safetensors`, when `solver.ema` is on: the exponential moving average of the weights;
//! - `state.json`: iteration, solver scalars (scheduler position = iteration, fp16 loss scale), the sampler
//!   position and the RNG state (both opaque JSON from the caller);
//! - `config.toml`: the resolved config;
//! - `manifest.json`, written last: vovdet version, git commit, libtorch version, device, dataset fingerprint, and
//!   the size and CRC32 of every other file, so truncation or corruption is detected on load.
//!
//! A checkpoint is assembled in `output_dir/.tmp-model_{iteration:07}` (each file fsynced), then the folder is
//! renamed into place and the parent directory fsynced; the `last_checkpoint` pointer file (holding the folder
//! name) is replaced the same way. A crash at any point leaves at most a stale `.tmp-*` folder (removed when
//! training next starts, and by the next save), never a half-written checkpoint under a real name; a save that
//! fails (a full disk) removes its staging folder at once. Wherever a checkpoint folder is loaded (resume,
//! `--init-weights`, `eval`/`predict --weights`) its files are checked against the manifest (`manifest.rs`); the
//! write primitives live in `durable.rs`, and the writer of a run's checkpoints is [`Checkpointer`]
//! (`checkpointer.rs`). `model_best/` is a copy of the best checkpoint by
//! `checkpoint.best_metric`, with `best.json` inside.
//!
//! RNG: tch 0.24 can seed libtorch's generators (`tch::manual_seed`) but cannot read their state, so the training
//! loop must reseed libtorch at the start of every iteration with [`torch_seed`]`(seed, iteration)`; libtorch's
//! random stream is then a function of the iteration alone, and the RNGs the trainer owns (sampler, augmentation)
//! are stored in `state.json` by the caller.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Tensor};

use crate::durable::{io_error, sync_dir, write_synced, write_tensors};
use crate::manifest::{corrupt, digest_file, read_manifest, verify_files, EMA_FILE, MANIFEST_FILE, MODEL_FILE};
use crate::solver::{EmaState, Solver, SolverScalars, SolverState};
use crate::weights::{check_weights, read_tensors};

pub use crate::checkpoint_error::CheckpointError;
pub use crate::checkpointer::Checkpointer;
pub use crate::durable::is_disk_full;
pub use crate::manifest::{FileDigest, Manifest, WhichWeights, FORMAT_VERSION};
pub use crate::weights::{init_weights, load_weights_into, named_variables};

/// The libtorch version tch 0.24.0 is built against (its build script rejects any other).
pub const LIBTORCH_VERSION: &str = "2.11.0";
const SOLVER_FILE: &str = "solver.safetensors";
const STATE_FILE: &str = "state.json";
const CONFIG_FILE: &str = "config.toml";
pub(crate) const LAST_POINTER: &str = "last_checkpoint";
pub(crate) const BEST_FOLDER: &str = "model_best";
pub(crate) const BEST_FILE: &str = "best.json";

/// Whether a larger or a smaller `best_metric` is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BestMode {
    /// Larger is better (AP).
    Max,
    /// Smaller is better (a loss).
    Min,
}

/// The `[checkpoint]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many iterations (and at the end of training).
    pub period: u64,
    /// Periodic checkpoints kept on disk (older ones are deleted; `model_best` is separate). At least 1.
    pub keep_last: usize,
    /// Evaluation metric that selects `model_best`, e.g. `segm/AP`; none disables the best copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_metric: Option<String>,
    /// `max` or `min`.
    pub best_mode: BestMode,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { period: 5000, keep_last: 3, best_metric: None, best_mode: BestMode::Max }
    }
}

/// The `state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingState {
    /// Completed optimizer steps.
    pub iteration: u64,
    /// Solver scalars (iteration, loss scaler).
    pub solver: SolverScalars,
    /// Sampler position, opaque to the checkpointer.
    pub sampler: serde_json::Value,
    /// RNG states the trainer owns, opaque to the checkpointer.
    pub rng: serde_json::Value,
    /// EMA updates done, when the checkpoint holds an EMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_updates: Option<u64>,
}

/// Everything a checkpoint stores, borrowed from the training loop.
pub struct CheckpointContents<'a> {
    /// Model weights by name (e.g. from [`named_variables`]).
    pub model: &'a [(String, Tensor)],
    /// Solver state ([`Solver::state_dict`]).
    pub solver: &'a SolverState,
    /// The EMA of the weights, when the run keeps one.
    pub ema: Option<&'a EmaState>,
    /// Sampler position.
    pub sampler: serde_json::Value,
    /// RNG states the trainer owns.
    pub rng: serde_json::Value,
    /// The resolved config as TOML.
    pub config_toml: &'a str,
    /// Device the run trains on.
    pub device: String,
    /// Fingerprint of the training data.
    pub dataset_fingerprint: String,
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// Its folder.
    pub path: PathBuf,
    /// `state.json`.
    pub state: TrainingState,
    /// Model weights.
    pub model: Vec<(String, Tensor)>,
    /// Solver tensors and scalars.
    pub solver: SolverState,
    /// The EMA of the weights, when it was saved with one.
    pub ema: Option<EmaState>,
    /// The resolved config it was trained with.
    pub config_toml: String,
    /// Its manifest.
    pub manifest: Manifest,
}

/// A successful `--resume`: the checkpoint used and the warnings about newer ones that could not be used.
#[derive(Debug)]
pub struct Resumed {
    /// The checkpoint whose weights and solver state were restored.
    pub checkpoint: LoadedCheckpoint,
    /// One line per skipped checkpoint, naming the file and the reason.
    pub warnings: Vec<String>,
}

/// libtorch seed for `iteration` of a run seeded with `seed` (SplitMix64 of both): reseeding libtorch with it at
/// the start of every iteration makes libtorch's random stream resumable without reading its generator state.
pub fn torch_seed(seed: u64, iteration: u64) -> i64 {
    let word = seed ^ iteration.wrapping_mul(data::rng::GOLDEN_GAMMA).wrapping_add(0x632B_E59B_D9B4_E019);
    (data::rng::finalize(word) >> 1) as i64
}

/// The folder name of the checkpoint after `iteration` steps.
pub fn checkpoint_name(iteration: u64) -> String {
    format!("model_{iteration:07}")
}

pub(crate) fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("model_")?;
    (digits.len() >= 7 && digits.chars().all(|c| c.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// The commit the trainer was built from, recorded by build.rs when it was built in a git checkout.
fn git_commit() -> Option<String> {
    option_env!("VOVDET_GIT_COMMIT").map(str::to_string)
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CheckpointError> {
    let text = fs::read_to_string(path).map_err(|e| corrupt(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| corrupt(path, e.to_string()))
}

/// Reads and verifies a checkpoint folder: every file listed in the manifest must exist with its recorded size
/// and CRC32, and every file must parse.
pub fn load_checkpoint(folder: &Path) -> Result<LoadedCheckpoint, CheckpointError> {
    let manifest = read_manifest(folder, &[MODEL_FILE, SOLVER_FILE, STATE_FILE, CONFIG_FILE])?;
    verify_files(folder, &manifest, None)?;
    let state: TrainingState = read_json(&folder.join(STATE_FILE))?;
    let model = read_tensors(&folder.join(MODEL_FILE))?;
    let solver_tensors = read_tensors(&folder.join(SOLVER_FILE))?;
    let ema = if manifest.files.contains_key(EMA_FILE) {
        let state_path = folder.join(STATE_FILE);
        let updates =
            state.ema_updates.ok_or_else(|| corrupt(&state_path, "has no ema_updates for ema.safetensors"))?;
        Some(EmaState { tensors: read_tensors(&folder.join(EMA_FILE))?, updates })
    } else {
        None
    };
    let config_path = folder.join(CONFIG_FILE);
    let config_toml = fs::read_to_string(&config_path).map_err(|e| corrupt(&config_path, e.to_string()))?;
    Ok(LoadedCheckpoint {
        path: folder.to_path_buf(),
        solver: SolverState { tensors: solver_tensors, scalars: state.solver.clone() },
        ema,
        state,
        model,
        config_toml,
        manifest,
    })
}

/// Writes every file of a checkpoint into the staging folder `staged` (each fsynced, the manifest last).
pub(crate) fn stage(staged: &Path, iteration: u64, contents: &CheckpointContents<'_>) -> Result<(), CheckpointError> {
    fs::create_dir_all(staged).map_err(io_error(staged))?;
    write_tensors(&staged.join(MODEL_FILE), contents.model)?;
    write_tensors(&staged.join(SOLVER_FILE), &contents.solver.tensors)?;
    if let Some(ema) = contents.ema {
        write_tensors(&staged.join(EMA_FILE), &ema.tensors)?;
    }
    let state = TrainingState {
        iteration,
        solver: contents.solver.scalars.clone(),
        sampler: contents.sampler.clone(),
        rng: contents.rng.clone(),
        ema_updates: contents.ema.map(|ema| ema.updates),
    };
    let state_text = serde_json::to_string_pretty(&state).expect("training state serialises to JSON");
    write_synced(&staged.join(STATE_FILE), state_text.as_bytes())?;
    write_synced(&staged.join(CONFIG_FILE), contents.config_toml.as_bytes())?;
    let mut files = BTreeMap::new();
    let ema_file = contents.ema.map(|_| EMA_FILE);
    for file in [MODEL_FILE, SOLVER_FILE, STATE_FILE, CONFIG_FILE].into_iter().chain(ema_file) {
        files.insert(file.to_string(), digest_file(&staged.join(file))?);
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        vovdet_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit(),
        libtorch_version: LIBTORCH_VERSION.to_string(),
        device: contents.device.clone(),
        dataset_fingerprint: contents.dataset_fingerprint.clone(),
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        files,
    };
    let manifest_text = serde_json::to_string_pretty(&manifest).expect("manifest serialises to JSON");
    write_synced(&staged.join(MANIFEST_FILE), manifest_text.as_bytes())?;
    sync_dir(staged)?;
    Ok(())
}

/// `--resume PATH`: restores exactly the checkpoint folder at `path` into `vs` and `solver` (no fallback). Nothing
/// is changed when it fails.
pub fn resume_from(path: &Path, vs: &VarStore, solver: &mut Solver) -> Result<LoadedCheckpoint, CheckpointError> {
    let checkpoint = load_checkpoint(path)?;
    let model_path = path.join(MODEL_FILE);
    // Check the weights before the solver so that a mismatch leaves everything untouched.
    check_weights(vs, &checkpoint.model, &model_path, true)?;
    solver.load_state_dict(&checkpoint.solver).map_err(|e| CheckpointError::Mismatch {
        path: path.join(SOLVER_FILE).display().to_string(),
        message: e.to_string(),
    })?;
    load_weights_into(vs, &checkpoint.model, &model_path, true)?;
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checkpoints of earlier runs resume on these seeds: the values of the original implementation.
    #[test]
    fn torch_seeds_never_change() {
        assert_eq!(torch_seed(0, 0), 3_952_864_364_094_478_165);
        assert_eq!(torch_seed(42, 1000), 8_263_439_269_554_719_443);
    }
}
