//! COCO evaluation parity with pycocotools (bbox and segm, crowd regions, tied scores, more than 100 detections
//! per image) on the coco-mini fixture's val annotations with seeded random detections, and bad-input errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use trainer::coco_eval::{
    coco_eval_files, coco_eval_report, evaluate, load_detections, write_detections, CocoEvalError, CompressedRle,
    Detection, GroundTruth, IouType,
};

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup first", python.display());
    python
}

fn ground_truth() -> PathBuf {
    common::coco_mini().join("annotations/instances_val2017.json")
}

#[test]
fn stats_and_printout_equal_pycocotools_on_random_detections() {
    for seed in [0, 1] {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/coco_reference.py"))
            .arg(ground_truth())
            .arg(dir.path())
            .arg(seed.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "coco_reference.py failed");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap()).unwrap();
        let sample = &expected["mask_sample"];
        let (height, width) = (sample["height"].as_u64().unwrap() as u32, sample["width"].as_u64().unwrap() as u32);
        let mask: Vec<u8> = sample["mask"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
        let rle = CompressedRle::from_mask(&mask, height, width).unwrap();
        assert_eq!(rle.counts, sample["counts"].as_str().unwrap(), "RLE differs from pycocotools' mask.encode");
        let tensor = tch::Tensor::from_slice(&mask).view([height as i64, width as i64]);
        assert_eq!(CompressedRle::from_tensor(&tensor).unwrap(), rle);
        for iou_type in [IouType::Bbox, IouType::Segm] {
            let name = iou_type.name();
            let summary =
                coco_eval_files(&ground_truth(), &dir.path().join(format!("dt_{name}.json")), iou_type).unwrap();
            let want: Vec<f64> =
                expected[name]["stats"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let worst = summary.stats.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            println!(
                "seed {seed} {name}: {} detections, AP {:.4}, max |hotcoco - pycocotools| = {worst:e}",
                expected[name]["detections"], summary.stats[0]
            );
            assert_eq!(summary.stats.to_vec(), want, "seed {seed} {name}: differs from pycocotools");
            let lines: Vec<&str> =
                expected[name]["lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
            assert_eq!(summary.summary_lines(), lines, "seed {seed} {name}: printout differs");
            assert_eq!(summary.per_class.len(), 80);
            assert!(summary.per_class.iter().any(|c| c.ap > 0.0));
            // The in-memory path, through a results file we write, gives the same numbers.
            let detections = load_detections(&dir.path().join(format!("dt_{name}.json"))).unwrap();
            let rewritten = dir.path().join(format!("rewritten_{name}.json"));
            write_detections(&rewritten, &detections).unwrap();
            let again = coco_eval_files(&ground_truth(), &rewritten, iou_type).unwrap();
            assert_eq!(again.stats, summary.stats);
            let printed = coco_eval_report(&ground_truth(), &rewritten, iou_type, true).unwrap();
            let json: serde_json::Value = serde_json::from_str(&printed).unwrap();
            assert_eq!(json["stats"][0].as_f64().unwrap(), want[0]);
            let text = coco_eval_report(&ground_truth(), &rewritten, iou_type, false).unwrap();
            assert!(text.starts_with(&summary.summary_lines().join("\n")) && text.contains("| person"), "{text}");
            let json = serde_json::to_value(summary.to_json()).unwrap();
            assert_eq!(json["iou_type"], name);
            assert_eq!(json["stats"].as_array().unwrap().len(), 12);
        }
    }
}

#[test]
fn bad_inputs_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let message = coco_eval_files(&missing, &missing, IouType::Bbox).unwrap_err().to_string();
    assert!(message.contains("missing.json"), "{message}");
    let message = coco_eval_files(&ground_truth(), &missing, IouType::Bbox).unwrap_err().to_string();
    assert!(message.contains("cannot access") && message.contains("missing.json"), "{message}");

    let malformed = dir.path().join("malformed.json");
    std::fs::write(
        &malformed,
        "[\n  {\"image_id\": 139, \"category_id\": 1,, \"bbox\": [0, 0, 1, 1], \"score\": 0.5}\n]",
    )
    .unwrap();
    let message = load_detections(&malformed).unwrap_err().to_string();
    assert!(message.contains("malformed.json") && message.contains("line 2 column"), "{message}");
    let message = coco_eval_files(&malformed, &malformed, IouType::Bbox).unwrap_err().to_string();
    assert!(message.contains("malformed.json"), "{message}");

    let gt = GroundTruth::load(&ground_truth()).unwrap();
    let image_id = gt.image_ids()[0];
    let unknown = dir.path().join("unknown.json");
    std::fs::write(
        &unknown,
        format!(
            r#"[{{"image_id": {image_id}, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}},
                {{"image_id": 123456789, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.8}}]"#
        ),
    )
    .unwrap();
    let err = coco_eval_files(&ground_truth(), &unknown, IouType::Bbox).unwrap_err();
    assert!(matches!(err, CocoEvalError::UnknownImage { index: 1, image_id: 123456789, .. }), "{err}");
    assert!(err.to_string().contains("unknown.json"), "{err}");

    let detections = load_detections(&unknown).unwrap();
    // Boxes without masks in a segm evaluation: pycocotools' loadRes uses each box's rectangle as its mask.
    evaluate(&gt, &detections[..1], IouType::Segm, "predictions").unwrap();
    let from_model = Detection::from_xyxy(image_id, 1, [10.0, 20.0, 15.5, 30.0], 0.9, None);
    assert_eq!(from_model.bbox, Some([10.0, 20.0, 5.5, 10.0]));
    let summary = evaluate(&gt, &detections[..1], IouType::Bbox, "predictions").unwrap();
    assert_eq!(summary.stats[0], 0.0);
    assert!(summary.per_class_table().contains("person"));
}
