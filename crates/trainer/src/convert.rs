//! `trainer convert`: rewrites a safetensors file written with another framework's parameter names into ours
//! (`--from`), or ours into detectron2's (`--to detectron2`), checking every name and shape against the model the
//! config describes.

use std::collections::BTreeMap;
use std::path::Path;

use backbone::weights::{assign, read_safetensors};
use backbone::{ImportReport, WeightFormat};
use tch::{Device, Tensor};

use crate::checkpoint::WhichWeights;
use crate::config::Config;
use crate::distributed::RankGroup;
use crate::model::{build_model, load_model};

/// Name prefixes under which whole-detector checkpoints keep their backbone, per format.
fn backbone_prefixes(format: WeightFormat) -> &'static [&'static str] {
    match format {
        WeightFormat::Detectron2 => &["backbone.bottom_up."],
        WeightFormat::Torchvision => &["backbone.body."],
        WeightFormat::Vovdet => &["backbone."],
    }
}

/// Loads `input` (names in `format`) into the model of `config`, failing with every missing, unexpected or
/// mis-shaped name, and writes the weights with our names to `output`. A whole torchvision or detectron2 Mask
/// R-CNN state dict converts the whole model; anything else (an ImageNet ResNet, a vovnet-detectron2 backbone)
/// converts the backbone, and only the backbone's tensors are written (load them with `--init-weights`).
pub fn convert(config: &Config, format: WeightFormat, input: &Path, output: &Path) -> anyhow::Result<ImportReport> {
    let model = build_model(config, Device::Cpu, &RankGroup::single())?;
    let source = read_safetensors(input)?;
    let whole_model = source.iter().any(|(name, _)| name.starts_with("roi_heads."));
    let report = match format {
        WeightFormat::Torchvision if whole_model => Some(detector::torchvision::import_torchvision(&model.vs, input)?),
        WeightFormat::Detectron2 if whole_model => {
            Some(detector::detectron2::import_detectron2(&model.vs, &model.model, input)?)
        }
        _ => None,
    };
    if let Some(report) = report {
        model.vs.save(output).map_err(|e| write_error(output, e))?;
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
    Tensor::write_safetensors(&backbone, output).map_err(|e| write_error(output, e))?;
    Ok(report)
}

/// Writes our weights `input` (a checkpoint folder or a safetensors file with our names, complete for the model
/// of `config`) to `output` with the names of `format`; only detectron2's layout is supported, which
/// detectron2's `DetectionCheckpointer` and vovnet-detectron2 load as they are. Returns the tensor count.
pub fn export(config: &Config, format: WeightFormat, input: &Path, output: &Path) -> anyhow::Result<usize> {
    anyhow::ensure!(
        format == WeightFormat::Detectron2,
        "--to {format}: exporting is supported to detectron2's names only (--to detectron2)"
    );
    let model = load_model(config, input, WhichWeights::Model, Device::Cpu, &RankGroup::single())?;
    let named = detector::detectron2::export_detectron2(&model.vs, &model.model)?;
    Tensor::write_safetensors(&named, output).map_err(|e| write_error(output, e))?;
    Ok(named.len())
}

fn write_error(output: &Path, error: tch::TchError) -> anyhow::Error {
    anyhow::anyhow!("cannot write {}: {error}", output.display())
}
