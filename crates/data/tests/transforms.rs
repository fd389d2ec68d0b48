//! Masks rasterised after our transforms equal pycocotools' rasterisation of the transformed annotations; flips
//! are involutions; batches are padded, normalised and shaped as the detector expects.

mod common;

use data::coco::Segmentation;
use data::config::{InputConfig, PixelFormat};
use data::transform::{transform_targets, Crop, Geometry, InstanceMask, RgbImage};

/// Our mask of one transformed annotation as a compressed RLE string (column-major, pycocotools layout).
fn our_rle(mask: &InstanceMask, height: u32, width: u32) -> String {
    let rle = match mask {
        InstanceMask::Polygons(parts) => hotcoco::mask::fr_polys(parts, height, width).unwrap(),
        InstanceMask::Bitmap(rows) => {
            let (h, w) = (height as usize, width as usize);
            let column_major: Vec<u8> = (0..h * w).map(|i| rows[(i % h) * w + i / h]).collect();
            hotcoco::mask::encode(&column_major, height, width).unwrap()
        }
    };
    hotcoco::mask::rle_to_string(&rle)
}

#[test]
fn transformed_masks_equal_pycocotools_of_transformed_annotations() {
    let dataset = common::load_mini("train");
    let annotation_file = common::coco_mini().join("annotations/instances_train2017.json");
    // Images with crowd RLE or multi-part polygons, plus a few plain ones.
    let chosen: Vec<_> = dataset
        .images
        .iter()
        .filter(|r| {
            r.annotations.iter().any(|a| match &a.segmentation {
                Some(Segmentation::Rle(_)) => true,
                Some(Segmentation::Polygons(p)) => p.len() > 1,
                None => false,
            })
        })
        .take(6)
        .chain(dataset.images.iter().take(2))
        .collect();
    let mut cases = Vec::new();
    let mut ours = std::collections::BTreeMap::new();
    for (i, record) in chosen.iter().enumerate() {
        let (h, w) = (record.height, record.width);
        let geometries = [
            Geometry { original: (h, w), resized: (h * 3 / 2, w * 3 / 2), crop: None, flip: false },
            Geometry { original: (h, w), resized: (h * 7 / 10, w * 7 / 10), crop: None, flip: true },
            Geometry {
                original: (h, w),
                resized: (h * 5 / 4, w * 5 / 4),
                crop: Some(Crop { x0: w / 5, y0: h / 6, width: w * 3 / 4, height: h * 2 / 3 }),
                flip: i % 2 == 0,
            },
        ];
        for (g, geometry) in geometries.iter().enumerate() {
            let targets = transform_targets(record, geometry);
            let (out_h, out_w) = geometry.output_size();
            let crowd = record.annotations.iter().filter(|a| a.iscrowd);
            // Crowd regions are excluded from targets; transform them as a full-image bitmap directly.
            let crowd_masks = crowd.filter_map(|a| match &a.segmentation {
                Some(Segmentation::Rle(rle)) => Some((a.id, InstanceMask::Bitmap(geometry.map_rle(rle)))),
                _ => None,
            });
            let all = targets.annotation_ids.iter().copied().zip(targets.masks.iter().cloned()).chain(crowd_masks);
            for (annotation_id, mask) in all {
                let key = format!("{}-{g}-{annotation_id}", record.image_id);
                ours.insert(key.clone(), our_rle(&mask, out_h, out_w));
                cases.push(serde_json::json!({
                    "key": key, "annotation_id": annotation_id,
                    "original": [h, w], "resized": [geometry.resized.0, geometry.resized.1],
                    "crop": geometry.crop.map(|c| [c.x0, c.y0, c.width, c.height]),
                    "flip": geometry.flip, "output": [out_h, out_w],
                }));
            }
        }
    }
    assert!(ours.len() > 30, "too few cases: {}", ours.len());
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("cases.json"), dir.path().join("oracle.json"));
    std::fs::write(&input, serde_json::json!({"annotation_file": annotation_file, "cases": cases}).to_string())
        .unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/transform_oracle.py");
    let status = std::process::Command::new(common::python()).arg(script).arg(&input).arg(&output).status().unwrap();
    assert!(status.success(), "oracle failed");
    let oracle: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let mismatched: Vec<&String> = ours.keys().filter(|k| oracle.get(*k) != ours.get(*k)).collect();
    assert!(mismatched.is_empty(), "{} of {} masks differ: {:?}", mismatched.len(), ours.len(), mismatched);
}

#[test]
fn flipping_twice_is_identity() {
    let dataset = common::load_mini("val");
    let record = &dataset.images[3];
    let (h, w) = (record.height, record.width);
    let flip = Geometry { original: (h, w), resized: (h, w), crop: None, flip: true };
    let image = data::transform::decode_rgb(&record.file).unwrap();
    let once = flip.apply_image(&image).unwrap();
    assert_ne!(once, image);
    assert_eq!(flip.apply_image(&once).unwrap(), image);
    for ann in &record.annotations {
        let [x, y, bw, bh] = ann.bbox;
        let b = [x, y, x + bw, y + bh];
        let twice = flip.map_box(flip.map_box(b));
        assert!(b.iter().zip(twice).all(|(a, b)| (a - b).abs() < 1e-9));
        match &ann.segmentation {
            Some(Segmentation::Polygons(parts)) => {
                for part in parts {
                    let twice = flip.map_polygon(&flip.map_polygon(part).unwrap()).unwrap();
                    assert!(part.iter().zip(&twice).all(|(a, b)| (a - b).abs() < 1e-9));
                }
            }
            Some(Segmentation::Rle(rle)) => {
                let once = flip.map_rle(rle);
                let back = hotcoco::mask::encode(
                    &(0..(h * w) as usize)
                        .map(|i| once[(i % h as usize) * w as usize + i / h as usize])
                        .collect::<Vec<_>>(),
                    h,
                    w,
                )
                .unwrap();
                assert_eq!(
                    flip.map_rle(&back),
                    hotcoco::mask::decode(rle).iter().enumerate().fold(
                        vec![0u8; (h * w) as usize],
                        |mut rows, (i, v)| {
                            rows[(i % h as usize) * w as usize + i / h as usize] = *v;
                            rows
                        },
                    )
                );
            }
            None => {}
        }
    }
}

#[test]
fn shortest_edge_sizes_follow_each_framework() {
    use data::transform::shortest_edge_size;
    use data::ResizeStyle::{Detectron2, Torchvision};
    assert_eq!(shortest_edge_size(480, 640, 800, 1333, Detectron2), (800, 1067));
    assert_eq!(shortest_edge_size(640, 427, 800, 1333, Detectron2), (1199, 800));
    assert_eq!(shortest_edge_size(200, 1000, 800, 1333, Detectron2), (267, 1333));
    assert_eq!(shortest_edge_size(480, 1280, 800, 1333, Detectron2), (500, 1333));
    // Values printed by torchvision 0.26's GeneralizedRCNNTransform.
    assert_eq!(shortest_edge_size(480, 640, 800, 1333, Torchvision), (800, 1066));
    assert_eq!(shortest_edge_size(427, 640, 800, 1333, Torchvision), (800, 1199));
    assert_eq!(shortest_edge_size(640, 480, 800, 1333, Torchvision), (1066, 800));
    assert_eq!(shortest_edge_size(333, 500, 800, 1333, Torchvision), (800, 1201));
    assert_eq!(data::transform::resize_scale_size(480, 640, 1024, 0.5), (384, 512));
}

#[test]
fn collate_pads_normalises_and_orders_channels() {
    let mut input = InputConfig { format: PixelFormat::Bgr, ..InputConfig::default() };
    input.pixel_mean = [10.0, 20.0, 30.0];
    input.pixel_std = [2.0, 4.0, 5.0];
    let sample = |w: u32, h: u32, pixel: [u8; 3]| {
        let geometry = Geometry { original: (h * 2, w * 2), resized: (h, w), crop: None, flip: false };
        let image = RgbImage { width: w, height: h, data: pixel.repeat((w * h) as usize) };
        (geometry, data::pixels::prepare(&image, &geometry, &input).unwrap())
    };
    let sample = |w: u32, h: u32, pixel: [u8; 3]| data::sample::Sample {
        image_id: 7,
        geometry: sample(w, h, pixel).0,
        image: sample(w, h, pixel).1,
        targets: data::transform::SampleTargets {
            boxes: vec![[1.0, 2.0, 3.0, 4.0]],
            labels: vec![5],
            masks: vec![InstanceMask::Bitmap(vec![1; (w * h) as usize])],
            annotation_ids: vec![9],
        },
    };
    let batch =
        data::batch::collate(vec![sample(40, 33, [100, 150, 200]), sample(70, 20, [0, 0, 0])], &input, false).unwrap();
    assert_eq!(batch.images.size(), vec![2, 3, 64, 96]);
    assert_eq!(batch.image_sizes, vec![(33, 40), (20, 70)]);
    assert_eq!(batch.original_sizes, vec![(66, 80), (40, 140)]);
    assert_eq!(batch.scales, vec![(0.5, 0.5), (0.5, 0.5)]);
    let at = |n: i64, c: i64, y: i64, x: i64| batch.images.double_value(&[n, c, y, x]);
    // BGR: channel 0 is blue (200), normalised with the first mean/std.
    assert_eq!(at(0, 0, 5, 5), (200.0 - 10.0) / 2.0);
    assert_eq!(at(0, 2, 32, 39), (100.0 - 30.0) / 5.0);
    assert_eq!(at(0, 1, 33, 5), 0.0, "padding is zero");
    assert_eq!(at(1, 0, 0, 69), (0.0 - 10.0) / 2.0);
    assert_eq!(at(1, 0, 20, 69), 0.0);
    let t = &batch.targets[0];
    assert_eq!(t.boxes.size(), vec![1, 4]);
    assert_eq!(t.labels.kind(), tch::Kind::Int64);
    assert_eq!(t.boxes.kind(), tch::Kind::Float);
    match &t.masks {
        data::TargetMasks::Bitmaps(m) => assert_eq!((m.size(), m.kind()), (vec![1, 33, 40], tch::Kind::Uint8)),
        other => panic!("expected a bitmap, got {other:?}"),
    }
}
