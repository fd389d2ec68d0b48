//! Solver tests: detectron2's LR schedule values, SGD parity with `torch.optim.SGD` (momentum, Nesterov,
//! weight-decay groups, clipping) over 20 steps, exact continuation after a state round trip, and the EMA of the
//! weights against the same update rule in PyTorch over 20 steps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};
use trainer::solver::{
    EmaConfig, LrSchedule, LrSchedulerKind, ModelEma, Solver, SolverConfig, SolverState, WarmupMethod,
};

fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup first", python.display());
    python
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(name)
}

/// Expected values from fvcore + detectron2's composition (tests/python/lr_schedule_expected.py).
#[test]
fn lr_schedule_matches_detectron2() {
    type Case = (LrSchedulerKind, f64, u64, Vec<u64>, f64, u64, WarmupMethod, f64, Vec<(u64, f64)>);
    let cases: Vec<Case> = vec![
        (
            LrSchedulerKind::Multistep,
            0.02,
            90000,
            vec![60000, 80000],
            0.1,
            1000,
            WarmupMethod::Linear,
            0.0,
            vec![
                (0, 2e-05),
                (1, 3.998e-05),
                (500, 0.01001),
                (999, 0.01998002),
                (1000, 0.02),
                (1001, 0.02),
                (59999, 0.02),
                (60000, 0.002),
                (60001, 0.002),
                (79999, 0.002),
                (80000, 0.00020000000000000004),
                (89999, 0.00020000000000000004),
                (90000, 0.00020000000000000004),
            ],
        ),
        (
            LrSchedulerKind::Multistep,
            0.02,
            270000,
            vec![210000, 250000, 300000],
            0.1,
            1000,
            WarmupMethod::Constant,
            0.0,
            vec![
                (0, 2e-05),
                (999, 2e-05),
                (1000, 0.02),
                (209999, 0.02),
                (210000, 0.002),
                (250000, 0.00020000000000000004),
                (269999, 0.00020000000000000004),
            ],
        ),
        (
            LrSchedulerKind::Cosine,
            0.01,
            1000,
            vec![],
            0.1,
            100,
            WarmupMethod::Linear,
            0.0001,
            vec![
                (0, 1e-05),
                (1, 0.0001074772975566101),
                (50, 0.004883864877830505),
                (99, 0.009660252458104401),
                (100, 0.009757729755661011),
                (101, 0.009752901044548819),
                (500, 0.00505),
                (999, 0.00010002442725080185),
                (1000, 0.0001),
            ],
        ),
        (
            LrSchedulerKind::Multistep,
            0.05,
            300,
            vec![200],
            0.5,
            0,
            WarmupMethod::Linear,
            0.0,
            vec![(0, 0.05), (1, 0.05), (199, 0.05), (200, 0.025), (299, 0.025)],
        ),
    ];
    for (kind, base_lr, max_iter, steps, gamma, warmup_iters, warmup_method, base_lr_end, expected) in cases {
        let config = SolverConfig {
            lr_scheduler: kind,
            base_lr,
            max_iter,
            steps,
            gamma,
            warmup_iters,
            warmup_method,
            base_lr_end,
            warmup_factor: 0.001,
            ..SolverConfig::default()
        };
        let schedule = LrSchedule::new(&config);
        for (iteration, lr) in expected {
            assert_eq!(schedule.lr(iteration), lr, "{kind:?} max_iter {max_iter}: iteration {iteration}");
        }
    }
}

const NAMES: [(&str, &[i64]); 6] = [
    ("backbone.stem.conv.weight", &[4, 3, 3, 3]),
    ("backbone.stem.norm.weight", &[4]),
    ("backbone.stem.norm.bias", &[4]),
    ("head.fc.weight", &[5, 8]),
    ("head.fc.bias", &[5]),
    ("head.frozen.weight", &[3]),
];

fn initial_params() -> BTreeMap<String, Tensor> {
    tch::manual_seed(11);
    NAMES
        .iter()
        .map(|(name, shape)| {
            let tensor = Tensor::randn(*shape, (Kind::Float, Device::Cpu));
            let trainable = !name.contains("frozen");
            (name.to_string(), tensor.set_requires_grad(trainable))
        })
        .collect()
}

fn gradients(steps: usize) -> Vec<BTreeMap<String, Tensor>> {
    tch::manual_seed(12);
    (0..steps)
        .map(|_| {
            NAMES
                .iter()
                .map(|(name, shape)| (name.to_string(), Tensor::randn(*shape, (Kind::Float, Device::Cpu))))
                .collect()
        })
        .collect()
}

/// Gives every trainable parameter exactly `grads[name]` as gradient (d/dp sum(p * g) = g).
fn backward_with(params: &BTreeMap<String, Tensor>, grads: &BTreeMap<String, Tensor>, multiplier: Tensor) {
    let loss = params
        .iter()
        .filter(|(_, p)| p.requires_grad())
        .map(|(name, p)| (p * &grads[name]).sum(Kind::Float))
        .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |acc, term| acc + term);
    (loss * multiplier).backward();
}

fn detached(params: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    params.iter().map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(p.requires_grad()))).collect()
}

fn solver_config(nesterov: bool, clip: Option<f64>, weight_decay_bias: Option<f64>) -> SolverConfig {
    let mut config = SolverConfig {
        max_iter: 20,
        base_lr: 0.1,
        steps: vec![12],
        warmup_iters: 5,
        weight_decay: 1e-2,
        weight_decay_norm: 0.0,
        weight_decay_bias,
        nesterov,
        ..SolverConfig::default()
    };
    if let Some(max_norm) = clip {
        config.clip_gradients.enabled = true;
        config.clip_gradients.max_norm = max_norm;
    }
    config
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn compare_with_torch(tag: &str, config: &SolverConfig) {
    const STEPS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let params = initial_params();
    let grads = gradients(STEPS);
    let initial: Vec<(String, Tensor)> = params.iter().map(|(n, p)| (n.clone(), p.detach().copy())).collect();
    Tensor::write_safetensors(&initial, dir.path().join("init.safetensors")).unwrap();
    let flat: Vec<(String, Tensor)> = grads
        .iter()
        .enumerate()
        .flat_map(|(step, g)| g.iter().map(move |(n, t)| (format!("{step}/{n}"), t.shallow_clone())))
        .collect();
    Tensor::write_safetensors(&flat, dir.path().join("grads.safetensors")).unwrap();

    let mut solver = Solver::new(params.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(), config).unwrap();
    let decays: BTreeMap<String, f64> =
        solver.sgd().param_groups().into_iter().map(|(n, wd)| (n.to_string(), wd)).collect();
    assert!(!decays.contains_key("head.frozen.weight"), "frozen tensors are not optimized");
    let mut lrs = Vec::new();
    for step_grads in &grads {
        backward_with(&params, step_grads, solver.loss_multiplier());
        lrs.push(solver.step().unwrap().lr);
    }
    let oracle_config = serde_json::json!({
        "momentum": config.momentum,
        "nesterov": config.nesterov,
        "lrs": lrs,
        "weight_decay": decays,
        "clip_max_norm": config.clip_gradients.enabled.then_some(config.clip_gradients.max_norm),
    });
    std::fs::write(dir.path().join("config.json"), oracle_config.to_string()).unwrap();
    let status = Command::new(python()).arg(script("sgd_reference.py")).arg(dir.path()).status().unwrap();
    assert!(status.success(), "sgd_reference.py failed");
    let expected: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("torch.safetensors")).unwrap().into_iter().collect();
    let state = solver.state_dict().unwrap();
    let buffers: BTreeMap<&str, &Tensor> = state.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut worst = 0.0f64;
    for name in decays.keys() {
        worst = worst.max(max_abs_diff(&params[name], &expected[name]));
        let buffer_name = format!("momentum_buffer.{name}");
        worst = worst.max(max_abs_diff(buffers[buffer_name.as_str()], &expected[&buffer_name]));
    }
    println!(
        "{tag}: max |ours - torch.optim.SGD| over parameters and momentum buffers after {STEPS} steps = {worst:e}"
    );
    assert_eq!(worst, 0.0, "{tag}: differs from torch.optim.SGD (expected bit-identical)");
    // Compared with this run's own snapshot: regenerating the initial values would race with the other tests
    // on libtorch's global generator (tests run in parallel threads).
    let frozen_before = initial.iter().find(|(n, _)| n == "head.frozen.weight").map(|(_, t)| t).unwrap();
    assert_eq!(max_abs_diff(&params["head.frozen.weight"], frozen_before), 0.0);
}

#[test]
fn sgd_matches_torch_with_momentum_and_decay_groups() {
    compare_with_torch("momentum", &solver_config(false, None, None));
}

#[test]
fn sgd_matches_torch_with_nesterov_bias_decay_and_clipping() {
    compare_with_torch("nesterov+clip", &solver_config(true, Some(3.0), Some(5e-3)));
}

#[test]
fn resuming_from_state_dict_continues_bit_identically() {
    let config = solver_config(true, Some(3.0), None);
    let grads = gradients(12);
    let straight = initial_params();
    let mut solver =
        Solver::new(straight.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(), &config).unwrap();
    let mut halfway: Option<(BTreeMap<String, Tensor>, SolverState)> = None;
    for (step, g) in grads.iter().enumerate() {
        if step == 6 {
            halfway = Some((detached(&straight), solver.state_dict().unwrap()));
        }
        backward_with(&straight, g, solver.loss_multiplier());
        solver.step().unwrap();
    }
    let (resumed, state) = halfway.unwrap();
    let mut second =
        Solver::new(resumed.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(), &config).unwrap();
    second.load_state_dict(&state).unwrap();
    assert_eq!(second.iteration(), 6);
    for g in &grads[6..] {
        backward_with(&resumed, g, second.loss_multiplier());
        second.step().unwrap();
    }
    for (name, tensor) in &straight {
        assert!(tensor.equal(&resumed[name]), "{name} differs after resume");
    }

    let mut mismatched = Solver::new(
        [("other.weight".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true))].into(),
        &config,
    )
    .unwrap();
    let message = mismatched.load_state_dict(&state).unwrap_err().to_string();
    assert!(message.contains("unknown parameter `backbone.stem.conv.weight`"), "{message}");
}

#[test]
fn accumulation_and_loss_scale_multiply_the_loss() {
    let mut config = solver_config(false, None, None);
    config.accumulate = 4;
    config.ims_per_batch = 16;
    config.amp.enabled = true;
    let params = initial_params();
    let mut solver =
        Solver::new(params.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(), &config).unwrap();
    assert_eq!(solver.loss_multiplier().double_value(&[]), 65536.0 / 4.0);
    // Four micro-batches of the same gradient, scaled: the step sees exactly that gradient once.
    let grads = gradients(1);
    for _ in 0..4 {
        backward_with(&params, &grads[0], solver.loss_multiplier());
    }
    let sum_before = solver.sgd().gradients().iter().map(|g| g.abs().sum(Kind::Double).double_value(&[])).sum::<f64>();
    let expected = grads[0]
        .iter()
        .filter(|(n, _)| !n.contains("frozen"))
        .map(|(_, g)| g.abs().sum(Kind::Double).double_value(&[]))
        .sum::<f64>();
    assert!((sum_before / 65536.0 - expected).abs() < 1e-4 * expected);
    let report = solver.step().unwrap();
    assert!(!report.skipped);
    assert_eq!(report.loss_scale, Some(65536.0));
    // An infinite gradient skips the step, leaves the weights alone and halves the scale.
    let before = detached(&params);
    let mut infinite = gradients(1).remove(0);
    infinite.insert("head.fc.bias".into(), Tensor::full([5], f64::INFINITY, (Kind::Float, Device::Cpu)));
    backward_with(&params, &infinite, solver.loss_multiplier());
    let report = solver.step().unwrap();
    assert!(report.skipped);
    assert_eq!(report.loss_scale, Some(32768.0));
    for (name, tensor) in &params {
        assert!(tensor.equal(&before[name]), "{name} changed on a skipped step");
    }
}

#[test]
fn accumulating_micro_batches_equals_one_large_batch() {
    // A linear model with a mean-squared loss: 4 micro-batches of 2 samples against one batch of 8.
    tch::manual_seed(5);
    let inputs = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
    let targets = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
    let initial = Tensor::randn([6, 3], (Kind::Float, Device::Cpu));
    let run = |accumulate: u64| {
        let weight = initial.copy().set_requires_grad(true);
        let config = SolverConfig {
            accumulate,
            ims_per_batch: 8,
            max_iter: 10,
            warmup_iters: 2,
            ..solver_config(true, None, None)
        };
        let mut solver = Solver::new([("fc.weight".to_string(), weight.shallow_clone())].into(), &config).unwrap();
        for _ in 0..10 {
            for micro in 0..accumulate as i64 {
                let rows = 8 / accumulate as i64;
                let x = inputs.narrow(0, micro * rows, rows);
                let y = targets.narrow(0, micro * rows, rows);
                let loss = (x.matmul(&weight) - y).square().mean(Kind::Float);
                (loss * solver.loss_multiplier()).backward();
            }
            solver.step().unwrap();
        }
        weight.detach()
    };
    let (whole, accumulated) = (run(1), run(4));
    let difference = max_abs_diff(&whole, &accumulated);
    println!("accumulate 4 x 2 vs batch 8 after 10 steps: max |difference| = {difference:e}");
    assert!(difference < 1e-6, "accumulated micro-batches drift from the large batch by {difference}");
    assert!(max_abs_diff(&whole, &initial) > 1e-2, "the weights did not move");
}

/// Deterministic "weights after step `step`" for a tensor of `numel` values (no global generator: the tests run
/// in parallel threads).
fn weights_at(step: usize, salt: usize, numel: usize) -> Vec<f32> {
    (0..numel).map(|i| ((step * 7 + salt * 13 + i) as f32 * 0.37).sin() * (1.0 + step as f32 * 0.05)).collect()
}

fn ema_matches_torch(config: EmaConfig) {
    const STEPS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let shapes: [(&str, &[i64], bool); 4] = [
        ("head.weight", &[4, 3], true),
        ("head.bias", &[4], true),
        ("norm.running_var", &[3], false),
        ("stem.frozen", &[2, 2], false),
    ];
    for (name, shape, trainable) in shapes {
        let (module, leaf) = name.split_once('.').unwrap();
        let path = &root / module;
        if trainable {
            let _ = path.var(leaf, shape, nn::Init::Const(0.0));
        } else {
            let _ = path.zeros_no_train(leaf, shape);
        }
    }
    let variables = vs.variables();
    let set_weights = |step: usize| {
        tch::no_grad(|| {
            for (salt, (name, shape, _)) in shapes.iter().enumerate() {
                let numel = shape.iter().product::<i64>() as usize;
                let values = Tensor::from_slice(&weights_at(step, salt, numel)).reshape(*shape);
                variables[*name].shallow_clone().copy_(&values);
            }
        })
    };
    set_weights(0);
    let mut ema = ModelEma::new(&vs, &config);
    let mut written = Vec::new();
    for step in 0..=STEPS {
        if step > 0 {
            set_weights(step);
            ema.update().unwrap();
        }
        for (name, _, _) in shapes {
            written.push((format!("{step}/{name}"), variables[name].detach().copy()));
        }
    }
    Tensor::write_safetensors(&written, dir.path().join("weights.safetensors")).unwrap();
    let names = |trainable: bool| shapes.iter().filter(|s| s.2 == trainable).map(|s| s.0).collect::<Vec<_>>();
    let oracle = serde_json::json!({
        "decay": config.decay, "warmup": config.warmup, "steps": STEPS,
        "averaged": names(true), "copied": names(false),
    });
    std::fs::write(dir.path().join("config.json"), oracle.to_string()).unwrap();
    let status = Command::new(python()).arg(script("ema_reference.py")).arg(dir.path()).status().unwrap();
    assert!(status.success(), "ema_reference.py failed");
    let expected: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("torch.safetensors")).unwrap().into_iter().collect();
    let ours: BTreeMap<String, Tensor> = ema.named_tensors().into_iter().collect();
    assert_eq!(ours.len(), expected.len());
    let worst = ours.iter().map(|(name, t)| max_abs_diff(t, &expected[name])).fold(0.0f64, f64::max);
    println!("EMA {config:?}: max |ours - PyTorch| after {STEPS} updates = {worst:e}");
    assert_eq!(worst, 0.0, "the EMA differs from the PyTorch reference (expected bit-identical)");
    // The EMA moved: it is neither the first nor the last weights.
    let last = &variables["head.weight"];
    assert!(max_abs_diff(&ours["head.weight"], last) > 1e-3);
}

#[test]
fn ema_matches_pytorch_over_20_steps_with_and_without_warmup() {
    ema_matches_torch(EmaConfig { enabled: true, decay: 0.8, warmup: 5 });
    ema_matches_torch(EmaConfig { enabled: true, decay: 0.9, warmup: 0 });
}

#[test]
fn a_failed_step_changes_nothing_and_the_next_one_is_the_same_as_without_it() {
    // Without a loss scaler, NaN gradients fail the step: its update is skipped on the device (weights and
    // momentum untouched) and the iteration still advances, as in the engine, which stops at its next read.
    // A constant learning rate, so that the step after the failed one uses the same one as without it.
    let config = SolverConfig { warmup_iters: 0, ..solver_config(true, None, Some(0.0)) };
    let grads = gradients(2);
    let run = |with_failure: bool| {
        let params = initial_params();
        let mut solver =
            Solver::new(params.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(), &config).unwrap();
        backward_with(&params, &grads[0], solver.loss_multiplier());
        solver.step().unwrap();
        if with_failure {
            let before = detached(&params);
            let momentum_before = solver.state_dict().unwrap().tensors;
            let mut broken: BTreeMap<String, Tensor> =
                grads[1].iter().map(|(n, g)| (n.clone(), g.shallow_clone())).collect();
            broken.insert("head.fc.bias".into(), Tensor::full([5], f64::NAN, (Kind::Float, Device::Cpu)));
            backward_with(&params, &broken, solver.loss_multiplier());
            let message = solver.step().unwrap_err().to_string();
            assert!(message.contains("iteration 2:") && message.contains("gradient norm is NaN"), "{message}");
            for (name, tensor) in &params {
                assert!(tensor.equal(&before[name]), "{name} changed on a failed step");
            }
            for ((name, a), (_, b)) in momentum_before.iter().zip(&solver.state_dict().unwrap().tensors) {
                assert!(a.equal(b), "{name} changed on a failed step");
            }
        }
        backward_with(&params, &grads[1], solver.loss_multiplier());
        let report = solver.step().unwrap();
        (detached(&params), report.iteration)
    };
    let (clean, clean_iteration) = run(false);
    let (recovered, recovered_iteration) = run(true);
    assert_eq!((clean_iteration, recovered_iteration), (1, 2), "the failed step counts as an iteration");
    for (name, tensor) in &clean {
        assert!(tensor.equal(&recovered[name]), "{name}: the failed step left a trace");
    }
}
