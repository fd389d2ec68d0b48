//! Checkpoint tests: exact round trip, truncation/corruption detection with fallback on resume, a real
//! SIGKILL during saves, keep-last-N, best-by-metric, mismatched models and `--init-weights`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tch::{nn, nn::VarStore, Device, Kind, Tensor};
use trainer::checkpoint::{
    init_weights, load_checkpoint, named_variables, resume_from, torch_seed, CheckpointConfig, CheckpointContents,
    CheckpointError, Checkpointer, WhichWeights,
};
use trainer::solver::{Solver, SolverConfig};

/// A small model: a conv and a GN-like norm, with `width` output channels.
fn model(width: i64) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = root.sub("stem").sub("conv").var("weight", &[width, 3, 3, 3], nn::Init::Randn { mean: 0.0, stdev: 1.0 });
    let _ = root.sub("stem").sub("norm").var("weight", &[width], nn::Init::Const(1.0));
    let _ = root.sub("stem").sub("norm").var("bias", &[width], nn::Init::Const(0.0));
    vs
}

fn solver_for(vs: &VarStore) -> Solver {
    Solver::from_var_store(vs, &SolverConfig { max_iter: 100, warmup_iters: 10, ..SolverConfig::default() }).unwrap()
}

/// Runs `steps` SGD steps on a fixed quadratic loss.
fn train(vs: &VarStore, solver: &mut Solver, steps: usize) {
    for _ in 0..steps {
        let loss = named_variables(vs)
            .iter()
            .map(|(_, v)| (v * v).sum(Kind::Float))
            .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
        (loss * solver.loss_multiplier()).backward();
        solver.step().unwrap();
    }
}

fn save(checkpointer: &Checkpointer, vs: &VarStore, solver: &Solver) -> std::path::PathBuf {
    let weights = named_variables(vs);
    let state = solver.state_dict().unwrap();
    let contents = CheckpointContents {
        model: &weights,
        solver: &state,
        ema: None,
        sampler: serde_json::json!({"epoch": 2, "position": solver.iteration() * 4}),
        rng: serde_json::json!({"augmentation": [1, 2, 3]}),
        config_toml: "[solver]\nbase_lr = 0.02\n",
        device: "cpu".into(),
        dataset_fingerprint: "coco-tiny:80:deadbeef".into(),
    };
    checkpointer.save(solver.iteration(), &contents).unwrap()
}

fn assert_same_weights(a: &VarStore, b: &VarStore) {
    let b: BTreeMap<String, Tensor> = named_variables(b).into_iter().collect();
    for (name, tensor) in named_variables(a) {
        assert!(tensor.equal(&b[&name]), "{name} differs");
    }
}

#[test]
fn round_trip_restores_weights_solver_and_state_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Checkpointer::new(dir.path(), &CheckpointConfig::default());
    tch::manual_seed(1);
    let vs = model(4);
    let mut solver = solver_for(&vs);
    train(&vs, &mut solver, 5);
    let path = save(&checkpointer, &vs, &solver);
    assert_eq!(path, dir.path().join("model_0000005"));
    assert_eq!(std::fs::read_to_string(dir.path().join("last_checkpoint")).unwrap(), "model_0000005");

    tch::manual_seed(2);
    let restored = model(4);
    let mut restored_solver = solver_for(&restored);
    let resumed = checkpointer.resume(&restored, &mut restored_solver).unwrap().unwrap();
    assert!(resumed.warnings.is_empty(), "{:?}", resumed.warnings);
    assert_same_weights(&vs, &restored);
    assert_eq!(restored_solver.iteration(), 5);
    let state = &resumed.checkpoint.state;
    assert_eq!(state.sampler, serde_json::json!({"epoch": 2, "position": 20}));
    assert_eq!(state.rng, serde_json::json!({"augmentation": [1, 2, 3]}));
    assert_eq!(resumed.checkpoint.config_toml, "[solver]\nbase_lr = 0.02\n");
    let manifest = &resumed.checkpoint.manifest;
    assert_eq!((manifest.device.as_str(), manifest.libtorch_version.as_str()), ("cpu", "2.11.0"));
    assert_eq!(manifest.dataset_fingerprint, "coco-tiny:80:deadbeef");
    assert!(manifest.git_commit.as_ref().is_some_and(|c| c.len() == 40), "{:?}", manifest.git_commit);

    // Both continue identically.
    train(&vs, &mut solver, 3);
    train(&restored, &mut restored_solver, 3);
    assert_same_weights(&vs, &restored);
    assert_ne!(torch_seed(0, 1), torch_seed(0, 2));
    assert_ne!(torch_seed(0, 1), torch_seed(1, 1));
}

#[test]
fn truncated_or_corrupt_files_are_named_and_resume_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Checkpointer::new(dir.path(), &CheckpointConfig::default());
    let vs = model(4);
    let mut solver = solver_for(&vs);
    train(&vs, &mut solver, 2);
    save(&checkpointer, &vs, &solver);
    let good = named_variables(&vs).into_iter().map(|(n, t)| (n, t.copy())).collect::<Vec<_>>();
    train(&vs, &mut solver, 2);
    let newest = save(&checkpointer, &vs, &solver);

    let model_file = newest.join("model.safetensors");
    let bytes = std::fs::read(&model_file).unwrap();
    std::fs::write(&model_file, &bytes[..bytes.len() / 2]).unwrap();
    let message = load_checkpoint(&newest).unwrap_err().to_string();
    assert!(message.contains("model_0000004/model.safetensors") && message.contains("truncated"), "{message}");

    let restored = model(4);
    let mut restored_solver = solver_for(&restored);
    let resumed = checkpointer.resume(&restored, &mut restored_solver).unwrap().unwrap();
    assert_eq!(resumed.checkpoint.state.iteration, 2);
    assert_eq!(resumed.warnings.len(), 1);
    assert!(resumed.warnings[0].contains("model_0000004/model.safetensors"), "{}", resumed.warnings[0]);
    let restored_weights: BTreeMap<String, Tensor> = named_variables(&restored).into_iter().collect();
    for (name, tensor) in &good {
        assert!(tensor.equal(&restored_weights[name]), "{name}");
    }

    // Same-size corruption is caught by the checksum.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    std::fs::write(&model_file, &flipped).unwrap();
    let message = load_checkpoint(&newest).unwrap_err().to_string();
    assert!(message.contains("CRC32"), "{message}");

    // Resuming an explicit broken path is an error, not a fallback.
    let message = resume_from(&newest, &restored, &mut restored_solver).unwrap_err().to_string();
    assert!(message.contains("model.safetensors"), "{message}");
}

#[test]
fn mismatched_models_are_rejected_without_changes() {
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Checkpointer::new(dir.path(), &CheckpointConfig::default());
    let vs = model(4);
    let mut solver = solver_for(&vs);
    train(&vs, &mut solver, 1);
    let path = save(&checkpointer, &vs, &solver);

    let other = model(6);
    let before = named_variables(&other).into_iter().map(|(n, t)| (n, t.copy())).collect::<BTreeMap<_, _>>();
    let mut other_solver = solver_for(&other);
    let message = resume_from(&path, &other, &mut other_solver).unwrap_err().to_string();
    assert!(message.contains("model_0000001/model.safetensors") && message.contains("shape"), "{message}");
    assert_eq!(other_solver.iteration(), 0);
    for (name, tensor) in named_variables(&other) {
        assert!(tensor.equal(&before[&name]), "{name} changed");
    }
    let err = checkpointer.resume(&other, &mut other_solver).unwrap_err();
    assert!(matches!(err, CheckpointError::NothingToResume { .. }), "{err}");

    // --init-weights loads what matches by name and reports the rest.
    let bigger = VarStore::new(Device::Cpu);
    let _ = bigger.root().sub("stem").sub("conv").var("weight", &[4, 3, 3, 3], nn::Init::Const(0.0));
    let _ = bigger.root().sub("head").var("weight", &[2], nn::Init::Const(0.0));
    let missing = init_weights(&bigger, &path, WhichWeights::Model).unwrap();
    assert_eq!(missing, vec!["head.weight".to_string()]);
    let conv: BTreeMap<String, Tensor> = named_variables(&bigger).into_iter().collect();
    let source: BTreeMap<String, Tensor> = named_variables(&vs).into_iter().collect();
    assert!(conv["stem.conv.weight"].equal(&source["stem.conv.weight"]));
}

#[test]
fn keep_last_and_best_by_metric() {
    let dir = tempfile::tempdir().unwrap();
    let config = CheckpointConfig { keep_last: 2, best_metric: Some("segm/AP".into()), ..CheckpointConfig::default() };
    let checkpointer = Checkpointer::new(dir.path(), &config);
    let vs = model(2);
    let mut solver = solver_for(&vs);
    let mut saved = Vec::new();
    for ap in [0.1, 0.3, 0.2, 0.25, 0.05] {
        train(&vs, &mut solver, 1);
        let path = save(&checkpointer, &vs, &solver);
        checkpointer.update_best(&path, &BTreeMap::from([("segm/AP".to_string(), ap)])).unwrap();
        saved.push(path);
    }
    let names: Vec<u64> = checkpointer.list().unwrap().into_iter().map(|(i, _)| i).collect();
    assert_eq!(names, vec![4, 5]);
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("model_best/best.json")).unwrap()).unwrap();
    assert_eq!(best["value"], 0.3);
    assert_eq!(best["checkpoint"], "model_0000002");
    assert_eq!(load_checkpoint(&dir.path().join("model_best")).unwrap().state.iteration, 2);
    assert!(checkpointer.is_due(5000, 90000) && checkpointer.is_due(90000, 90000) && !checkpointer.is_due(5001, 90000));
}

const CHILD_ENV: &str = "VOVDET_CHECKPOINT_KILL_CHILD_DIR";

/// Resumes from `dir` if it holds a checkpoint, then trains and saves a ~16 MB model in a loop until killed (the
/// child half of the kill test).
fn save_forever(dir: &Path) -> ! {
    let checkpointer = Checkpointer::new(dir, &CheckpointConfig { keep_last: 2, ..CheckpointConfig::default() });
    let vs = VarStore::new(Device::Cpu);
    let _ = vs.root().var("big", &[4, 1024, 1024], nn::Init::Randn { mean: 0.0, stdev: 1.0 });
    let mut solver = solver_for(&vs);
    checkpointer.resume(&vs, &mut solver).unwrap();
    loop {
        train(&vs, &mut solver, 1);
        save(&checkpointer, &vs, &solver);
    }
}

#[test]
fn sigkill_during_saves_never_breaks_the_previous_checkpoint() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        save_forever(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut resumed_iteration = 0;
    for delay_ms in [3u64, 17, 41, 90, 150] {
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", "sigkill_during_saves_never_breaks_the_previous_checkpoint", "--nocapture"])
            .env(CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pointer = dir.path().join("last_checkpoint");
        let before = std::fs::read_to_string(&pointer).ok();
        let started = Instant::now();
        while std::fs::read_to_string(&pointer).ok() == before {
            assert!(started.elapsed() < Duration::from_secs(60), "the child saved no new checkpoint");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();

        let listed = Checkpointer::new(dir.path(), &CheckpointConfig::default()).list().unwrap();
        assert!(!listed.is_empty());
        for (_, path) in &listed {
            load_checkpoint(path).unwrap_or_else(|e| panic!("after SIGKILL at +{delay_ms} ms: {e}"));
        }
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().var("big", &[4, 1024, 1024], nn::Init::Const(0.0));
        let mut solver = solver_for(&vs);
        let resumed =
            Checkpointer::new(dir.path(), &CheckpointConfig::default()).resume(&vs, &mut solver).unwrap().unwrap();
        assert!(resumed.warnings.is_empty(), "{:?}", resumed.warnings);
        assert!(resumed.checkpoint.state.iteration > resumed_iteration, "no progress across the kill");
        resumed_iteration = resumed.checkpoint.state.iteration;
        println!(
            "SIGKILL at +{delay_ms} ms: resumed {} ({} checkpoints on disk)",
            resumed.checkpoint.path.display(),
            listed.len()
        );
    }
}
