//! `trainer coco-eval` on a segm results file without `bbox` (issue 15, item 11): accepted, with the box and
//! area of each detection derived from its mask exactly as pycocotools' `loadRes` derives them, so that segm
//! and bbox statistics equal pycocotools' on the same file. Ground truth: the synthetic shapes dataset.

mod common;

use std::path::Path;
use std::process::Command;

use common::{stderr, temp_dir, trainer};
use trainer::coco_eval::{coco_eval_files, derived_geometry, load_detections, CocoEvalError, GroundTruth, IouType};

fn python() -> std::path::PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup first", python.display());
    python
}

#[test]
fn segm_results_without_boxes_evaluate_as_pycocotools_does() {
    let dir = temp_dir("segm-only");
    let options = data::SynthOptions { train: 1, val: 12, size: 96, seed: 5 };
    data::generate_synthetic(&dir.join("shapes"), &options).unwrap();
    let gt = dir.join("shapes/annotations/instances_val.json");
    let status = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/coco_segm_only.py"))
        .args([gt.as_os_str(), dir.as_os_str(), "3".as_ref()])
        .status()
        .unwrap();
    assert!(status.success(), "coco_segm_only.py failed");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let dt = dir.join("dt.json");
    assert!(load_detections(&dt).unwrap().iter().all(|d| d.bbox.is_none()));
    for iou_type in [IouType::Segm, IouType::Bbox] {
        let want: Vec<f64> =
            expected[iou_type.name()].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let summary = coco_eval_files(&gt, &dt, iou_type).unwrap();
        assert_eq!(summary.stats.to_vec(), want, "{} stats differ from pycocotools", iou_type.name());
    }
    assert!(expected["segm"][0].as_f64().unwrap() > 0.1, "the oracle's detections should score");
    // Each derived box and area equals loadRes's.
    let detections = load_detections(&dt).unwrap();
    let derived = derived_geometry(&GroundTruth::load(&gt).unwrap(), &detections, "dt.json").unwrap();
    let want = expected["derived"].as_array().unwrap();
    assert_eq!(derived.len(), want.len());
    for (index, ((bbox, area), want)) in derived.iter().zip(want).enumerate() {
        let want_box: Vec<f64> = want[0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(bbox.map(|b| b.to_vec()), Some(want_box), "detection {index}: bbox");
        assert_eq!(*area, want[1].as_f64(), "detection {index}: area");
    }

    let output =
        trainer(&["coco-eval", "--gt", gt.to_str().unwrap(), "--dt", dt.to_str().unwrap(), "--iou-type", "segm"]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn files_pycocotools_rejects_are_located_errors() {
    let dir = temp_dir("segm-only-bad");
    let options = data::SynthOptions { train: 1, val: 2, size: 64, seed: 5 };
    data::generate_synthetic(&dir.join("shapes"), &options).unwrap();
    let gt = GroundTruth::load(&dir.join("shapes/annotations/instances_val.json")).unwrap();
    let rle = r#"{"size": [64, 64], "counts": "0`0"}"#;
    let cases = [
        // Masks without boxes first, then an entry with neither: loadRes needs its mask.
        (
            format!(
                r#"[{{"image_id": 1, "category_id": 1, "segmentation": {rle}, "score": 0.9}},
                     {{"image_id": 1, "category_id": 1, "score": 0.8}}]"#
            ),
            "detection 1 (image_id 1) has no segmentation",
        ),
        // Boxes first, then an entry without a box: loadRes needs its box.
        (
            format!(
                r#"[{{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9}},
                     {{"image_id": 2, "category_id": 1, "segmentation": {rle}, "score": 0.8}}]"#
            ),
            "detection 1 (image_id 2) has no bbox",
        ),
        (
            r#"[{"image_id": 2, "category_id": 1, "score": 0.8}]"#.to_string(),
            "detection 0 (image_id 2) has no bbox and no segmentation",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.join("dt.json");
        std::fs::write(&path, text).unwrap();
        let detections = load_detections(&path).unwrap();
        let err = trainer::coco_eval::evaluate(&gt, &detections, IouType::Segm, "dt.json").unwrap_err();
        assert!(matches!(err, CocoEvalError::MissingBox { .. } | CocoEvalError::MissingSegmentation { .. }), "{err}");
        assert!(err.to_string().contains(expected), "{err}");
    }
    // `"bbox": []` counts as no box, as in pycocotools; a box of 3 numbers is a parse error naming the file.
    std::fs::write(
        dir.join("empty.json"),
        format!(r#"[{{"image_id": 1, "category_id": 1, "bbox": [], "segmentation": {rle}, "score": 0.5}}]"#),
    )
    .unwrap();
    assert!(load_detections(&dir.join("empty.json")).unwrap()[0].bbox.is_none());
    std::fs::write(dir.join("three.json"), r#"[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]"#)
        .unwrap();
    let err = load_detections(&dir.join("three.json")).unwrap_err().to_string();
    assert!(err.contains("three.json") && err.contains("4 numbers"), "{err}");
}
