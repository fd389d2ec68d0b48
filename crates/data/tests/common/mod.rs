//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `<repo>/../shared/datasets/coco-tiny`, which must exist.
pub fn coco_tiny() -> PathBuf {
    let root = repo_root().join("../shared/datasets/coco-tiny");
    assert!(root.is_dir(), "coco-tiny missing at {}", root.display());
    root
}

/// The `.venv` Python; fails with a hint when `scripts/setup` has not been run.
pub fn python() -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup to create the .venv", python.display());
    python
}

/// Loads a coco-tiny split.
pub fn load_tiny(split: &str) -> data::CocoDataset {
    let root = coco_tiny();
    data::CocoDataset::load(
        &root.join(format!("annotations/instances_{split}2017.json")),
        &root.join(format!("{split}2017")),
        data::LoadOptions::default(),
    )
    .unwrap()
}
