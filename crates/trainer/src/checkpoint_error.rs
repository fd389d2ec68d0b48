//! The error type of checkpoint writing and reading, shared by the checkpointer (`checkpoint.rs`) and the
//! modules it builds on (`durable.rs`, `manifest.rs`, `weights.rs`), which therefore do not depend on the
//! checkpointer itself.

/// Errors in writing or reading checkpoints; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file system operation failed (the OS error is the source, so a report of the chain prints it once).
    #[error("{path}")]
    Io { path: String, source: std::io::Error },
    /// A write failed because the disk (or the user's quota) is full.
    #[error(
        "{path}: no space left on device: the disk holding {dir} is full. Free space there, then continue with \
         --resume: the last complete checkpoint is untouched, and the partial one is removed at the next start"
    )]
    DiskFull { path: String, dir: String },
    /// A checkpoint file that is missing, truncated, corrupt or unreadable.
    #[error("checkpoint file {path} is unusable: {message}")]
    Corrupt { path: String, message: String },
    /// A valid checkpoint that does not fit the current model or solver.
    #[error("checkpoint {path} does not fit this run: {message}")]
    Mismatch { path: String, message: String },
    /// `--resume` found no usable checkpoint.
    #[error("no usable checkpoint in {dir}{details}")]
    NothingToResume { dir: String, details: String },
    /// An error from libtorch while writing tensors.
    #[error("{path}")]
    Torch { path: String, source: tch::TchError },
}
