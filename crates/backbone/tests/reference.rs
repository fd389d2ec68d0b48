//! The backbones against independent PyTorch references: VoVNet built from the spec in Python with the authors'
//! vovnet-detectron2 parameter names (forward and gradients), torchvision's ResNet-50 (FrozenBN, forward) and
//! torchvision's DenseNet-201 (BatchNorm in eval mode, forward).

mod common;

use std::collections::{BTreeMap, HashMap};

use backbone::weights::{assign, read_safetensors};
use backbone::{Backbone, BackboneConfig, NormKind, WeightFormat};
use tch::{nn, Device, Kind, Tensor};

fn load_reference(path: &std::path::Path) -> HashMap<String, Tensor> {
    read_safetensors(path).unwrap().into_iter().collect()
}

/// Imports the reference's `param/*` tensors into a fresh model and returns it with its var store.
fn import(config: &BackboneConfig, format: WeightFormat, path: &std::path::Path) -> (nn::VarStore, Backbone) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let backbone = Backbone::new(&(vs.root() / "backbone"), config, None).unwrap();
    vs.double();
    let targets: BTreeMap<String, Tensor> =
        vs.variables().into_iter().map(|(name, t)| (name.strip_prefix("backbone.").unwrap().to_string(), t)).collect();
    let source: Vec<(String, Tensor)> = read_safetensors(path)
        .unwrap()
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix("param/").map(|n| (n.to_string(), t)))
        .collect();
    let report = assign(path, &targets, source, "", |ours| backbone.external_name(format, ours)).unwrap();
    assert_eq!(report.loaded, targets.len());
    (vs, backbone)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Largest difference relative to the largest magnitude of the reference.
fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / b.abs().max().double_value(&[]).max(1e-30)
}

fn check_vovnet(name: &str, version: &str, norm: &str, groups: i64) {
    let dir = common::temp_dir(&format!("{name}-{version}-{norm}"));
    let path = dir.path().join("reference.safetensors");
    common::run_reference(&["vovnet", path.to_str().unwrap(), name, version, norm, &groups.to_string(), "75", "101"]);
    let reference = load_reference(&path);
    let mut config = BackboneConfig::new(name);
    config.version = if version == "V2" { 2 } else { 1 };
    config.norm = if norm == "GN" { NormKind::GN } else { NormKind::BN };
    config.gn_groups = groups;
    let (vs, backbone) = import(&config, WeightFormat::Detectron2, &path);
    let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    assert_eq!(params, reference["param_count"].int64_value(&[0]), "{name} parameter count");

    let input = reference["input"].shallow_clone().set_requires_grad(true);
    let outputs = backbone.forward_t(&input, true);
    let mut loss = Tensor::zeros([], (Kind::Double, Device::Cpu));
    for (spec, output) in backbone.output_specs().iter().zip(&outputs) {
        let expected = &reference[&format!("output/{}", spec.name)];
        let diff = relative_diff(output, expected);
        assert!(diff < 1e-10, "{name} {} forward differs by {diff} (relative)", spec.name);
        loss += (output * &reference[&format!("loss_weight/{}", spec.name)]).sum(Kind::Double);
    }
    loss.backward();
    // Both sides run in float64. Forward agrees to ~1e-12; backward through ~20 GroupNorm and eSE layers with
    // random weights amplifies rounding differences (different summation order) to ~3e-9 relative, so the bound
    // is 1e-7: any real semantic difference shows up at 1e-2 or more.
    let diff = relative_diff(&input.grad(), &reference["input_grad"]);
    assert!(diff < 1e-7, "{name} input gradient differs by {diff} (relative)");
    let stem_grad = vs.variables()["backbone.stem.1.conv.weight"].grad();
    let diff = relative_diff(&stem_grad, &reference["stem_conv_grad"]);
    assert!(diff < 1e-7, "{name} stem weight gradient differs by {diff} (relative)");
}

#[test]
fn vovnet_v2_39_matches_reference_forward_and_gradient() {
    check_vovnet("V-39", "V2", "GN", 32);
}

#[test]
fn vovnet_v2_19_slim_dw_matches_reference() {
    check_vovnet("V-19-slim-dw", "V2", "GN", 16);
}

#[test]
fn vovnet_v1_27_slim_with_batchnorm_matches_reference() {
    check_vovnet("V-27-slim", "V1", "BN", 16);
}

#[test]
fn resnet50_frozen_bn_matches_torchvision() {
    let dir = common::temp_dir("r50");
    let path = dir.path().join("reference.safetensors");
    common::run_reference(&["resnet", path.to_str().unwrap(), "97", "131"]);
    let reference = load_reference(&path);
    let mut config = BackboneConfig::new("R-50");
    config.norm = NormKind::FrozenBN;
    let (_vs, backbone) = import(&config, WeightFormat::Torchvision, &path);
    let input = reference["input"].to_kind(Kind::Double);
    let outputs = tch::no_grad(|| backbone.forward_t(&input, false));
    for (spec, output) in backbone.output_specs().iter().zip(&outputs) {
        let expected = reference[&format!("output/{}", spec.name)].to_kind(Kind::Double);
        let scale = expected.abs().max().double_value(&[]);
        let diff = max_abs_diff(output, &expected);
        // torchvision ran in float32; we run the same weights in float64.
        assert!(diff < 1e-4 * scale.max(1.0), "R-50 {} differs by {diff} (scale {scale})", spec.name);
    }
}

#[test]
fn densenet201_batchnorm_matches_torchvision() {
    let dir = common::temp_dir("densenet201");
    let path = dir.path().join("reference.safetensors");
    // An odd size, so that the transitions' floor-mode average pools drop a row and a column.
    common::run_reference(&["densenet", path.to_str().unwrap(), "densenet201", "75", "101"]);
    let reference = load_reference(&path);
    let mut config = BackboneConfig::new("DenseNet-201");
    config.norm = NormKind::BN;
    config.out_features = ["stem", "stage2", "stage3", "stage4", "stage5"].map(String::from).to_vec();
    let (vs, backbone) = import(&config, WeightFormat::Torchvision, &path);
    let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    assert_eq!(params, reference["param_count"].int64_value(&[0]), "DenseNet-201 parameter count");
    let input = reference["input"].to_kind(Kind::Double);
    let outputs = tch::no_grad(|| backbone.forward_t(&input, false));
    for (spec, output) in backbone.output_specs().iter().zip(&outputs) {
        let expected = &reference[&format!("output/{}", spec.name)];
        // Both sides run in float64 with the same weights; a wrong layer order, pooling or weight mapping shows up
        // at 1e-2 or more.
        let diff = relative_diff(output, expected);
        assert!(diff < 1e-9, "DenseNet-201 {} differs by {diff} (relative)", spec.name);
    }
}
