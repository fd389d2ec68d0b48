//! The two mask target formats on real COCO instances: detectron2's polygons rasterised inside each RoI
//! (`input.mask_format = "polygon"`) against full-image bitmaps cropped and resized with RoIAlign (`"bitmask"`,
//! what the loader workers produce so that the step does no host work), with detectron2's adaptive sampling and
//! with the one sample per target pixel that fixed shapes use. They differ only along mask edges; this measures by
//! how much on the 83 instances of the seven coco-mini training images, on the RoIs the mask head trains on
//! (ground-truth boxes jittered by up to 10 %), at 28 x 28.

mod common;

use detector::ops;
use detector::GtMasks;
use tch::{Kind, Tensor};

#[test]
fn bitmask_targets_differ_from_polygon_targets_only_at_edges() {
    tch::manual_seed(0);
    let samples = common::load_train_samples(&[204805, 319492, 116740, 425988, 499716, 253955, 180239], 800);
    let size = 28;
    // Differing pixels against the polygon targets: adaptive sampling, one sample per pixel.
    let (mut differing, mut worst) = ([0.0; 2], [0.0f64; 2]);
    let (mut total, mut foreground, mut instances) = (0.0, 0.0, 0);
    for sample in &samples {
        let GtMasks::Polygons(polygons) = &sample.gt.masks else { panic!("polygon ground truth expected") };
        let (_, height, width) = sample.image.size3().unwrap();
        let boxes = &sample.gt.boxes;
        let sides = (boxes.narrow(1, 2, 2) - boxes.narrow(1, 0, 2)).repeat([1, 2]);
        let rois = boxes + sides * (Tensor::rand_like(boxes) - 0.5) * 0.2;
        let by_polygon = ops::polygons_to_roi_masks(polygons, &rois, size);
        let bitmaps: Vec<Tensor> = polygons.iter().map(|p| ops::polygons_to_bitmask(p, height, width)).collect();
        let bitmaps = Tensor::stack(&bitmaps, 0);
        for (i, sampling_ratio) in [0, 1].into_iter().enumerate() {
            let by_bitmap = ops::bitmasks_to_roi_masks(&bitmaps, &rois, size, sampling_ratio);
            let differs = by_polygon.ne_tensor(&by_bitmap).to_kind(Kind::Double);
            differing[i] += differs.sum(Kind::Double).double_value(&[]);
            worst[i] = worst[i].max(differs.mean_dim(&[1, 2][..], false, Kind::Double).max().double_value(&[]));
        }
        total += by_polygon.numel() as f64;
        foreground += by_polygon.sum(Kind::Double).double_value(&[]);
        instances += polygons.len();
    }
    for (i, name) in ["adaptive sampling", "one sample per pixel"].iter().enumerate() {
        eprintln!(
            "{instances} instances, {total} target pixels ({foreground} foreground): bitmaps with {name} differ from \
             polygons in {} ({:.2} %), worst RoI {:.2} %",
            differing[i],
            100.0 * differing[i] / total,
            100.0 * worst[i]
        );
        assert!(differing[i] > 0.0, "the formats are different methods");
        assert!(
            differing[i] < 0.03 * total,
            "{name}: {:.2} % of the target pixels differ",
            100.0 * differing[i] / total
        );
    }
    assert_eq!(instances, 83);
    assert!(foreground > 0.2 * total, "the instances cover their boxes");
}
