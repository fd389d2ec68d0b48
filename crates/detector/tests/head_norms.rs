//! BatchNorm and SyncBN in the FPN, the RPN head and the RoI heads (`model.fpn.norm`, `model.rpn.norm` with
//! `model.rpn.num_conv = 2`, `model.box_head.norm`, `model.mask_head.norm`): they build with detectron2's parameter names, train on two coco-mini images (losses
//! finite and falling), use their running statistics at test time, and SyncBN's count-weighted cross-process path
//! equals BN when it runs in one process (the weighting over several processes and the empty-batch case are unit
//! tests of `backbone::norm`).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use backbone::BatchStatsReducer;
use detector::config::HeadNorm;
use detector::detectron2::detectron2_variable_name;
use detector::{DetectorConfig, GtInstances, ImageBatch, MaskRcnn};
use tch::{nn, Device, Kind, Tensor};

/// The all-reduce of a world of one process: SyncBN takes its cross-process path with nothing to combine.
#[derive(Debug)]
struct OneProcess;

impl BatchStatsReducer for OneProcess {
    fn all_reduce_mean(&self, stats: &Tensor) -> Tensor {
        stats.shallow_clone()
    }
}

/// A world of one process that counts its all-reduces: every rank must issue the same number per step, whatever
/// its images hold, or the ranks' collectives pair up wrongly and hang.
#[derive(Debug, Default)]
struct CountingProcess(AtomicUsize);

impl BatchStatsReducer for CountingProcess {
    fn all_reduce_mean(&self, stats: &Tensor) -> Tensor {
        self.0.fetch_add(1, Ordering::SeqCst);
        stats.shallow_clone()
    }
}

/// A small scratch model with `norm` in the FPN and both heads.
fn config(norm: HeadNorm) -> DetectorConfig {
    let mut config = DetectorConfig::scratch("V-19-slim-dw", 80);
    config.backbone.gn_groups = 16;
    config.fpn.out_channels = 64;
    config.fpn.norm = norm;
    config.box_head.conv_dim = 64;
    config.box_head.fc_dim = 128;
    config.box_head.norm = norm;
    config.mask_head.conv_dim = 64;
    config.mask_head.norm = norm;
    config.rpn.num_conv = 2;
    config.rpn.norm = norm;
    config.rpn.pre_nms_topk_train = 400;
    config.rpn.post_nms_topk_train = 200;
    config.roi_heads.batch_size_per_image = 32;
    config
}

fn build(norm: HeadNorm, reducer: Option<Arc<dyn BatchStatsReducer>>) -> (nn::VarStore, MaskRcnn) {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MaskRcnn::with_reducer(&vs.root(), &config(norm), reducer).unwrap();
    (vs, model)
}

/// Two coco-mini training images (shorter side 128) as a batch, with their ground truth.
fn two_images() -> (ImageBatch, Vec<GtInstances>) {
    let samples = common::load_train_samples(&[499716, 425988], 128);
    let images: Vec<Tensor> = samples.iter().map(|s| s.image.shallow_clone()).collect();
    let batch = common::image_batch(&images, &common::detectron2_input(), Device::Cpu);
    (batch, samples.iter().map(|s| s.gt.to_device(Device::Cpu)).collect())
}

#[test]
fn bn_and_sync_bn_heads_train_and_predict_with_detectron2_names() {
    tch::set_num_threads(2);
    let (batch, targets) = two_images();
    for norm in [HeadNorm::BN, HeadNorm::SyncBN] {
        let (vs, model) = build(norm, Some(Arc::new(OneProcess)));
        let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let names =
            ["fpn.output3.norm.running_var", "rpn.conv.conv1.norm.weight", "roi_heads.mask_head.mask_fcn4.norm.bias"];
        for name in names {
            assert!(variables.contains_key(name), "{norm:?}: no {name}");
        }
        let unnamed: Vec<&String> =
            variables.keys().filter(|n| detectron2_variable_name(&model, n).is_none()).collect();
        assert!(unnamed.is_empty(), "{norm:?}: no detectron2 name for {unnamed:?}");
        assert!(!variables.contains_key("fpn.output3.bias"), "{norm:?}: a convolution followed by a norm has a bias");

        let params: Vec<Tensor> = vs.trainable_variables();
        let momentum: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
        let mut history: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for step in 0..16 {
            let losses = model.forward_train(&batch, &targets).unwrap();
            for (name, loss) in &losses {
                let value = loss.double_value(&[]);
                assert!(value.is_finite(), "{norm:?}: step {step}: {name} = {value}");
                history.entry(name.clone()).or_default().push(value);
            }
            for p in &params {
                p.shallow_clone().zero_grad();
            }
            losses.into_values().reduce(|a, b| a + b).unwrap().backward();
            tch::no_grad(|| {
                for (p, buf) in params.iter().zip(&momentum) {
                    let _ = buf.shallow_clone().g_mul_scalar_(0.9).g_add_(&p.grad());
                    let _ = p.shallow_clone().g_sub_(&(buf * 0.01));
                }
            });
        }
        for name in ["loss_rpn_cls", "loss_cls", "loss_mask"] {
            let h = &history[name];
            let first: f64 = h[..4].iter().sum::<f64>() / 4.0;
            let last: f64 = h[h.len() - 4..].iter().sum::<f64>() / 4.0;
            assert!(last < first, "{norm:?}: {name} did not decrease: {h:?}");
        }
        let running = &variables["roi_heads.box_head.conv1.norm.running_mean"];
        assert!(running.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{norm:?}: running mean never updated");
        // Test time uses the running statistics and leaves them alone.
        let before = running.copy();
        let detections = model.inference(&batch, &batch.image_sizes).unwrap();
        assert!(running.equal(&before), "{norm:?}: inference changed the running statistics");
        assert!(detections.iter().all(|d| d.scores.isfinite().all().int64_value(&[]) == 1), "{norm:?}");
    }
}

#[test]
fn sync_bn_in_one_process_equals_bn() {
    tch::set_num_threads(2);
    let (batch, _) = two_images();
    // The pyramid in training mode (batch statistics): SyncBN's count-weighted cross-process path against BN.
    // (Whole-model losses are not compared: a rounding-level difference flips proposal top-k near-ties.)
    // The same weights in both (copied: tests in other threads draw from libtorch's global generator too).
    let (bn_vs, bn_model) = build(HeadNorm::BN, None);
    let (mut sync_vs, sync_model) = build(HeadNorm::SyncBN, Some(Arc::new(OneProcess)));
    sync_vs.copy(&bn_vs).unwrap();
    let bn = bn_model.features(&batch.images, true);
    let sync = sync_model.features(&batch.images, true);
    for (level, (a, b)) in bn.iter().zip(&sync).enumerate() {
        let error = (a - b).abs().max().double_value(&[]) / a.abs().max().double_value(&[]);
        assert!(error < 1e-5, "level {level}: SyncBN differs from BN by {error} (relative to the largest value)");
    }
}

/// detectron2's `NaiveSyncBatchNorm` hazard: a rank whose images have no foreground RoI (no annotations, or an
/// LSJ crop that removed them) must still run its mask head, so its SyncBN joins every all-reduce the other ranks
/// make (with zero weight), and its mask head parameters get gradients like theirs (zeros).
#[test]
fn an_image_without_foreground_joins_every_sync_bn_all_reduce() {
    tch::set_num_threads(2);
    let (batch, targets) = two_images();
    let counter = Arc::new(CountingProcess::default());
    let (vs, model) = build(HeadNorm::SyncBN, Some(counter.clone()));
    let mut counts = Vec::new();
    for targets in [targets, vec![GtInstances::empty(Device::Cpu), GtInstances::empty(Device::Cpu)]] {
        vs.trainable_variables().iter().for_each(|p| p.shallow_clone().zero_grad());
        let before = counter.0.load(Ordering::SeqCst);
        let losses = model.forward_train(&batch, &targets).unwrap();
        counts.push(counter.0.load(Ordering::SeqCst) - before);
        assert_eq!(losses["loss_mask"].double_value(&[]) == 0.0, targets[0].is_empty());
        losses.into_values().reduce(|a, b| a + b).unwrap().backward();
        let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let grad = variables["roi_heads.mask_head.mask_fcn1.norm.weight"].grad();
        assert!(grad.defined(), "the mask head got no gradient (empty targets: {})", targets[0].is_empty());
    }
    assert!(counts[0] > 0);
    assert_eq!(counts[0], counts[1], "SyncBN all-reduces with and without foreground RoIs differ");
}
