//! TensorBoard read-back test: scalars and PNG images written by our event writer are read back by
//! tensorboard's `EventAccumulator` in the .venv with exact tags, steps, values and pixels; plus `metrics.jsonl`.

use std::path::{Path, PathBuf};
use std::process::Command;

use trainer::events::{EventWriter, MetricsWriter};

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup first", python.display());
    python
}

fn pixels(width: u32, height: u32, seed: u32) -> Vec<u8> {
    (0..width * height * 3).map(|i| ((i * 37 + seed * 101) % 251) as u8).collect()
}

#[test]
fn tensorboard_reads_back_scalars_and_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(dir.path()).unwrap();
    let losses: Vec<(u64, f64)> = (0..6).map(|i| (i * 20, 1.0 / (i as f64 + 1.0))).collect();
    for &(step, loss) in &losses {
        writer.add_scalars(step, &[("loss/total", loss), ("lr", 0.02 * step as f64 / 100.0)]).unwrap();
    }
    writer.add_scalar("segm/AP", 0.4321, 100).unwrap();
    writer.add_image_rgb("predictions/000139", 7, 5, &pixels(7, 5, 1), 60).unwrap();
    writer.add_image_rgb("predictions/000139", 7, 5, &pixels(7, 5, 2), 100).unwrap();
    writer.add_image_rgb("predictions/tall", 3, 9, &pixels(3, 9, 3), 100).unwrap();
    writer.flush().unwrap();

    let output = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/read_events.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "read_events.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let read: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let scalars = &read["scalars"];
    let total: Vec<(u64, f64)> = scalars["loss/total"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap()))
        .collect();
    let expected: Vec<(u64, f64)> = losses.iter().map(|&(s, v)| (s, v as f32 as f64)).collect();
    assert_eq!(total, expected);
    assert_eq!(scalars["lr"].as_array().unwrap().len(), 6);
    assert_eq!(scalars["lr"][5][1].as_f64().unwrap(), (0.02f64 * 100.0 / 100.0) as f32 as f64);
    assert_eq!(scalars["segm/AP"][0][0], 100);
    assert_eq!(scalars["segm/AP"][0][1].as_f64().unwrap(), 0.4321f32 as f64);

    let images = &read["images"];
    let series = images["predictions/000139"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    for (entry, (step, seed)) in series.iter().zip([(60, 1), (100, 2)]) {
        assert_eq!((entry[0].as_u64().unwrap(), entry[1].as_u64().unwrap(), entry[2].as_u64().unwrap()), (step, 7, 5));
        let got: Vec<u8> = entry[3].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
        assert_eq!(got, pixels(7, 5, seed));
    }
    let tall = &images["predictions/tall"][0];
    assert_eq!((tall[1].as_u64().unwrap(), tall[2].as_u64().unwrap()), (3, 9));
    let got: Vec<u8> = tall[3].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    assert_eq!(got, pixels(3, 9, 3));
}

#[test]
fn metrics_jsonl_appends_objects_and_drops_records_after_a_resume_point() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let mut metrics = MetricsWriter::open(&path).unwrap();
    for iteration in [20u64, 40, 60] {
        metrics.write(&serde_json::json!({"iteration": iteration, "loss": 1.5, "lr": 0.02})).unwrap();
    }
    metrics.write(&serde_json::json!({"iteration": 60, "segm/AP": 0.25})).unwrap();
    drop(metrics);
    let mut resumed = MetricsWriter::open_resumed(&path, 40).unwrap();
    resumed.write(&serde_json::json!({"iteration": 60, "loss": 1.25})).unwrap();
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let iterations: Vec<u64> = lines.iter().map(|l| l["iteration"].as_u64().unwrap()).collect();
    assert_eq!(iterations, vec![20, 40, 60]);
    assert_eq!(lines[2]["loss"], 1.25);
}
