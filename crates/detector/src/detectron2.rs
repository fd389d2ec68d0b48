//! Importing and exporting detectron2 Mask R-CNN state dicts (detectron2's own ResNet models, the VoVNet authors'
//! vovnet-detectron2 and CenterMask2 backbones): our head names map one to one onto detectron2's, whose class
//! layout (background last) is ours too, so a whole model converts by renaming alone.

use std::collections::BTreeMap;
use std::path::Path;

use backbone::weights::{assign, read_safetensors};
use backbone::{ImportReport, WeightFormat};
use tch::{nn, Tensor};

use crate::{DetectorError, MaskRcnn};

/// Buffers detectron2 may keep in a state dict that hold no weights: the input normalisation (which is config
/// here) and the anchor generator's cell anchors (computed from the config).
fn is_config_buffer(name: &str) -> bool {
    name == "pixel_mean" || name == "pixel_std" || name.starts_with("proposal_generator.anchor_generator.")
}

/// Our variable name → detectron2's state-dict name for the FPN, RPN and RoI heads; backbone names need the
/// backbone's own mapping and are handled by [`detectron2_name`].
pub fn detectron2_head_name(ours: &str) -> Option<String> {
    let (module, rest) = ours.split_once('.')?;
    match module {
        "fpn" => {
            let (block, param) = rest.split_once('.')?;
            let level = block.strip_prefix("lateral").or_else(|| block.strip_prefix("output"))?;
            let kind = if block.starts_with("lateral") { "lateral" } else { "output" };
            Some(format!("backbone.fpn_{kind}{level}.{param}"))
        }
        "rpn" => Some(format!("proposal_generator.rpn_head.{rest}")),
        "roi_heads" => Some(ours.to_string()),
        _ => None,
    }
}

/// Our variable name → detectron2's, with `backbone_name` mapping backbone-relative names (e.g.
/// `backbone::Backbone::external_name` with `WeightFormat::Detectron2`); the backbone lives under
/// `backbone.bottom_up.` in detectron2's FPN models.
pub fn detectron2_name(ours: &str, backbone_name: impl Fn(&str) -> Option<String>) -> Option<String> {
    match ours.strip_prefix("backbone.") {
        Some(rest) => backbone_name(rest).map(|n| format!("backbone.bottom_up.{n}")),
        None => detectron2_head_name(ours),
    }
}

/// Our variable name (as in the model's var store) → detectron2's, for `model`'s backbone.
pub fn detectron2_variable_name(model: &MaskRcnn, ours: &str) -> Option<String> {
    detectron2_name(ours, |n| model.backbone().external_name(WeightFormat::Detectron2, n))
}

/// Loads a whole detectron2 Mask R-CNN state dict (safetensors with detectron2's names; convert a `.pth` or
/// `.pkl` with `scripts/pth_to_safetensors.py`) into `vs`, the variables of `model`. Every variable must be found
/// with its shape and every tensor of the file used; BatchNorm counters, `pixel_mean`/`pixel_std` and anchor
/// buffers are ignored (they hold no weights) and reported as such.
pub fn import_detectron2(vs: &nn::VarStore, model: &MaskRcnn, file: &Path) -> Result<ImportReport, DetectorError> {
    let (buffers, source): (Vec<_>, Vec<_>) =
        read_safetensors(file)?.into_iter().partition(|(name, _)| is_config_buffer(name));
    let targets: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut report = assign(file, &targets, source, "", |ours| detectron2_variable_name(model, ours))?;
    report.ignored.extend(buffers.into_iter().map(|(name, _)| name));
    report.ignored.sort();
    Ok(report)
}

/// Every variable of `vs` (the variables of `model`) under its detectron2 name, row-major: written as a
/// safetensors file, it loads into detectron2's (and vovnet-detectron2's) model with `load_state_dict`, or into
/// `DetectionCheckpointer` once wrapped as a `.pth` (docs/detectron2.md). A variable with no detectron2
/// equivalent is an error naming it.
pub fn export_detectron2(vs: &nn::VarStore, model: &MaskRcnn) -> Result<Vec<(String, Tensor)>, DetectorError> {
    let mut named = Vec::new();
    let mut unmapped = Vec::new();
    for (ours, tensor) in vs.variables() {
        match detectron2_variable_name(model, &ours) {
            Some(theirs) => named.push((theirs, tensor.contiguous())),
            None => unmapped.push(ours),
        }
    }
    if !unmapped.is_empty() {
        unmapped.sort();
        return Err(DetectorError::NoExternalName { format: "detectron2".into(), names: unmapped.join(", ") });
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_detectron2() {
        let cases = [
            ("fpn.lateral2.weight", "backbone.fpn_lateral2.weight"),
            ("fpn.output5.norm.bias", "backbone.fpn_output5.norm.bias"),
            ("rpn.conv.weight", "proposal_generator.rpn_head.conv.weight"),
            ("rpn.anchor_deltas.bias", "proposal_generator.rpn_head.anchor_deltas.bias"),
            ("roi_heads.box_head.conv1.norm.weight", "roi_heads.box_head.conv1.norm.weight"),
            ("roi_heads.mask_head.deconv.weight", "roi_heads.mask_head.deconv.weight"),
        ];
        for (ours, theirs) in cases {
            assert_eq!(detectron2_head_name(ours).as_deref(), Some(theirs), "{ours}");
        }
        let backbone = |n: &str| backbone::weights::vovnet_d2_name(n, false);
        assert!(
            is_config_buffer("pixel_mean") && is_config_buffer("proposal_generator.anchor_generator.cell_anchors.0")
        );
        assert!(!is_config_buffer("proposal_generator.rpn_head.conv.weight"));
        assert_eq!(
            detectron2_name("backbone.stage4.1.ese.fc.bias", backbone).as_deref(),
            Some("backbone.bottom_up.stage4.OSA4_2.ese.fc.bias")
        );
        assert_eq!(detectron2_head_name("fpn.top.weight"), None);
    }
}
