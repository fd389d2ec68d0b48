//! Images without annotations, batches of different sizes, zero surviving proposals and bad ground truth: no crash,
//! correct zero losses, empty detections with the right shapes, typed errors.

mod common;

use detector::{DetectorConfig, GtInstances, GtMasks, MaskRcnn};
use tch::{nn, Device, Kind, Tensor};

fn images() -> Vec<Tensor> {
    tch::manual_seed(1);
    vec![
        Tensor::rand([3, 64, 96], (Kind::Float, Device::Cpu)) * 255.0,
        Tensor::rand([3, 80, 50], (Kind::Float, Device::Cpu)) * 255.0,
    ]
}

fn square(x0: f64, y0: f64, x1: f64, y1: f64, label: i64) -> GtInstances {
    GtInstances {
        boxes: Tensor::from_slice(&[x0 as f32, y0 as f32, x1 as f32, y1 as f32]).view([1, 4]),
        labels: Tensor::from_slice(&[label]),
        masks: GtMasks::Polygons(vec![vec![vec![x0, y0, x1, y0, x1, y1, x0, y1]]]),
        sampling_seed: None,
    }
}

fn model(config: &DetectorConfig) -> (nn::VarStore, MaskRcnn) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MaskRcnn::new(&vs.root(), config).unwrap();
    (vs, model)
}

fn small_config() -> DetectorConfig {
    let mut config = DetectorConfig::scratch("V-19", 3);
    config.roi_heads.batch_size_per_image = 16;
    config
}

#[test]
fn empty_annotations_and_mixed_sizes_train() {
    let config = small_config();
    let (_vs, model) = model(&config);
    let batch = common::image_batch(&images(), &common::detectron2_input(), Device::Cpu);
    assert_eq!(batch.images.size(), [2, 3, 96, 96]);

    // One annotated image next to an empty one.
    let losses =
        model.forward_train(&batch, &[square(10.0, 10.0, 50.0, 40.0, 2), GtInstances::empty(Device::Cpu)]).unwrap();
    assert_eq!(losses.len(), 5);
    for (name, loss) in &losses {
        assert!(loss.double_value(&[]).is_finite(), "{name}");
    }
    let total: Tensor = losses.values().map(|l| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
    total.backward();

    // No annotations at all: only background, so the regression and mask losses are exactly zero.
    let empty = [GtInstances::empty(Device::Cpu), GtInstances::empty(Device::Cpu)];
    let losses = model.forward_train(&batch, &empty).unwrap();
    for name in ["loss_rpn_loc", "loss_box_reg", "loss_mask"] {
        assert_eq!(losses[name].double_value(&[]), 0.0, "{name}");
    }
    assert!(losses["loss_rpn_cls"].double_value(&[]) > 0.0);
    assert!(losses["loss_cls"].double_value(&[]) > 0.0);
    let total: Tensor = losses.values().map(|l| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
    total.backward();
}

#[test]
fn zero_surviving_proposals_give_zero_losses_and_no_detections() {
    // A minimum proposal size larger than the image removes every proposal.
    let mut config = small_config();
    config.rpn.min_size = 1000.0;
    let (_vs, model) = model(&config);
    let batch = common::image_batch(&images(), &common::detectron2_input(), Device::Cpu);
    let empty = [GtInstances::empty(Device::Cpu), GtInstances::empty(Device::Cpu)];
    let losses = model.forward_train(&batch, &empty).unwrap();
    for name in ["loss_cls", "loss_box_reg", "loss_mask"] {
        assert_eq!(losses[name].double_value(&[]), 0.0, "{name}");
    }
    let total: Tensor = losses.values().map(|l| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
    total.backward();
    // With ground truth the appended ground-truth boxes are the only RoIs; every loss stays finite.
    let losses =
        model.forward_train(&batch, &[square(5.0, 5.0, 60.0, 50.0, 0), square(0.0, 0.0, 49.0, 79.0, 1)]).unwrap();
    for (name, loss) in &losses {
        assert!(loss.double_value(&[]).is_finite(), "{name}");
    }
    let detections = model.inference(&batch, &[(128, 192), (80, 50)]).unwrap();
    for (d, (h, w)) in detections.iter().zip([(128, 192), (80, 50)]) {
        assert_eq!(d.boxes.size(), [0, 4]);
        assert_eq!(d.scores.size(), [0]);
        assert_eq!(d.labels.size(), [0]);
        assert_eq!(d.masks.size(), [0, h, w]);
    }
}

#[test]
fn inference_returns_masks_at_the_output_size() {
    let mut config = small_config();
    config.roi_heads.score_thresh_test = 0.0;
    let (_vs, model) = model(&config);
    let batch = common::image_batch(&images(), &common::detectron2_input(), Device::Cpu);
    let detections = model.inference(&batch, &[(128, 192), (160, 100)]).unwrap();
    for (d, (h, w)) in detections.iter().zip([(128i64, 192i64), (160, 100)]) {
        let n = d.boxes.size()[0];
        assert!(n > 0 && n <= config.roi_heads.detections_per_image);
        assert_eq!(d.masks.size(), [n, h, w]);
        assert_eq!(d.masks.kind(), Kind::Bool);
        assert!(d.boxes.select(1, 2).max().double_value(&[]) <= w as f64);
    }
}

#[test]
fn bad_ground_truth_is_a_typed_error() {
    let config = small_config();
    let (_vs, model) = model(&config);
    let batch = common::image_batch(&images(), &common::detectron2_input(), Device::Cpu);
    let error =
        model.forward_train(&batch, &[square(1.0, 1.0, 9.0, 9.0, 3), GtInstances::empty(Device::Cpu)]).unwrap_err();
    assert!(error.to_string().contains("num_classes"), "{error}");
    let error = model.forward_train(&batch, &[GtInstances::empty(Device::Cpu)]).unwrap_err();
    assert!(error.to_string().contains("1 targets for 2 images"), "{error}");
    let mut missing_mask = square(1.0, 1.0, 9.0, 9.0, 0);
    missing_mask.masks = GtMasks::Polygons(Vec::new());
    let error = model.forward_train(&batch, &[missing_mask, GtInstances::empty(Device::Cpu)]).unwrap_err();
    assert!(error.to_string().contains("1 boxes but 0 masks"), "{error}");
}
