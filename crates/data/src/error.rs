//! Typed errors of the data crate; every message names the file and, where there is one, the annotation or image id.

use std::path::PathBuf;

/// Everything that can go wrong between files on disk and a batch.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The JSON is malformed or has a field of the wrong type.
    #[error("{path}:{line}:{column}: invalid COCO JSON: {message}")]
    Json {
        /// The annotation file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// What serde_json reported.
        message: String,
    },
    /// An annotation is semantically invalid (unknown ids, bad polygon or RLE).
    #[error("{path}: annotation id {annotation_id}: {message}")]
    Annotation {
        /// The annotation file.
        path: PathBuf,
        /// The offending annotation's id.
        annotation_id: u64,
        /// What is wrong.
        message: String,
    },
    /// An image entry of the JSON is invalid (duplicate id, zero size).
    #[error("{path}: image id {image_id}: {message}")]
    ImageEntry {
        /// The annotation file.
        path: PathBuf,
        /// The offending image id.
        image_id: u64,
        /// What is wrong.
        message: String,
    },
    /// The category lists of the JSON are invalid or differ between concatenated datasets.
    #[error("{path}: {message}")]
    Categories {
        /// The annotation file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An image file is missing, does not decode, or disagrees with the size in the JSON.
    #[error("{file}: image id {image_id}: {message}")]
    ImageFile {
        /// The image file.
        file: PathBuf,
        /// Its COCO image id.
        image_id: u64,
        /// What is wrong.
        message: String,
    },
    /// The configuration is inconsistent.
    #[error("data config: {0}")]
    Config(String),
    /// A sampler or loader was asked for something impossible (empty dataset, zero batch size).
    #[error("loader: {0}")]
    Loader(String),
    /// libtorch failed while building a batch tensor.
    #[error("tensor: {0}")]
    Tensor(#[from] tch::TchError),
}

impl DataError {
    /// Wraps an IO error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
