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
/// mis-shaped name, and writes the weights with our names to `output`.
pub fn convert(config: &Config, format: WeightFormat, input: &Path, output: &Path) -> anyhow::Result<ImportReport> {
    let model = build_model(config, Device::Cpu)?;
    let source = read_safetensors(input)?;
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
    let report = assign(input, &targets, source, prefix, |ours| model.backbone.external_name(format, ours))?;
    model.vs.save(output).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
    Ok(report)
}
