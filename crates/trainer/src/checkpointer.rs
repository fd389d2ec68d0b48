//! [`Checkpointer`]: writes a training run's checkpoints into its output folder (staged, then renamed into place;
//! see [`crate::checkpoint`] for the layout), keeps the newest `checkpoint.keep_last`, maintains the
//! `last_checkpoint` pointer and `model_best/`, and finds the checkpoint to resume from.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use crate::checkpoint::{
    checkpoint_name, parse_checkpoint_name, read_json, resume_from, stage, BestMode, CheckpointConfig,
    CheckpointContents, CheckpointError, Resumed, BEST_FILE, BEST_FOLDER, LAST_POINTER,
};
use crate::durable::{install_folder, io_error, replace_file, sync_dir, sync_file, write_synced, TEMP_PREFIX};
use crate::solver::Solver;

/// Writes, lists, prunes and resumes the checkpoints of one output folder.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    dir: PathBuf,
    config: CheckpointConfig,
}

impl Checkpointer {
    /// A checkpointer for `output_dir`.
    pub fn new(output_dir: &Path, config: &CheckpointConfig) -> Self {
        Checkpointer { dir: output_dir.to_path_buf(), config: config.clone() }
    }

    /// Whether a periodic checkpoint is due after `iteration` completed steps of `max_iter`.
    pub fn is_due(&self, iteration: u64, max_iter: u64) -> bool {
        iteration == max_iter || (self.config.period > 0 && iteration.is_multiple_of(self.config.period))
    }

    /// Checkpoint folders present, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            if let Some(iteration) = parse_checkpoint_name(&entry.file_name().to_string_lossy()) {
                found.push((iteration, entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// Saves a checkpoint after `iteration` steps (see the module documentation for the layout and the write
    /// protocol), points `last_checkpoint` at it and deletes periodic checkpoints beyond `keep_last`.
    pub fn save(&self, iteration: u64, contents: &CheckpointContents<'_>) -> Result<PathBuf, CheckpointError> {
        fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        self.remove_stale_temporaries()?;
        let name = checkpoint_name(iteration);
        let staged = self.dir.join(format!("{TEMP_PREFIX}{name}"));
        if let Err(error) = stage(&staged, iteration, contents) {
            // A failed save (a full disk) gives its space back at once; it never becomes a checkpoint.
            let _ = fs::remove_dir_all(&staged);
            return Err(error);
        }

        let target = self.dir.join(&name);
        install_folder(&staged, &target)?;
        replace_file(&self.dir.join(LAST_POINTER), &name)?;
        self.prune()?;
        Ok(target)
    }

    /// Removes `.tmp-*` leftovers of an interrupted or failed save (they are never valid checkpoints). Training
    /// calls this at start-up, so that a staging folder left by a full disk does not keep the disk full.
    pub fn remove_stale_temporaries(&self) -> Result<(), CheckpointError> {
        if !self.dir.is_dir() {
            return Ok(());
        }
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let path = entry.path();
                let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                removed.map_err(io_error(&path))?;
            }
        }
        Ok(())
    }

    /// Deletes the oldest periodic checkpoints beyond `keep_last` (never the one `last_checkpoint` names).
    fn prune(&self) -> Result<(), CheckpointError> {
        let keep = self.config.keep_last.max(1);
        let last = self.last_pointer();
        let checkpoints = self.list()?;
        let excess = checkpoints.len().saturating_sub(keep);
        for (_, path) in checkpoints.into_iter().take(excess) {
            if Some(&path) != last.as_ref() {
                // Renamed first, so a crash mid-delete never leaves a partial folder under a checkpoint name.
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let doomed = self.dir.join(format!("{TEMP_PREFIX}del-{name}"));
                fs::rename(&path, &doomed).map_err(io_error(&path))?;
                fs::remove_dir_all(&doomed).map_err(io_error(&doomed))?;
            }
        }
        Ok(())
    }

    fn last_pointer(&self) -> Option<PathBuf> {
        let text = fs::read_to_string(self.dir.join(LAST_POINTER)).ok()?;
        let name = text.trim();
        parse_checkpoint_name(name).map(|_| self.dir.join(name))
    }

    /// Records evaluation `metrics` of the checkpoint at `checkpoint`: when `best_metric` is set, present in
    /// `metrics` and better than the best so far, copies the checkpoint to `model_best/` (atomically, with
    /// `best.json`). Returns the new best value when it changed.
    pub fn update_best(
        &self,
        checkpoint: &Path,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<Option<f64>, CheckpointError> {
        let Some(metric) = &self.config.best_metric else { return Ok(None) };
        let Some(&value) = metrics.get(metric) else { return Ok(None) };
        if !value.is_finite() {
            return Ok(None);
        }
        let best_dir = self.dir.join(BEST_FOLDER);
        if let Ok(previous) = read_json::<BestRecord>(&best_dir.join(BEST_FILE)) {
            let better = match self.config.best_mode {
                BestMode::Max => value > previous.value,
                BestMode::Min => value < previous.value,
            };
            if previous.metric == *metric && !better {
                return Ok(None);
            }
        }
        let staged = self.dir.join(format!("{TEMP_PREFIX}{BEST_FOLDER}"));
        if staged.exists() {
            fs::remove_dir_all(&staged).map_err(io_error(&staged))?;
        }
        fs::create_dir_all(&staged).map_err(io_error(&staged))?;
        for entry in fs::read_dir(checkpoint).map_err(io_error(checkpoint))? {
            let entry = entry.map_err(io_error(checkpoint))?;
            let target = staged.join(entry.file_name());
            fs::copy(entry.path(), &target).map_err(io_error(&entry.path()))?;
            sync_file(&target)?;
        }
        let record = BestRecord {
            metric: metric.clone(),
            value,
            checkpoint: checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let text = serde_json::to_string_pretty(&record).expect("best record serialises to JSON");
        write_synced(&staged.join(BEST_FILE), text.as_bytes())?;
        sync_dir(&staged)?;
        install_folder(&staged, &best_dir)?;
        Ok(Some(value))
    }

    /// `--resume` without a path: restores the newest usable checkpoint (the one `last_checkpoint` names, else
    /// older ones, newest first) into `vs` and `solver`. Each unusable newer checkpoint adds a warning naming the
    /// file and the problem. `Ok(None)` when the folder holds no checkpoint at all.
    pub fn resume(&self, vs: &VarStore, solver: &mut Solver) -> Result<Option<Resumed>, CheckpointError> {
        let mut candidates: Vec<PathBuf> = self.list()?.into_iter().rev().map(|(_, path)| path).collect();
        let mut warnings = Vec::new();
        if let Some(last) = self.last_pointer() {
            candidates.retain(|path| *path != last);
            candidates.insert(0, last);
        } else if self.dir.join(LAST_POINTER).exists() {
            warnings.push(format!("{} does not name a checkpoint; ignoring it", self.dir.join(LAST_POINTER).display()));
        }
        if candidates.is_empty() {
            return Ok(None);
        }
        for candidate in candidates {
            match resume_from(&candidate, vs, solver) {
                Ok(checkpoint) => return Ok(Some(Resumed { checkpoint, warnings })),
                Err(err) => warnings.push(format!("skipping checkpoint {}: {err}", candidate.display())),
            }
        }
        Err(CheckpointError::NothingToResume {
            dir: self.dir.display().to_string(),
            details: warnings.iter().map(|w| format!("\n  {w}")).collect(),
        })
    }
}

/// What `model_best/best.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BestRecord {
    metric: String,
    value: f64,
    checkpoint: String,
}
