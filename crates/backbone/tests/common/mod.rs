//! Helpers shared by the backbone integration tests: the project's Python oracle and temporary folders.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::process::Command;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A fresh temporary folder for one test, removed with everything in it when the returned guard drops.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("vovdet-backbone-{tag}-")).tempdir().unwrap()
}

/// Runs `tests/python/reference.py` with `args` in the project's .venv; fails the test if it cannot.
pub fn run_reference(args: &[&str]) {
    let python = repo_root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup first", python.display());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/reference.py");
    let output = Command::new(python).arg(script).args(args).output().expect("python runs");
    assert!(output.status.success(), "reference.py failed: {}", String::from_utf8_lossy(&output.stderr));
}
