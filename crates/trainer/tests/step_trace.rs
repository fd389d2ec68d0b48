//! The GPU-shaped training step (`[model.static_shapes]`, loader-made bitmap masks, a fixed RoIAlign sampling
//! ratio) dispatches the same operators on tensors of the same shapes for different images with different
//! instance counts: the precondition for capturing the step once as a CUDA graph and replaying it.

use std::path::Path;

use data::config::InputConfig;
use detector::ops::polygons_to_bitmask;
use detector::structures::{GtInstances, GtMasks, ImageBatch, TrainingTargets};
use tch::{Device, Kind, Tensor};
use trainer::config::Config;
use trainer::distributed::RankGroup;
use trainer::engine::{forward_backward_prepared, StepLog};
use trainer::model::{build_model, BuiltModel};
use trainer::op_count::{compare_traces, trace_ops};
use trainer::solver::Solver;

mod common;

use common::{temp_dir, tiny_model};

const HEIGHT: i64 = 64;
const WIDTH: i64 = 96;

/// The tiny test model with the GPU-shaped step.
fn config(dir: &Path) -> Config {
    let text = format!(
        "{model}[model.static_shapes]\nenabled = true\n[input]\nmask_format = \"bitmask\"\n\
         [solver]\nims_per_batch = 2\nbase_lr = 0.01\nwarmup_iters = 2\n",
        model = tiny_model(4)
            .replace("[model.box_head]\n", "[model.box_head]\npooler_sampling_ratio = 2\n")
            .replace("[model.mask_head]\n", "[model.mask_head]\npooler_sampling_ratio = 2\n")
    );
    let path = dir.join("static.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path, &[]).unwrap()
}

/// Two `HEIGHT` x `WIDTH` images drawn from `seed`, with `counts[i]` random box instances (rectangle masks) in
/// image `i`, as the loader gives them (targets on the host).
fn inputs(input: &InputConfig, seed: i64, counts: [i64; 2]) -> (ImageBatch, Vec<GtInstances>) {
    tch::manual_seed(seed);
    let pixels: Vec<Tensor> =
        (0..2).map(|_| Tensor::randint(256, [3, HEIGHT, WIDTH], (Kind::Uint8, Device::Cpu))).collect();
    let (images, image_sizes) = data::pixels::preprocess(&pixels, input, Device::Cpu).unwrap();
    let targets = counts
        .iter()
        .enumerate()
        .map(|(image, &count)| {
            let r = Vec::<f32>::try_from(Tensor::rand([count * 4], (Kind::Float, Device::Cpu))).unwrap();
            let mut boxes = Vec::new();
            let mut masks = Vec::new();
            for c in r.chunks_exact(4) {
                let (w, h) = ((0.2 + 0.5 * c[2] as f64) * WIDTH as f64, (0.2 + 0.5 * c[3] as f64) * HEIGHT as f64);
                let (x, y) = (c[0] as f64 * (WIDTH as f64 - w), c[1] as f64 * (HEIGHT as f64 - h));
                boxes.extend([x, y, x + w, y + h].map(|v| v as f32));
                masks.push(polygons_to_bitmask(&[vec![x, y, x + w, y, x + w, y + h, x, y + h]], HEIGHT, WIDTH));
            }
            GtInstances {
                boxes: Tensor::from_slice(&boxes).view([count, 4]),
                labels: Tensor::randint(4, [count], (Kind::Int64, Device::Cpu)),
                masks: GtMasks::Bitmaps(Tensor::stack(&masks, 0)),
                sampling_seed: Some(seed as u64 * 10 + image as u64),
            }
        })
        .collect();
    (ImageBatch { images, image_sizes }, targets)
}

#[test]
fn static_steps_on_different_images_dispatch_the_same_operators_on_the_same_shapes() {
    let dir = temp_dir("step-trace");
    let config = config(&dir);
    tch::manual_seed(0);
    let BuiltModel { vs, model } = build_model(&config, Device::Cpu, &RankGroup::single()).unwrap();
    let mut solver = Solver::from_var_store(&vs, &config.solver).unwrap();
    let mut log = StepLog::new();
    // The targets are checked, padded and uploaded on the host first (the copies into a graph's input buffers);
    // the device half is what a graph would capture.
    let prepare = |(batch, targets): (ImageBatch, Vec<GtInstances>)| {
        let prepared = model.prepare_targets(&batch, &targets).unwrap();
        (batch, prepared)
    };
    let mut step = |(batch, targets): &(ImageBatch, Vec<TrainingTargets>)| {
        let losses = forward_backward_prepared(&model, batch, targets, None, &solver.loss_multiplier()).unwrap();
        let prepared = solver.prepare_step().unwrap();
        let update = solver.update(&prepared, Some(&losses.values)).unwrap();
        log.record(&losses, 1, &update);
    };
    // Warm-up: the first steps create the momentum buffers and the per-shape constants.
    for seed in [1, 2] {
        step(&prepare(inputs(&config.input, seed, [3, 3])));
    }
    let (first, second) = (prepare(inputs(&config.input, 3, [2, 5])), prepare(inputs(&config.input, 4, [7, 1])));
    let ((), a) = trace_ops(|| step(&first)).unwrap();
    let ((), b) = trace_ops(|| step(&second)).unwrap();
    assert!(a.len() > 1000, "a training step dispatches thousands of operators, traced {}", a.len());
    let compared = compare_traces(&a, &b).unwrap_or_else(|difference| panic!("{difference}"));
    println!("{} operators, the same in both steps; inputs compared for {compared}", a.len());
    assert!(compared > a.len() / 10, "inputs compared for only {compared} of {} operators", a.len());
    let read = log.read().unwrap().unwrap();
    assert!(read.losses.values().all(|v| v.is_finite()) && read.failures == 0, "{read:?}");
}
