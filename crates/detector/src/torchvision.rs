//! Importing torchvision `maskrcnn_resnet50_fpn` weights: parameter names mapped to ours, and the class layout
//! converted (torchvision puts background at index 0 and regresses boxes and masks for it too; we put background
//! last and have no background regression or mask).

use std::collections::BTreeMap;
use std::path::Path;

use backbone::weights::{assign, read_safetensors, torchvision_resnet_name};
use backbone::ImportReport;
use tch::{nn, Tensor};

use crate::DetectorError;

/// Our variable name → torchvision's `maskrcnn_resnet50_fpn` state-dict name, or `None` when torchvision has no
/// such tensor.
pub fn torchvision_name(ours: &str) -> Option<String> {
    let parts: Vec<&str> = ours.split('.').collect();
    let level = |name: &str, prefix: &str| -> Option<i64> { name.strip_prefix(prefix)?.parse::<i64>().ok() };
    match parts.as_slice() {
        ["backbone", rest @ ..] => torchvision_resnet_name(&rest.join(".")).map(|n| format!("backbone.body.{n}")),
        ["fpn", block, param] => {
            if let Some(k) = level(block, "lateral") {
                Some(format!("backbone.fpn.inner_blocks.{}.0.{param}", k - 2))
            } else {
                level(block, "output").map(|k| format!("backbone.fpn.layer_blocks.{}.0.{param}", k - 2))
            }
        }
        ["rpn", "conv", param] => Some(format!("rpn.head.conv.0.0.{param}")),
        ["rpn", "objectness_logits", param] => Some(format!("rpn.head.cls_logits.{param}")),
        ["rpn", "anchor_deltas", param] => Some(format!("rpn.head.bbox_pred.{param}")),
        ["roi_heads", "box_head", fc, param] => {
            level(fc, "fc").filter(|i| (1..=2).contains(i)).map(|i| format!("roi_heads.box_head.fc{}.{param}", i + 5))
        }
        ["roi_heads", "box_predictor", layer @ ("cls_score" | "bbox_pred"), param] => {
            Some(format!("roi_heads.box_predictor.{layer}.{param}"))
        }
        ["roi_heads", "mask_head", "deconv", param] => Some(format!("roi_heads.mask_predictor.conv5_mask.{param}")),
        ["roi_heads", "mask_head", "predictor", param] => {
            Some(format!("roi_heads.mask_predictor.mask_fcn_logits.{param}"))
        }
        ["roi_heads", "mask_head", conv, param] => {
            level(conv, "mask_fcn").map(|i| format!("roi_heads.mask_head.{}.0.{param}", i - 1))
        }
        _ => None,
    }
}

/// Rewrites the class-dependent tensors of a torchvision state dict into our class layout (names unchanged):
/// `cls_score` rows move background from first to last, `bbox_pred` and `mask_fcn_logits` drop the background
/// rows. Other tensors pass through.
pub fn torchvision_class_layout(state: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    state
        .into_iter()
        .map(|(name, tensor)| {
            let rows = tensor.size().first().copied().unwrap_or(0);
            let converted = match name.as_str() {
                "roi_heads.box_predictor.cls_score.weight" | "roi_heads.box_predictor.cls_score.bias" if rows > 0 => {
                    Tensor::cat(&[tensor.narrow(0, 1, rows - 1), tensor.narrow(0, 0, 1)], 0)
                }
                "roi_heads.box_predictor.bbox_pred.weight" | "roi_heads.box_predictor.bbox_pred.bias" if rows >= 4 => {
                    tensor.narrow(0, 4, rows - 4)
                }
                "roi_heads.mask_predictor.mask_fcn_logits.weight" | "roi_heads.mask_predictor.mask_fcn_logits.bias"
                    if rows > 0 =>
                {
                    tensor.narrow(0, 1, rows - 1)
                }
                _ => tensor,
            };
            (name, converted)
        })
        .collect()
}

/// Loads a torchvision `maskrcnn_resnet50_fpn` state dict (safetensors) into the variables of `vs` (a model
/// built from [`crate::DetectorConfig::torchvision_maskrcnn_r50_fpn`] with `num_classes` one less than
/// torchvision's). Every variable must be found with the right shape and every tensor of the file used, except
/// BatchNorm counters.
pub fn import_torchvision(vs: &nn::VarStore, file: &Path) -> Result<ImportReport, DetectorError> {
    let source = torchvision_class_layout(read_safetensors(file)?);
    let targets: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    Ok(assign(file, &targets, source, "", torchvision_name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_torchvision() {
        let cases = [
            ("backbone.stem.conv.weight", "backbone.body.conv1.weight"),
            ("backbone.stage3.0.shortcut.norm.running_var", "backbone.body.layer2.0.downsample.1.running_var"),
            ("fpn.lateral2.weight", "backbone.fpn.inner_blocks.0.0.weight"),
            ("fpn.output5.bias", "backbone.fpn.layer_blocks.3.0.bias"),
            ("rpn.conv.weight", "rpn.head.conv.0.0.weight"),
            ("rpn.objectness_logits.bias", "rpn.head.cls_logits.bias"),
            ("rpn.anchor_deltas.weight", "rpn.head.bbox_pred.weight"),
            ("roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc6.weight"),
            ("roi_heads.box_head.fc2.bias", "roi_heads.box_head.fc7.bias"),
            ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.weight"),
            ("roi_heads.mask_head.mask_fcn1.weight", "roi_heads.mask_head.0.0.weight"),
            ("roi_heads.mask_head.mask_fcn4.bias", "roi_heads.mask_head.3.0.bias"),
            ("roi_heads.mask_head.deconv.weight", "roi_heads.mask_predictor.conv5_mask.weight"),
            ("roi_heads.mask_head.predictor.bias", "roi_heads.mask_predictor.mask_fcn_logits.bias"),
        ];
        for (ours, theirs) in cases {
            assert_eq!(torchvision_name(ours).as_deref(), Some(theirs), "{ours}");
        }
        assert_eq!(torchvision_name("roi_heads.box_head.conv1.weight"), None);
        assert_eq!(torchvision_name("fpn.lateral2.norm.weight"), None);
    }

    #[test]
    fn class_layout_moves_background_last_and_drops_its_regression() {
        let scores = Tensor::from_slice(&[0.0f32, 1.0, 2.0]);
        let deltas = Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu));
        let out = torchvision_class_layout(vec![
            ("roi_heads.box_predictor.cls_score.bias".into(), scores),
            ("roi_heads.box_predictor.bbox_pred.bias".into(), deltas),
        ]);
        assert_eq!(Vec::<f32>::try_from(&out[0].1).unwrap(), [1.0, 2.0, 0.0]);
        assert_eq!(Vec::<f32>::try_from(&out[1].1).unwrap(), (4..12).map(|v| v as f32).collect::<Vec<_>>());
    }
}
