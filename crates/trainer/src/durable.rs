//! Crash-safe writes for checkpoints: every file fsynced, folders and pointer files replaced by a rename and
//! the parent directory fsynced, and the OS errors of a failed write (a full disk above all) turned into
//! [`CheckpointError`]s that say what happened in words.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use tch::Tensor;

use crate::checkpoint_error::CheckpointError;

/// Prefix of staging and scratch entries in an output folder; they are never valid checkpoints.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// Whether an OS error means that the disk or the quota is full (ENOSPC, EDQUOT).
pub fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(error.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
        || matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| {
        if is_disk_full(&source) {
            let dir = path.parent().unwrap_or(Path::new("."));
            CheckpointError::DiskFull { path: path.display().to_string(), dir: dir.display().to_string() }
        } else {
            CheckpointError::Io { path: path.display().to_string(), source }
        }
    }
}

pub(crate) fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_error(path))
}

pub(crate) fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_error(path))
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(io_error(path))
}

pub(crate) fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    // Row-major data whatever the layout in memory (channels-last weights, their momentum buffers), as
    // safetensors stores it: files are the same in either layout.
    let on_cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&on_cpu, path).map_err(|source| match source {
        // The OS error of a failed write (a full disk) is reported as such, not in libtorch's debug format.
        tch::TchError::SafeTensorError { err: safetensors::SafeTensorError::IoError(io), .. } => io_error(path)(io),
        source => CheckpointError::Torch { path: path.display().to_string(), source },
    })?;
    sync_file(path)
}

/// Replaces `target` by the folder `staged` (removing an older `target` first), then fsyncs the parent.
pub(crate) fn install_folder(staged: &Path, target: &Path) -> Result<(), CheckpointError> {
    if target.exists() {
        let parent = target.parent().unwrap_or(Path::new("."));
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let trash = parent.join(format!("{TEMP_PREFIX}old-{name}"));
        if trash.exists() {
            fs::remove_dir_all(&trash).map_err(io_error(&trash))?;
        }
        fs::rename(target, &trash).map_err(io_error(target))?;
        fs::rename(staged, target).map_err(io_error(target))?;
        fs::remove_dir_all(&trash).map_err(io_error(&trash))?;
    } else {
        fs::rename(staged, target).map_err(io_error(target))?;
    }
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

/// Writes `text` to `path` through a synced temporary file and a rename.
pub(crate) fn replace_file(path: &Path, text: &str) -> Result<(), CheckpointError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staged = parent.join(format!("{TEMP_PREFIX}{name}"));
    write_synced(&staged, text.as_bytes())?;
    fs::rename(&staged, path).map_err(io_error(path))?;
    sync_dir(parent)
}
