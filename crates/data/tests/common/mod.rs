//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The repository's real-COCO fixture, `<repo>/tests/data/coco-mini` (14 COCO 2017 images; see its PROVENANCE.md).
pub fn coco_mini() -> PathBuf {
    let root = repo_root().join("tests/data/coco-mini");
    assert!(root.is_dir(), "the coco-mini fixture is missing at {}", root.display());
    root
}

/// The `.venv` Python; fails with a hint when `scripts/setup` has not been run.
pub fn python() -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup to create the .venv", python.display());
    python
}

/// Loads a coco-mini split (`"train"` or `"val"`).
pub fn load_mini(split: &str) -> data::CocoDataset {
    let root = coco_mini();
    data::CocoDataset::load(
        &root.join(format!("annotations/instances_{split}2017.json")),
        &root.join(format!("{split}2017")),
        data::LoadOptions::default(),
    )
    .unwrap()
}
