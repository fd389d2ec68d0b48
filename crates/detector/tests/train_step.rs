//! Training on two coco-mini images with the from-scratch V-19/GN recipe: every loss finite over 30 SGD steps,
//! `loss_rpn_cls`, `loss_rpn_loc`, `loss_cls` and `loss_mask` decreasing, and a gradient for every trainable
//! parameter.
//!
//! `loss_box_reg` is only required to stay bounded here: its targets are the offsets of freshly sampled
//! proposals, which a randomly initialised backbone and box head cannot tell apart within 30 steps, so it stays
//! flat (measured: first-5 mean 0.87, last-5 mean 0.92; it also rises early in detectron2 runs). That the box
//! regression does learn is tested on fixed RoIs in `roi_heads::tests::roi_head_losses_fall_on_fixed_rois`.

mod common;

use std::collections::BTreeMap;

use detector::{DetectorConfig, MaskRcnn};
use tch::{nn, Device, Kind, Tensor};

/// The scratch recipe with 16 sampled RoIs per image (at most 4 foreground) so that a CPU step takes about a
/// second. The two images have only large objects (at least 40% of the shorter side), so that even the untrained
/// RPN's proposals include more than 4 foreground RoIs per image: the foreground count is constant from the first
/// step and `loss_box_reg` measures regression rather than growing from ~0 while the RPN learns to find small
/// objects (ground-truth RoIs alone have zero regression targets).
fn small_scratch_config() -> DetectorConfig {
    let mut config = DetectorConfig::scratch("V-19", 80);
    config.roi_heads.batch_size_per_image = 16;
    config
}

const LOSSES: [&str; 5] = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"];

#[test]
fn scratch_v19_gn_overfits_two_images() {
    tch::manual_seed(0);
    let device = Device::Cpu;
    let config = small_scratch_config();
    let vs = nn::VarStore::new(device);
    let model = MaskRcnn::new(&vs.root(), &config).unwrap();
    let samples = common::load_train_samples(&[499716, 425988], 160);
    let images: Vec<Tensor> = samples.iter().map(|s| s.image.shallow_clone()).collect();
    let batch = common::image_batch(&images, &common::detectron2_input(), device);
    let targets: Vec<_> = samples.iter().map(|s| s.gt.to_device(device)).collect();

    let params: Vec<(String, Tensor)> =
        vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect::<BTreeMap<_, _>>().into_iter().collect();
    assert!(params.iter().any(|(n, _)| n.starts_with("roi_heads.mask_head.")), "mask head variables are named");
    let momentum: Vec<Tensor> = params.iter().map(|(_, p)| p.zeros_like()).collect();
    let (lr, mu) = (0.01, 0.9);
    let mut history: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut gradient_seen = vec![false; params.len()];
    for step in 0..30 {
        let losses = model.forward_train(&batch, &targets).unwrap();
        assert_eq!(losses.keys().map(String::as_str).collect::<Vec<_>>().len(), 5, "{:?}", losses.keys());
        let total = LOSSES.iter().map(|name| losses[*name].shallow_clone()).reduce(|a, b| a + b).unwrap();
        for name in LOSSES {
            let v = losses[name].double_value(&[]);
            assert!(v.is_finite(), "step {step}: {name} = {v}");
            history.entry(name).or_default().push(v);
        }
        for (_, p) in &params {
            p.shallow_clone().zero_grad();
        }
        total.backward();
        for ((_, p), seen) in params.iter().zip(gradient_seen.iter_mut()) {
            let g = p.grad();
            *seen |= g.defined() && g.abs().sum(Kind::Double).double_value(&[]) > 0.0;
        }
        tch::no_grad(|| {
            for ((_, p), buf) in params.iter().zip(&momentum) {
                let g = p.grad();
                let _ = buf.shallow_clone().g_mul_scalar_(mu).g_add_(&g);
                let _ = p.shallow_clone().g_sub_(&(buf * lr));
            }
        });
    }
    let missing: Vec<&str> =
        params.iter().zip(&gradient_seen).filter(|(_, &seen)| !seen).map(|((n, _), _)| n.as_str()).collect();
    assert!(missing.is_empty(), "parameters that never received a gradient: {missing:?}");
    for name in LOSSES {
        let h = &history[name];
        let first: f64 = h[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = h[h.len() - 5..].iter().sum::<f64>() / 5.0;
        eprintln!(
            "{name}: first 5 mean {first:.4}, last 5 mean {last:.4}; {:?}",
            h.iter().map(|v| (v * 1e4).round() / 1e4).collect::<Vec<_>>()
        );
        if name == "loss_box_reg" {
            assert!(last < 1.5 * first, "{name} grew: {h:?}");
        } else {
            assert!(last < first, "{name} did not decrease: {h:?}");
        }
    }
}
