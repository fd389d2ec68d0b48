//! The `manifest.json` of a checkpoint folder (provenance, and the size and CRC32 of every other file) and its
//! verification, shared by `--resume`, `--init-weights`, `trainer eval --weights` and `trainer predict
//! --weights`: a truncated or bit-flipped checkpoint is refused wherever it is loaded, naming the file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint_error::CheckpointError;

/// Version of the checkpoint layout described in the `checkpoint` module documentation.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name inside a checkpoint folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The model weights' file name inside a checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// The file of a checkpoint holding the EMA of the weights (present when `solver.ema` was on).
pub const EMA_FILE: &str = "ema.safetensors";

/// Which weights of a checkpoint folder to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhichWeights {
    /// The model's own weights (`model.safetensors`).
    #[default]
    Model,
    /// The exponential moving average of the weights (`ema.safetensors`, `--ema`).
    Ema,
}

impl WhichWeights {
    /// The choice of the `--ema` flag of `eval` and `predict`.
    pub fn from_ema_flag(ema: bool) -> Self {
        if ema {
            WhichWeights::Ema
        } else {
            WhichWeights::Model
        }
    }
}

/// The provenance of a checkpoint, and the size and CRC32 of each of its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// vovdet (trainer crate) version.
    pub vovdet_version: String,
    /// The commit the trainer was built from (`git rev-parse HEAD` at build time), when built in a git checkout.
    pub git_commit: Option<String>,
    /// libtorch version.
    pub libtorch_version: String,
    /// Device the run trained on, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// Fingerprint of the training data, supplied by the data loader.
    pub dataset_fingerprint: String,
    /// Seconds since the Unix epoch when the checkpoint was written.
    pub created_unix: u64,
    /// File name -> size and checksum.
    pub files: BTreeMap<String, FileDigest>,
}

/// Size and CRC32 (IEEE) of one checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Length in bytes.
    pub bytes: u64,
    /// CRC32 of the contents.
    pub crc32: u32,
}

pub(crate) fn corrupt(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt { path: path.display().to_string(), message: message.into() }
}

/// Size and CRC32 of a file.
pub(crate) fn digest_file(path: &Path) -> Result<FileDigest, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Io { path: path.display().to_string(), source })?;
    Ok(FileDigest { bytes: bytes.len() as u64, crc32: crc32fast::hash(&bytes) })
}

/// Reads the manifest of the checkpoint folder `folder` and checks its layout version and that it lists each of
/// `required`.
pub fn read_manifest(folder: &Path, required: &[&str]) -> Result<Manifest, CheckpointError> {
    if !folder.is_dir() {
        return Err(corrupt(folder, "not a checkpoint folder"));
    }
    let path = folder.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| corrupt(&path, e.to_string()))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
    if manifest.format != FORMAT_VERSION {
        return Err(corrupt(&path, format!("format {} (this build reads {FORMAT_VERSION})", manifest.format)));
    }
    if let Some(missing) = required.iter().find(|name| !manifest.files.contains_key(**name)) {
        return Err(corrupt(&path, format!("does not list {missing}")));
    }
    Ok(manifest)
}

/// Checks the files `names` of `folder` (every file the manifest lists when `names` is `None`) against their
/// recorded size and CRC32.
pub fn verify_files(folder: &Path, manifest: &Manifest, names: Option<&[&str]>) -> Result<(), CheckpointError> {
    for (name, expected) in &manifest.files {
        if names.is_some_and(|names| !names.contains(&name.as_str())) {
            continue;
        }
        let path = folder.join(name);
        let actual = digest_file(&path).map_err(|e| corrupt(&path, e.to_string()))?;
        if actual.bytes != expected.bytes {
            return Err(corrupt(
                &path,
                format!("{} bytes, the manifest says {} (truncated?)", actual.bytes, expected.bytes),
            ));
        }
        if actual.crc32 != expected.crc32 {
            return Err(corrupt(
                &path,
                format!("CRC32 {:08x}, the manifest says {:08x} (corrupted)", actual.crc32, expected.crc32),
            ));
        }
    }
    Ok(())
}

/// The weights file that `path` names, for loading weights only (`--init-weights`, `eval --weights`, `predict
/// --weights`).
///
/// A checkpoint folder must have a manifest, and its `model.safetensors` must match the size and CRC32 recorded
/// there. A bare safetensors file carries no manifest: it is used as it is, and `note` receives one line saying
/// so (the caller prints it once).
///
/// [`WhichWeights::Ema`] picks the checkpoint's `ema.safetensors` and needs a checkpoint folder saved with the EMA
/// on.
pub fn weights_file(
    path: &Path,
    which: WhichWeights,
    note: &mut dyn FnMut(String),
) -> Result<PathBuf, CheckpointError> {
    if !path.is_dir() {
        if which == WhichWeights::Ema {
            return Err(corrupt(
                path,
                "--ema needs a checkpoint folder (a bare weights file holds one set of weights)",
            ));
        }
        if !path.is_file() {
            return Err(corrupt(path, "no such weights file or checkpoint folder"));
        }
        note(format!(
            "{} is a bare weights file without a checkpoint manifest; its integrity cannot be checked",
            path.display()
        ));
        return Ok(path.to_path_buf());
    }
    // Every checkpoint lists its model file; the EMA file only when the run kept one.
    let (file, required): (&str, &[&str]) = match which {
        WhichWeights::Model => (MODEL_FILE, &[MODEL_FILE]),
        WhichWeights::Ema => (EMA_FILE, &[]),
    };
    let manifest = read_manifest(path, required)?;
    if !manifest.files.contains_key(file) {
        return Err(corrupt(
            path,
            "this checkpoint has no EMA weights (it was saved with solver.ema.enabled = false); drop --ema",
        ));
    }
    verify_files(path, &manifest, Some(&[file]))?;
    Ok(path.join(file))
}
