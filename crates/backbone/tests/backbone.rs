//! Parameter counts, output shapes, freezing and the errors a user can trigger.

mod common;

use std::collections::BTreeMap;

use backbone::weights::{assign, read_safetensors};
use backbone::{freeze, Backbone, BackboneConfig, BackboneError, NormKind, WeightFormat};
use tch::{nn, Device, Kind, Tensor};

fn build(config: &BackboneConfig) -> Result<(nn::VarStore, Backbone), BackboneError> {
    let vs = nn::VarStore::new(Device::Cpu);
    let backbone = Backbone::new(&(vs.root() / "backbone"), config, None)?;
    Ok((vs, backbone))
}

fn params(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

/// Exact counts printed by the independent Python model in tests/python/reference.py (GroupNorm, 32 groups, 16
/// for the slim variants); they round to the authors' published 10.18M, 25.18M, 41.45M, 69.52M, 5.52M (V2) and
/// 21.58M, 35.62M (V1).
const PARAMS: [(&str, u8, i64); 16] = [
    ("V-19-slim-dw", 2, 1_384_752),
    ("V-19-slim-dw", 1, 895_808),
    ("V-19-dw", 2, 5_518_080),
    ("V-19-dw", 1, 3_549_440),
    ("V-19-slim", 2, 2_653_136),
    ("V-19-slim", 1, 2_164_192),
    ("V-19", 2, 10_180_416),
    ("V-19", 1, 8_211_776),
    ("V-27-slim", 2, 3_505_536),
    ("V-27-slim", 1, 3_012_736),
    ("V-39", 2, 25_184_128),
    ("V-39", 1, 21_575_296),
    ("V-57", 2, 41_454_912),
    ("V-57", 1, 35_615_296),
    ("V-99", 2, 69_523_520),
    ("V-99", 1, 60_205_632),
];

#[test]
fn parameter_counts_match_the_authors_implementation() {
    for (name, version, expected) in PARAMS {
        let mut config = BackboneConfig::new(name);
        config.version = version;
        config.gn_groups = if name.contains("slim") { 16 } else { 32 };
        let (vs, _) = build(&config).unwrap();
        assert_eq!(params(&vs), expected, "{name} V{version}");
    }
    let published = [("V-19", 10.18), ("V-39", 25.18), ("V-57", 41.45), ("V-99", 69.52), ("V-19-dw", 5.52)];
    for (name, millions) in published {
        let count = PARAMS.iter().find(|p| p.0 == name && p.1 == 2).unwrap().2;
        assert_eq!((count as f64 / 1e4).round() / 100.0, millions, "{name}");
    }
    // torchvision's resnet50 without its classifier: 23,508,032 parameters.
    let (vs, _) = build(&BackboneConfig { norm: NormKind::BN, ..BackboneConfig::new("R-50") }).unwrap();
    assert_eq!(params(&vs), 23_508_032);
    // torchvision's densenet121/169/201/161 `features` (no norm added: the stage outputs reuse torchvision's
    // norms), from `.venv/bin/python -c "import torchvision; m = torchvision.models.densenet201(weights=None);
    //  print(sum(p.numel() for p in m.features.parameters()))"` and likewise for the others.
    let densenets = [
        ("DenseNet-121", 6_953_856),
        ("DenseNet-169", 12_484_480),
        ("DenseNet-201", 18_092_928),
        ("DenseNet-161", 26_472_000),
    ];
    for (name, expected) in densenets {
        let (vs, _) = build(&BackboneConfig { norm: NormKind::BN, ..BackboneConfig::new(name) }).unwrap();
        assert_eq!(params(&vs), expected, "{name}");
    }
    // GN has the same parameters as BN (DenseNet-161's widths are multiples of 16, not 32).
    let (vs, _) = build(&BackboneConfig::new("DenseNet-201")).unwrap();
    assert_eq!(params(&vs), 18_092_928, "DenseNet-201 GN");
}

fn output_shapes(config: &BackboneConfig, height: i64, width: i64) -> Vec<(String, Vec<i64>)> {
    let (_, backbone) = build(config).unwrap();
    let input = Tensor::zeros([1, 3, height, width], (Kind::Float, Device::Cpu));
    let outputs = tch::no_grad(|| backbone.forward_t(&input, false));
    backbone.output_specs().into_iter().zip(outputs).map(|(spec, out)| (spec.name, out.size())).collect()
}

#[test]
fn stage_outputs_at_padded_and_odd_sizes() {
    let mut config = BackboneConfig::new("V-19-slim-dw");
    config.gn_groups = 16;
    config.out_features = ["stem", "stage2", "stage3", "stage4", "stage5"].map(String::from).to_vec();
    let shapes = output_shapes(&config, 800, 1344);
    let expected = [
        ("stem", vec![1, 64, 200, 336]),
        ("stage2", vec![1, 112, 200, 336]),
        ("stage3", vec![1, 256, 100, 168]),
        ("stage4", vec![1, 384, 50, 84]),
        ("stage5", vec![1, 512, 25, 42]),
    ];
    for ((name, shape), (want_name, want_shape)) in shapes.iter().zip(expected) {
        assert_eq!((name.as_str(), shape), (want_name, &want_shape));
    }
    // Not a multiple of 32: ceil-mode pooling keeps every border pixel (stride-2 convs pad 1).
    let shapes = output_shapes(&config, 333, 517);
    let sizes: Vec<[i64; 2]> = shapes.iter().map(|(_, s)| [s[2], s[3]]).collect();
    assert_eq!(sizes, vec![[84, 130], [84, 130], [42, 65], [21, 32], [10, 16]]);
    let (_, backbone) = build(&config).unwrap();
    let strides: Vec<i64> = backbone.output_specs().iter().map(|s| s.stride).collect();
    assert_eq!(strides, vec![4, 4, 8, 16, 32]);
}

#[test]
fn resnet_outputs_at_odd_size() {
    let config = BackboneConfig::new("R-50");
    let shapes = output_shapes(&config, 97, 131);
    let sizes: Vec<Vec<i64>> = shapes.into_iter().map(|(_, s)| s).collect();
    assert_eq!(sizes, vec![vec![1, 256, 25, 33], vec![1, 512, 13, 17], vec![1, 1024, 7, 9], vec![1, 2048, 4, 5]]);
}

#[test]
fn densenet_outputs_at_odd_size() {
    let mut config = BackboneConfig::new("DenseNet-201");
    config.out_features = ["stem", "stage2", "stage3", "stage4", "stage5"].map(String::from).to_vec();
    let shapes = output_shapes(&config, 97, 131);
    let sizes: Vec<Vec<i64>> = shapes.into_iter().map(|(_, s)| s).collect();
    // Stem and max-pool round up (padding 1); the transitions' 2x2 average pools round down, as in torchvision.
    let expected =
        [[1, 64, 25, 33], [1, 256, 25, 33], [1, 512, 12, 16], [1, 1792, 6, 8], [1, 1920, 3, 4]].map(|s| s.to_vec());
    assert_eq!(sizes, expected);
    let (_, backbone) = build(&config).unwrap();
    let strides: Vec<i64> = backbone.output_specs().iter().map(|s| s.stride).collect();
    assert_eq!(strides, vec![4, 4, 8, 16, 32]);
}

#[test]
fn unknown_name_and_bad_group_count_are_clear_errors() {
    let message = build(&BackboneConfig::new("V-58")).unwrap_err().to_string();
    assert!(message.contains("unknown backbone `V-58`") && message.contains("V-57"), "{message}");
    let message = build(&BackboneConfig::new("V-19-slim")).unwrap_err().to_string();
    assert!(
        message.contains("GroupNorm at `backbone.stage2.0.concat.norm`: 112 channels are not divisible by 32 groups"),
        "{message}"
    );
    let mut config = BackboneConfig::new("V-19");
    config.out_features = vec!["stage6".into()];
    let message = build(&config).unwrap_err().to_string();
    assert!(message.contains("unknown output `stage6`"), "{message}");
    config = BackboneConfig::new("V-19");
    config.freeze_at = 6;
    assert!(matches!(build(&config), Err(BackboneError::FreezeAt(6))));
}

#[test]
fn from_scratch_refuses_freezing_and_frozen_bn() {
    let mut config = BackboneConfig::new("V-57");
    assert!(config.check_from_scratch().is_ok());
    config.freeze_at = 2;
    let message = config.check_from_scratch().unwrap_err().to_string();
    assert!(message.contains("freeze_at = 2") && message.contains("~0 AP"), "{message}");
    config.freeze_at = 0;
    config.norm = NormKind::FrozenBN;
    assert!(config.check_from_scratch().unwrap_err().to_string().contains("FrozenBN"));
}

#[test]
fn freeze_at_stops_gradients_of_stem_and_early_stages() {
    let mut config = BackboneConfig::new("V-19-slim-dw");
    config.gn_groups = 16;
    config.freeze_at = 2;
    let (vs, backbone) = build(&config).unwrap();
    let frozen = freeze(&vs, "backbone.", &backbone);
    assert!(frozen > 0);
    for (name, tensor) in vs.variables() {
        let should_freeze = name.starts_with("backbone.stem.") || name.starts_with("backbone.stage2.");
        assert_eq!(tensor.requires_grad(), !should_freeze, "{name}");
    }
}

#[test]
fn mismatched_and_truncated_weight_files_are_reported_by_name() {
    let dir = common::temp_dir("weights");
    let mut config = BackboneConfig::new("V-19-slim-dw");
    config.gn_groups = 16;
    let (vs, backbone) = build(&config).unwrap();
    let targets: BTreeMap<String, Tensor> =
        vs.variables().into_iter().map(|(name, t)| (name.strip_prefix("backbone.").unwrap().to_string(), t)).collect();

    // Names in vovnet-detectron2 layout with one tensor of the wrong shape, one missing and one extra.
    let mut tensors: Vec<(String, Tensor)> = targets
        .iter()
        .map(|(ours, t)| (backbone.external_name(WeightFormat::Detectron2, ours).unwrap(), t.copy()))
        .filter(|(name, _)| name != "stage5.OSA5_1.ese.fc.bias")
        .collect();
    for (name, tensor) in tensors.iter_mut() {
        if name == "stem.stem_1/conv.weight" {
            *tensor = Tensor::zeros([8, 3, 3, 3], (Kind::Float, Device::Cpu));
        }
    }
    tensors.push(("stage6.extra.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
    tensors.push(("stem.stem_1/norm.num_batches_tracked".into(), Tensor::zeros([1], (Kind::Int64, Device::Cpu))));
    let path = dir.path().join("bad.safetensors");
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let source = read_safetensors(&path).unwrap();
    let external = |ours: &str| backbone.external_name(WeightFormat::Detectron2, ours);
    let message = assign(&path, &targets, source, "", external).unwrap_err().to_string();
    assert!(message.contains("bad.safetensors"), "{message}");
    assert!(message.contains("1 missing: stage5.OSA5_1.ese.fc.bias"), "{message}");
    assert!(message.contains("1 unexpected: stage6.extra.weight"), "{message}");
    assert!(
        message.contains("1 wrong shape: stem.stem_1/conv.weight: file [8, 3, 3, 3], model [64, 3, 3, 3]"),
        "{message}"
    );

    // A prefix (as in a whole detectron2 model) is accepted, and BatchNorm counters are ignored by name.
    let prefixed: Vec<(String, Tensor)> = targets
        .iter()
        .map(|(ours, t)| (format!("backbone.bottom_up.{}", external(ours).unwrap()), t.copy()))
        .chain([("backbone.bottom_up.stem.stem_1/norm.num_batches_tracked".to_string(), Tensor::from(0i64))])
        .collect();
    let report = assign(&path, &targets, prefixed, "backbone.bottom_up.", external).unwrap();
    assert_eq!(report.loaded, targets.len());
    assert_eq!(report.ignored, vec!["backbone.bottom_up.stem.stem_1/norm.num_batches_tracked".to_string()]);

    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let message = read_safetensors(&truncated).unwrap_err().to_string();
    assert!(message.contains("truncated.safetensors") && message.contains("not a valid safetensors file"), "{message}");
    let message = read_safetensors(&dir.path().join("absent.safetensors")).unwrap_err().to_string();
    assert!(message.contains("absent.safetensors: no such file"), "{message}");
}
