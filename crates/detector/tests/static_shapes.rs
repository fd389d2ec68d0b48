//! The training step with fixed shapes (`[model.static_shapes]`: padded ground truth, fixed-size proposals with
//! NMS on the device, fixed foreground slots) against detectron2's (lists cut on the host): when every candidate is
//! sampled, so that both sample the same set, the losses and gradients are the same and the device NMS converged.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;

use detector::{DetectorConfig, MaskRcnn};
use tch::{nn, Device, Tensor};

/// Held by each test of this file: they seed libtorch's one global RNG and must not interleave.
static RNG: Mutex<()> = Mutex::new(());

/// V-19 with narrow heads, short proposal lists and samplers that take every candidate.
fn take_all_config(static_shapes: bool) -> DetectorConfig {
    let mut config = DetectorConfig::scratch("V-19", 80);
    config.fpn.out_channels = 64;
    config.box_head.conv_dim = 64;
    config.box_head.fc_dim = 128;
    config.mask_head.conv_dim = 64;
    config.rpn.pre_nms_topk_train = 300;
    config.rpn.post_nms_topk_train = 100;
    config.rpn.batch_size_per_image = 1 << 20;
    config.roi_heads.batch_size_per_image = 1 << 20;
    config.static_shapes.enabled = static_shapes;
    // Both images have fewer than 8 instances (checked below): their padding must change nothing.
    config.static_shapes.max_instances = 8;
    config
}

/// Losses and gradients (by variable name) of one training step of a freshly seeded model.
fn one_step(config: &DetectorConfig) -> (BTreeMap<String, f64>, BTreeMap<String, Tensor>) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MaskRcnn::new(&vs.root(), config).unwrap();
    let samples = common::load_train_samples(&[499716, 425988], 192);
    let images: Vec<Tensor> = samples.iter().map(|s| s.image.shallow_clone()).collect();
    let batch = common::image_batch(&images, &common::detectron2_input(), Device::Cpu);
    let targets: Vec<_> = samples.iter().map(|s| s.gt.to_device(Device::Cpu)).collect();
    assert!(targets.iter().all(|t| t.len() < config.static_shapes.max_instances));
    let _ = detector::diagnostics::take();
    let losses = model.forward_train(&batch, &targets).unwrap();
    let total = losses.values().map(|l| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
    total.backward();
    let counters = detector::diagnostics::take();
    if let Some(unconverged) = counters.get("rpn_nms_unconverged") {
        assert_eq!(unconverged.int64_value(&[]), 0, "the device NMS converged");
    }
    assert_eq!(counters.contains_key("rpn_nms_unconverged"), config.static_shapes.enabled);
    let values = losses.iter().map(|(k, v)| (k.clone(), v.double_value(&[]))).collect();
    let grads = vs.variables().into_iter().filter(|(_, v)| v.requires_grad()).map(|(k, v)| (k, v.grad())).collect();
    (values, grads)
}

#[test]
fn fixed_shape_step_equals_detectron2_step_when_every_candidate_is_sampled() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (dynamic, dynamic_grads) = one_step(&take_all_config(false));
    let (fixed, fixed_grads) = one_step(&take_all_config(true));
    for (name, value) in &dynamic {
        let error = (fixed[name] - value).abs() / value.abs().max(1e-6);
        eprintln!("{name}: detectron2's way {value:.8e}, fixed shapes {:.8e}, relative {error:.1e}", fixed[name]);
        assert!(error < 1e-5, "{name} differs: {value} vs {}", fixed[name]);
    }
    let mut worst: f64 = 0.0;
    for (name, grad) in &dynamic_grads {
        let difference = (&fixed_grads[name] - grad).norm().double_value(&[]);
        let scale = grad.norm().double_value(&[]).max(1e-12);
        worst = worst.max(difference / scale);
    }
    eprintln!("{} gradients, largest relative L2 difference {worst:.1e}", dynamic_grads.len());
    assert!(worst < 1e-4, "gradients differ by {worst:.1e} (relative L2)");
}

/// What the step computes from the data has fixed shapes under static shapes: ground truth of 3 and of 11 instances
/// pads to the same 16 rows, and proposals from different maps (a different number survives NMS) fill the same
/// slots (`post_nms_topk_train`, or every box that reaches NMS when fewer); detectron2's way gives data-dependent
/// shapes for both.
#[test]
fn static_shapes_fix_the_shapes_of_ground_truth_and_proposals() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    use detector::config::{AnchorConfig, RpnConfig};
    use detector::rpn::Rpn;
    use detector::{GtInstances, GtMasks, TrainingTargets};

    let gt = |count: i64| GtInstances {
        boxes: Tensor::from_slice(&[10.0f32, 10.0, 50.0, 60.0]).repeat([count, 1]),
        labels: Tensor::zeros([count], (tch::Kind::Int64, Device::Cpu)),
        masks: GtMasks::Polygons((0..count).map(|_| vec![vec![10.0, 10.0, 50.0, 10.0, 50.0, 60.0]]).collect()),
        sampling_seed: Some(1),
    };
    let shapes = |t: &TrainingTargets| (t.gt.boxes.size(), t.gt.labels.size(), t.valid.as_ref().map(Tensor::size));
    let padded = |count| TrainingTargets::new(&gt(count), Device::Cpu, Some(16));
    assert_eq!(shapes(&padded(3)), shapes(&padded(11)));
    assert_eq!(shapes(&padded(3)).0, [16, 4]);
    assert_eq!(padded(3).valid.unwrap().sum(tch::Kind::Int64).int64_value(&[]), 3);
    let unpadded = |count| TrainingTargets::new(&gt(count), Device::Cpu, None);
    assert_ne!(shapes(&unpadded(3)), shapes(&unpadded(11)));

    // At most 300 + 300 + 192 + 48 + 12 = 852 boxes reach NMS, fewer survive: every survivor has a slot.
    let config = RpnConfig { pre_nms_topk_train: 300, post_nms_topk_train: 1000, ..Default::default() };
    let proposal_counts = |static_shapes: bool| {
        let vs = nn::VarStore::new(Device::Cpu);
        let rpn = Rpn::new(&vs.root(), &config, &AnchorConfig::default(), (8, &[4, 8, 16, 32, 64]), None)
            .unwrap()
            .with_static_shapes(static_shapes.then_some(32));
        let targets = [TrainingTargets::new(&gt(3), Device::Cpu, static_shapes.then_some(16))];
        [3, 4].map(|seed| {
            tch::manual_seed(seed);
            // Large activations, so that the untrained head's box deltas move the boxes off the anchor grid.
            let features: Vec<Tensor> = [32, 16, 8, 4, 2]
                .iter()
                .map(|&side| Tensor::randn([1, 8, side, side], (tch::Kind::Float, Device::Cpu)) * 300.0)
                .collect();
            let (proposals, _) = rpn.forward(&features, (128, 128), &[(128, 128)], Some(&targets));
            let kept = proposals[0].valid.as_ref().map(|v| v.sum(tch::Kind::Int64).int64_value(&[]));
            (proposals[0].boxes.size(), kept)
        })
    };
    let [a, b] = proposal_counts(true);
    assert_eq!((a.0.clone(), b.0.clone()), (vec![852, 4], vec![852, 4]), "fixed proposal slots");
    assert_ne!(a.1, b.1, "different maps keep different numbers of proposals");
    let [a, b] = proposal_counts(false);
    assert_ne!(a.0, b.0, "detectron2's proposal lists have the surviving count as their length");
}
