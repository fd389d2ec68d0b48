//! Shared test helpers: coco-mini images and their polygon annotations, resized to a small shorter side.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use data::{InputConfig, PixelFormat};
use detector::{Detections, GtInstances, GtMasks, ImageBatch};
use tch::{Device, Kind, Tensor};

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The repository's real-COCO fixture, `<repo>/tests/data/coco-mini` (14 COCO 2017 images; see its PROVENANCE.md).
pub fn coco_mini() -> PathBuf {
    let path = repo_root().join("tests/data/coco-mini");
    assert!(path.is_dir(), "the coco-mini fixture is missing at {}", path.display());
    path
}

/// One image: `[3, H, W]` float RGB in 0..255 at the resized size, the original size and the ground truth.
pub struct Sample {
    pub image: Tensor,
    pub original_size: (i64, i64),
    pub gt: GtInstances,
}

/// Decodes `<split>/<file>` of coco-mini as a float `[3, H, W]` RGB tensor with values 0..255.
pub fn load_image(split: &str, file_name: &str) -> Tensor {
    let path = coco_mini().join(split).join(file_name);
    let image = image::open(&path).unwrap_or_else(|e| panic!("cannot decode {}: {e}", path.display())).to_rgb8();
    let (w, h) = image.dimensions();
    Tensor::from_slice(image.as_raw()).view([h as i64, w as i64, 3]).permute([2, 0, 1]).to_kind(Kind::Float)
}

/// Loads the images with ids `image_ids` from coco-mini's train split, resized (bilinear) so that the shorter side
/// is `short_side`, with their non-crowd polygon annotations scaled alike. Labels are the category's index among
/// the file's categories sorted by id (0..80).
pub fn load_train_samples(image_ids: &[i64], short_side: i64) -> Vec<Sample> {
    let json_path = coco_mini().join("annotations/instances_train2017.json");
    let text = std::fs::read_to_string(&json_path).expect("read coco-mini annotations");
    let json: serde_json::Value = serde_json::from_str(&text).expect("parse coco-mini annotations");
    let mut category_ids: Vec<i64> =
        json["categories"].as_array().unwrap().iter().map(|c| c["id"].as_i64().unwrap()).collect();
    category_ids.sort();
    let contiguous: BTreeMap<i64, i64> = category_ids.iter().enumerate().map(|(i, &id)| (id, i as i64)).collect();
    image_ids
        .iter()
        .map(|&id| {
            let info = json["images"].as_array().unwrap().iter().find(|i| i["id"].as_i64() == Some(id)).unwrap();
            let original = load_image("train2017", info["file_name"].as_str().unwrap());
            let (h, w) = (original.size()[1], original.size()[2]);
            let scale = short_side as f64 / h.min(w) as f64;
            let (nh, nw) = ((h as f64 * scale).round() as i64, (w as f64 * scale).round() as i64);
            let image = original.unsqueeze(0).upsample_bilinear2d([nh, nw], false, None, None).squeeze_dim(0);
            let (sx, sy) = (nw as f64 / w as f64, nh as f64 / h as f64);
            let mut boxes = Vec::new();
            let mut labels = Vec::new();
            let mut polygons = Vec::new();
            for ann in json["annotations"].as_array().unwrap() {
                if ann["image_id"].as_i64() != Some(id) || ann["iscrowd"].as_i64() == Some(1) {
                    continue;
                }
                let Some(parts) = ann["segmentation"].as_array() else { continue };
                let b: Vec<f64> = ann["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                boxes.extend([b[0] * sx, b[1] * sy, (b[0] + b[2]) * sx, (b[1] + b[3]) * sy].map(|v| v as f32));
                labels.push(contiguous[&ann["category_id"].as_i64().unwrap()]);
                polygons.push(
                    parts
                        .iter()
                        .map(|p| {
                            p.as_array()
                                .unwrap()
                                .iter()
                                .enumerate()
                                .map(|(i, v)| v.as_f64().unwrap() * if i % 2 == 0 { sx } else { sy })
                                .collect()
                        })
                        .collect(),
                );
            }
            let k = labels.len() as i64;
            Sample {
                image,
                original_size: (h, w),
                gt: GtInstances {
                    boxes: Tensor::from_slice(&boxes).view([k, 4]),
                    labels: Tensor::from_slice(&labels),
                    masks: GtMasks::Polygons(polygons),
                    sampling_seed: None,
                },
            }
        })
        .collect()
}

/// detectron2's input statistics (BGR, 0-255 mean and std of its model zoo), the ones the tests and the
/// detectron2 oracle share.
pub fn detectron2_input() -> InputConfig {
    InputConfig {
        format: PixelFormat::Bgr,
        pixel_mean: [103.530, 116.280, 123.675],
        pixel_std: [57.375, 57.120, 58.395],
        ..InputConfig::default()
    }
}

/// `[3, H, W]` RGB 0..255 images normalised with `input` and padded into the model's batch, through the data
/// crate's input pipeline (`data::pixels::preprocess`).
pub fn image_batch(images: &[Tensor], input: &InputConfig, device: Device) -> ImageBatch {
    let (images, image_sizes) = data::pixels::preprocess(images, input, device).unwrap();
    ImageBatch { images, image_sizes }
}

/// Asserts that our `detections` equal an oracle's (`boxes{i}`, `scores{i}`, `labels{i}` with our labels plus
/// `label_offset`, `masks{i}` per image): more than 10 detections per image, the same count and labels, boxes
/// within 1e-2 px, scores within 1e-4, and mask IoU above 0.99 (or both masks empty) for at least 99% of them.
pub fn assert_same_detections(
    detections: &[Detections],
    expected: &std::collections::HashMap<String, Tensor>,
    label_offset: i64,
    what: &str,
) {
    let (mut total, mut good_masks) = (0, 0);
    for (i, ours) in detections.iter().enumerate() {
        let boxes = &expected[&format!("boxes{i}")];
        let d = boxes.size()[0];
        assert!(d > 10, "{what}: image {i}: the oracle found only {d} detections; its weights are too weak");
        assert_eq!(ours.boxes.size()[0], d, "{what}: image {i}: detection count");
        let labels = &expected[&format!("labels{i}")] - label_offset;
        assert_eq!(
            Vec::<i64>::try_from(&ours.labels).unwrap(),
            Vec::<i64>::try_from(&labels).unwrap(),
            "{what}: image {i}: labels"
        );
        let box_error = (&ours.boxes - boxes).abs().max().double_value(&[]);
        let score_error = (&ours.scores - &expected[&format!("scores{i}")]).abs().max().double_value(&[]);
        assert!(box_error < 1e-2, "{what}: image {i}: boxes differ by up to {box_error} px");
        assert!(score_error < 1e-4, "{what}: image {i}: scores differ by up to {score_error}");
        let ours_m = ours.masks.to_kind(Kind::Float);
        let theirs_m = expected[&format!("masks{i}")].to_kind(Kind::Float);
        let inter = (&ours_m * &theirs_m).sum_dim_intlist(&[1i64, 2][..], false, Kind::Float);
        let union = (&ours_m + &theirs_m).clamp_max(1.0).sum_dim_intlist(&[1i64, 2][..], false, Kind::Float);
        let agree = (inter / union.clamp_min(1.0)).gt(0.99).logical_or(&union.eq(0.0));
        good_masks += agree.sum(Kind::Int64).int64_value(&[]);
        total += d;
        eprintln!("{what}: image {i}: {d} detections, box error {box_error:.2e} px, score error {score_error:.2e}");
    }
    eprintln!("{what}: mask IoU > 0.99 for {good_masks} of {total} detections");
    assert!(good_masks as f64 >= 0.99 * total as f64, "{what}: mask IoU > 0.99 for only {good_masks} of {total}");
}
