//! `trainer convert`: rewrites a safetensors file written with another framework's parameter names into ours,
//! checking every name and shape against the model the config describes.

use std::collections::BTreeMap;
use std::path::Path;

use backbone::weights::{assign, read_safetensors};
use backbone::{ImportReport, WeightFormat};
use tch::{Device, Tensor};

use crate::config::Config;
use crate::info::build_model;

/// Name prefixes under which whole-detector checkpoints keep their backbone, per format.
fn backbone_prefixes(format: WeightFormat) -> &'static [&'static str] {
    match format {
        WeightFormat::VovnetDetectron2 => &["backbone.bottom_up."],
        WeightFormat::Torchvision => &["backbone.body."],
        WeightFormat::Vovdet => &["backbone."],
    }
}

/// Loads `input` (names in `format`) into the model of `config`, failing with every missing, unexpected or
/// mis-shaped name, and writes the weights with our names to `output`. A whole torchvision Mask R-CNN state dict
/// converts the whole model; anything else (an ImageNet ResNet, a vovnet-detectron2 backbone) converts the
/// backbone, and only the backbone's tensors are written (load them with `--init-weights`).
pub fn convert(config: &Config, format: WeightFormat, input: &Path, output: &Path) -> anyhow::Result<ImportReport> {
    let model = build_model(config, Device::Cpu)?;
    let source = read_safetensors(input)?;
    let write_error = |e: tch::TchError| anyhow::anyhow!("cannot write {}: {e}", output.display());
    if format == WeightFormat::Torchvision && source.iter().any(|(name, _)| name.starts_with("roi_heads.")) {
        let report = detector::torchvision::import_torchvision(&model.vs, input)?;
        model.vs.save(output).map_err(write_error)?;
        return Ok(report);
    }
    let prefix = backbone_prefixes(format)
        .iter()
        .find(|p| source.iter().any(|(name, _)| name.starts_with(*p)))
        .copied()
        .unwrap_or("");
    let targets: BTreeMap<String, Tensor> = model
        .vs
        .variables()
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix("backbone.").map(|n| (n.to_string(), t)))
        .collect();
    let report = assign(input, &targets, source, prefix, |ours| model.backbone().external_name(format, ours))?;
    let backbone: Vec<(String, Tensor)> =
        targets.into_iter().map(|(name, t)| (format!("backbone.{name}"), t)).collect();
    Tensor::write_safetensors(&backbone, output).map_err(write_error)?;
    Ok(report)
}
