//! The LSJ 100-epoch configs (detectron2's new_baselines recipe on V-57, V-39 and R-50): `trainer info` builds
//! each model, and four training iterations of each run on coco-mini at a reduced size (LSJ crop 160, batch 2,
//! float32 on the CPU) with finite losses and a checkpoint at the end.

mod common;

use common::{coco_mini, stderr, temp_dir, trainer};

const CONFIGS: [&str; 3] = [
    "configs/vovnet57_maskrcnn_lsj_100ep.toml",
    "configs/vovnet39_maskrcnn_lsj_100ep.toml",
    "configs/r50_maskrcnn_lsj_100ep.toml",
];

#[test]
fn lsj_configs_build_and_train_four_iterations() {
    let mini = coco_mini();
    for config in CONFIGS {
        let output = trainer(&["info", config, "--input", "256x256", "--json", "--device", "cpu"]);
        assert!(output.status.success(), "info {config}: {}", stderr(&output));
        let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(info["params"]["total"].as_i64().unwrap() > 20_000_000, "{config}: {info}");

        let dir = temp_dir("lsj");
        let sets = [
            format!("output_dir={}", dir.join("run").display()),
            format!("data.train.annotations={}/annotations/instances_train2017.json", mini.display()),
            format!("data.train.images={}/train2017", mini.display()),
            format!("data.val.annotations={}/annotations/instances_val2017.json", mini.display()),
            format!("data.val.images={}/val2017", mini.display()),
            "data.num_workers=1".into(),
            "input.lsj.size=160".into(),
            "solver.ims_per_batch=2".into(),
            "solver.max_iter=4".into(),
            "solver.steps=[3]".into(),
            "solver.warmup_iters=2".into(),
            "solver.amp.enabled=false".into(),
            "eval.at_end=false".into(),
            "log.period=1".into(),
        ];
        let mut args = vec!["train", config, "--device", "cpu", "--quiet"];
        for set in &sets {
            args.extend(["--set", set.as_str()]);
        }
        let output = trainer(&args);
        assert!(output.status.success(), "train {config}: {}", stderr(&output));
        let records = common::metrics(&dir.join("run"));
        assert_eq!(records.len(), 4, "{config}: {records:?}");
        for record in &records {
            let loss = record["total_loss"].as_f64().unwrap();
            assert!(loss.is_finite() && loss > 0.0, "{config}: {record}");
        }
        assert!(dir.join("run/model_0000004").is_dir(), "{config}: no final checkpoint");
    }
}
