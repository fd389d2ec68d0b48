//! The `channels_last` option: training and inference in channels-last (NHWC) memory give the standard layout's
//! results up to float rounding, checkpoints are written in the standard layout, and a channels-last run resumes
//! exactly.

use std::collections::BTreeMap;
use std::path::Path;

use detector::structures::ImageBatch;
use tch::{Device, Kind, Tensor};
use trainer::config::Config;
use trainer::distributed::RankGroup;
use trainer::layout::{images_to_channels_last, to_channels_last, variables_to_channels_last};
use trainer::model::{build_for_dataset, BuiltModel};
use trainer::solver::{Solver, SolverConfig};

mod common;

use common::{checkpoint_weights, metrics, stderr, temp_dir, tiny_config, trainer};

/// Every loss of every logged iteration, by iteration.
fn losses(run: &Path) -> Vec<BTreeMap<String, f64>> {
    metrics(run)
        .iter()
        .map(|record| {
            record
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.starts_with("loss_") || *k == "total_loss")
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                .collect::<BTreeMap<String, f64>>()
        })
        .filter(|losses| !losses.is_empty())
        .collect()
}

fn train(config: &str, out: &Path, extra: &[&str]) {
    let mut args = vec!["train", config, "--output", out.to_str().unwrap(), "--set", "solver.max_iter=4"];
    args.extend_from_slice(extra);
    let output = trainer(&args);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn channels_last_training_matches_the_standard_layout_and_resumes_exactly() {
    let dir = temp_dir("channels-last");
    let config = tiny_config(&dir);
    let standard = dir.join("standard");
    let nhwc = dir.join("nhwc");
    train(&config, &standard, &[]);
    // Evaluation at the end runs channels-last too.
    train(&config, &nhwc, &["--set", "channels_last=true", "--set", "eval.at_end=true"]);
    let last = metrics(&nhwc).pop().unwrap();
    assert!(last["segm/AP"].is_number() && last["bbox/AP"].is_number(), "{last}");

    let (a, b) = (losses(&standard), losses(&nhwc));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    for (iteration, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (key, &x) in a {
            let y = b[key];
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-3), "iteration {}: {key} {x} vs {y}", iteration + 1);
        }
    }
    // The checkpoint holds the standard layout: the same weights as the standard run up to rounding (a raw
    // channels-last dump would permute every 3x3 kernel, changing values by about their size, ~0.1). Summation
    // order alone (1 vs 2 threads in the standard layout) moves them by up to ~5e-6 after these 4 steps.
    let (wa, wb) =
        (checkpoint_weights(&standard.join("model_0000004")), checkpoint_weights(&nhwc.join("model_0000004")));
    assert_eq!(wa.len(), wb.len());
    for ((name, ta), (name_b, tb)) in wa.iter().zip(&wb) {
        assert_eq!(name, name_b);
        let difference = (ta - tb).abs().max().double_value(&[]);
        assert!(difference <= 1e-4, "{name} differs by up to {difference}");
    }

    // A channels-last run stopped at iteration 2 and resumed reproduces the uninterrupted one exactly.
    let resumed = dir.join("resumed");
    train(&config, &resumed, &["--set", "channels_last=true", "--set", "solver.max_iter=2"]);
    train(&config, &resumed, &["--set", "channels_last=true", "--resume"]);
    for ((name, ta), (_, tb)) in wb.iter().zip(&checkpoint_weights(&resumed.join("model_0000004"))) {
        assert!(ta.equal(tb), "{name} differs after a channels-last resume");
    }
    assert_eq!(losses(&nhwc), losses(&resumed));
}

#[test]
fn channels_last_inference_matches_the_standard_layout() {
    let dir = temp_dir("channels-last-infer");
    let mut config = Config::load(Path::new(&tiny_config(&dir)), &[]).unwrap();
    config.model.roi_heads.score_thresh_test = 0.0;
    tch::manual_seed(5);
    let BuiltModel { vs, model } = build_for_dataset(&config, 4, Device::Cpu, &RankGroup::single()).unwrap();
    let pixels: Vec<Tensor> = (0..2).map(|_| Tensor::randint(256, [3, 64, 96], (Kind::Uint8, Device::Cpu))).collect();
    let (images, image_sizes) = data::pixels::preprocess(&pixels, &config.input, Device::Cpu).unwrap();
    let batch = ImageBatch { images, image_sizes };
    let sizes = batch.image_sizes.clone();
    let standard = model.inference(&batch, &sizes).unwrap();

    variables_to_channels_last(&vs);
    let weight =
        vs.variables().into_iter().find(|(_, t)| t.dim() == 4 && t.size()[1] > 1 && t.size()[2] > 1).unwrap().1;
    assert_eq!(weight.stride(), to_channels_last(&weight.contiguous()).stride());
    assert!(!weight.is_contiguous(), "the conv weights are channels-last now");
    let batch = images_to_channels_last(batch);
    // The layout carries through the network: the backbone's maps come out channels-last.
    for map in tch::no_grad(|| model.backbone().forward_t(&batch.images, false)) {
        assert_eq!(map.stride(), to_channels_last(&map.contiguous()).stride(), "a backbone map is not channels-last");
    }
    let nhwc = model.inference(&batch, &sizes).unwrap();

    for (image, (a, b)) in standard.iter().zip(&nhwc).enumerate() {
        assert!(a.boxes.size()[0] > 0, "image {image}: no detections to compare");
        assert_eq!(a.boxes.size(), b.boxes.size(), "image {image}: detection count");
        assert!(a.scores.allclose(&b.scores, 1e-4, 1e-6, false), "image {image}: scores");
        assert!(a.boxes.allclose(&b.boxes, 1e-4, 1e-3, false), "image {image}: boxes");
        assert!(a.labels.equal(&b.labels), "image {image}: labels");
        let differing = a.masks.ne_tensor(&b.masks).sum(Kind::Int64).double_value(&[]);
        assert!(differing <= 1e-4 * a.masks.numel() as f64, "image {image}: {differing} mask pixels differ");
    }
}

#[test]
fn sgd_keeps_channels_last_parameters_channels_last_with_the_same_values() {
    let config = SolverConfig { warmup_iters: 0, ..SolverConfig::default() };
    tch::manual_seed(0);
    let initial = Tensor::randn([8, 4, 3, 3], (Kind::Float, Device::Cpu));
    let input = Tensor::randn([2, 4, 6, 6], (Kind::Float, Device::Cpu));
    let run = |channels_last: bool| -> Tensor {
        let start = if channels_last { to_channels_last(&initial) } else { initial.copy() };
        let weight = start.set_requires_grad(true);
        let x = if channels_last { to_channels_last(&input) } else { input.shallow_clone() };
        let mut solver =
            Solver::new(BTreeMap::from([("conv.weight".to_string(), weight.shallow_clone())]), &config).unwrap();
        for _ in 0..3 {
            x.conv2d(&weight, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1).square().sum(Kind::Float).backward();
            solver.step().unwrap();
        }
        assert_eq!(weight.is_contiguous(), !channels_last, "the update keeps the parameter's layout");
        let momentum = &solver.state_dict().unwrap().tensors[0].1;
        assert_eq!(momentum.stride(), weight.stride(), "the momentum buffer follows the parameter's layout");
        weight.detach()
    };
    let (standard, nhwc) = (run(false), run(true));
    assert!(standard.allclose(&nhwc, 1e-5, 1e-6, false), "max {}", (standard - nhwc).abs().max().double_value(&[]));
}
