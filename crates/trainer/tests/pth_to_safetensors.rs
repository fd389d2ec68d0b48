//! `scripts/pth_to_safetensors.py` never runs code from the file it converts unless told to (issue 15, item 13):
//! torch and detectron2 checkpoints (.pth with tensors or numpy arrays, detectron2's .pkl) convert; a file whose
//! unpickling would run code is refused and the code does not run, and `--trust` loads it with a warning.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{repo_root, temp_dir};

fn python() -> std::path::PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup first", python.display());
    python
}

fn convert(input: &Path, output: &Path, trust: bool) -> Output {
    let mut command = Command::new(python());
    command.arg(repo_root().join("scripts/pth_to_safetensors.py")).arg(input).arg(output);
    if trust {
        command.arg("--trust");
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The converted tensors as (name, values), sorted by name.
fn converted(file: &Path) -> Vec<(String, Vec<f64>)> {
    let mut tensors: Vec<(String, Vec<f64>)> = tch::Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).flatten(0, -1)).unwrap()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn checkpoints_convert_and_code_in_them_never_runs_without_trust() {
    let dir = temp_dir("pth");
    let status = Command::new(python())
        .arg(repo_root().join("crates/trainer/tests/python/pth_fixtures.py"))
        .arg(&*dir)
        .status()
        .unwrap();
    assert!(status.success(), "pth_fixtures.py failed");
    let expected =
        vec![("backbone.w".to_string(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), ("head.b".to_string(), vec![1.5, -2.0])];
    for name in ["plain.pth", "numpy.pth", "d2.pkl"] {
        let out = dir.join(format!("{name}.safetensors"));
        let output = convert(&dir.join(name), &out, false);
        assert!(output.status.success(), "{name}: {}", text(&output.stderr));
        assert!(!text(&output.stderr).contains("warning"), "{name}: {}", text(&output.stderr));
        assert_eq!(converted(&out), expected, "{name}");
    }
    for ext in ["pth", "pkl"] {
        let evil = dir.join(format!("evil.{ext}"));
        let marker = dir.join(format!("pwned-{ext}"));
        let out = dir.join(format!("evil-{ext}.safetensors"));
        let output = convert(&evil, &out, false);
        let message = text(&output.stderr);
        assert!(!output.status.success(), "{ext}: a code-running file was converted");
        assert!(!marker.exists(), "{ext}: the file's code ran without --trust");
        assert!(message.contains("--trust") && !message.contains("Traceback"), "{ext}: {message}");
        assert!(message.contains("evil."), "{ext}: {message}");
        let output = convert(&evil, &out, true);
        assert!(output.status.success(), "{ext}: {}", text(&output.stderr));
        assert!(text(&output.stderr).contains("warning: --trust"), "{ext}: {}", text(&output.stderr));
        assert!(marker.exists(), "{ext}: --trust should load with full pickle");
        assert_eq!(converted(&out), expected, "{ext}");
    }
}
