//! Importing weights from safetensors files written with other frameworks' parameter names.
//!
//! Every model variable is looked up under its external name; missing, unexpected and mis-shaped tensors are
//! reported by name and refuse the import, so nothing is silently skipped. The only names ignored are
//! BatchNorm's `num_batches_tracked` counters, which hold no weights.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::BackboneError;

/// Parameter naming of a weights file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightFormat {
    /// Our own names (checkpoints written by vovdet).
    Vovdet,
    /// detectron2: the VoVNet authors' vovnet-detectron2 / CenterMask names for VoVNet
    /// (`stem.stem_1/conv.weight`, `stage4.OSA4_2.ese.fc.bias`, ...), detectron2's own for ResNet
    /// (`stem.conv1.norm.weight`, `res2.0.conv1.weight`, `res3.0.shortcut.weight`, ...). Parsed from `detectron2`
    /// or `vovnet-detectron2`.
    Detectron2,
    /// torchvision (`conv1.weight`, `layer1.0.bn1.running_mean`, `features.denseblock1.denselayer1.conv1.weight`,
    /// ...).
    Torchvision,
}

impl FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vovdet" => Ok(WeightFormat::Vovdet),
            "detectron2" | "vovnet-detectron2" => Ok(WeightFormat::Detectron2),
            "torchvision" => Ok(WeightFormat::Torchvision),
            _ => Err(format!(
                "unknown weight format `{s}`; valid formats: vovdet, detectron2 (or vovnet-detectron2), torchvision"
            )),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::Vovdet => "vovdet",
            WeightFormat::Detectron2 => "detectron2",
            WeightFormat::Torchvision => "torchvision",
        })
    }
}

/// Reads every tensor of a safetensors file; a missing, truncated or corrupt file is an error naming it.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, BackboneError> {
    let file_error = |reason: String| BackboneError::WeightsFile { path: path.display().to_string(), reason };
    if !path.is_file() {
        return Err(file_error("no such file".into()));
    }
    Tensor::read_safetensors(path).map_err(|e| file_error(format!("not a valid safetensors file ({e})")))
}

/// What an import matched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Tensors copied into the model.
    pub loaded: usize,
    /// Names in the file that were ignored because they hold no weights (`num_batches_tracked`).
    pub ignored: Vec<String>,
}

/// Copies `source` tensors into `targets` (our variables by name): each target `ours` is read from the source
/// name `external(ours)`, with `prefix` prepended. Fails, naming every offender, when a target is missing from the
/// file, a file tensor is not used, or shapes differ.
pub fn assign(
    file: &Path,
    targets: &BTreeMap<String, Tensor>,
    source: Vec<(String, Tensor)>,
    prefix: &str,
    external: impl Fn(&str) -> Option<String>,
) -> Result<ImportReport, BackboneError> {
    let mut source: HashMap<String, Tensor> = source.into_iter().collect();
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    let mut pairs = Vec::new();
    for (ours, target) in targets {
        let Some(theirs) = external(ours).map(|n| format!("{prefix}{n}")) else {
            missing.push(format!("{ours} (no equivalent in this format)"));
            continue;
        };
        match source.remove(&theirs) {
            None => missing.push(theirs),
            Some(tensor) if tensor.size() != target.size() => {
                mismatched.push(format!("{theirs}: file {:?}, model {:?} ({ours})", tensor.size(), target.size()))
            }
            Some(tensor) => pairs.push((target, tensor)),
        }
    }
    let (ignored, mut unexpected): (Vec<String>, Vec<String>) =
        source.into_keys().partition(|name| name.ends_with("num_batches_tracked"));
    unexpected.sort();
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        let mut details = Vec::new();
        for (what, names) in [("missing", &missing), ("unexpected", &unexpected), ("wrong shape", &mismatched)] {
            if !names.is_empty() {
                let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
                let more = if names.len() > 20 { format!(" and {} more", names.len() - 20) } else { String::new() };
                details.push(format!("{} {what}: {}{more}", names.len(), shown.join(", ")));
            }
        }
        return Err(BackboneError::WeightsMismatch { path: file.display().to_string(), details: details.join("; ") });
    }
    tch::no_grad(|| {
        for (target, tensor) in &pairs {
            target.shallow_clone().f_copy_(&tensor.to_kind(target.kind())).expect("same shape checked above");
        }
    });
    let mut ignored = ignored;
    ignored.sort();
    Ok(ImportReport { loaded: pairs.len(), ignored })
}

/// Our VoVNet name → vovnet-detectron2's. `depthwise` selects the `-dw` unit names (`dw_conv3x3`, `pw_conv1x1`,
/// `pw_norm`) for the stem's second and third units and the OSA layers.
pub fn vovnet_d2_name(ours: &str, depthwise: bool) -> Option<String> {
    let parts: Vec<&str> = ours.split('.').collect();
    let unit_part = |part: &str, dw_unit: bool| -> Option<&'static str> {
        match (part, dw_unit) {
            ("conv", false) => Some("conv"),
            ("norm", false) => Some("norm"),
            ("dw", true) => Some("dw_conv3x3"),
            ("pw", true) => Some("pw_conv1x1"),
            ("norm", true) => Some("pw_norm"),
            _ => None,
        }
    };
    match parts.as_slice() {
        ["stem", k, part, param] => {
            let dw_unit = depthwise && *k != "1";
            Some(format!("stem.stem_{k}/{}.{param}", unit_part(part, dw_unit)?))
        }
        [stage, module, rest @ ..] if stage.starts_with("stage") => {
            let s = stage.strip_prefix("stage")?;
            let m: usize = module.parse().ok()?;
            let osa = format!("OSA{s}_{}", m + 1);
            let tail = match rest {
                ["reduce", part, param] => {
                    format!("conv_reduction.{osa}_reduction_0/{}.{param}", unit_part(part, false)?)
                }
                ["layers", i, part, param] => format!("layers.{i}.{osa}_{i}/{}.{param}", unit_part(part, depthwise)?),
                ["concat", part, param] => format!("concat.{osa}_concat/{}.{param}", unit_part(part, false)?),
                ["ese", "fc", param] => format!("ese.fc.{param}"),
                _ => return None,
            };
            Some(format!("{stage}.{osa}.{tail}"))
        }
        _ => None,
    }
}

/// Our ResNet name → torchvision's `resnet50`/`resnet101` state-dict name.
pub fn torchvision_resnet_name(ours: &str) -> Option<String> {
    let parts: Vec<&str> = ours.split('.').collect();
    match parts.as_slice() {
        ["stem", "conv", param] => Some(format!("conv1.{param}")),
        ["stem", "norm", param] => Some(format!("bn1.{param}")),
        [stage, block, rest @ ..] if stage.starts_with("stage") => {
            let s: usize = stage.strip_prefix("stage")?.parse().ok()?;
            let layer = format!("layer{}.{block}", s - 1);
            match rest {
                ["shortcut", "conv", param] => Some(format!("{layer}.downsample.0.{param}")),
                ["shortcut", "norm", param] => Some(format!("{layer}.downsample.1.{param}")),
                [part, param] => {
                    if let Some(j) = part.strip_prefix("conv") {
                        Some(format!("{layer}.conv{j}.{param}"))
                    } else {
                        part.strip_prefix("norm").map(|j| format!("{layer}.bn{j}.{param}"))
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Our ResNet name → detectron2's (`build_resnet_backbone`): the stem is `stem.conv1`, stage K is `resK`, and
/// each norm lives under its convolution (`res2.0.conv1.norm.weight`, `res3.0.shortcut.norm.bias`).
pub fn detectron2_resnet_name(ours: &str) -> Option<String> {
    let parts: Vec<&str> = ours.split('.').collect();
    match parts.as_slice() {
        ["stem", "conv", param] => Some(format!("stem.conv1.{param}")),
        ["stem", "norm", param] => Some(format!("stem.conv1.norm.{param}")),
        [stage, block, rest @ ..] => {
            let s: usize = stage.strip_prefix("stage")?.parse().ok().filter(|s| (2..=5).contains(s))?;
            let unit = format!("res{s}.{block}");
            match rest {
                ["shortcut", "conv", param] => Some(format!("{unit}.shortcut.{param}")),
                ["shortcut", "norm", param] => Some(format!("{unit}.shortcut.norm.{param}")),
                [part, param] => match (part.strip_prefix("conv"), part.strip_prefix("norm")) {
                    (Some(j), _) => Some(format!("{unit}.conv{j}.{param}")),
                    (_, Some(j)) => Some(format!("{unit}.conv{j}.norm.{param}")),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// Our DenseNet name → torchvision's `densenet121/169/201/161` state-dict name. A transition's norm is our
/// `stageK.norm` (K = 2..4; `stage5.norm` is `norm5`) and its convolution our `stageK+1.transition.conv`; dense
/// layers are numbered from 0 here and from 1 in torchvision.
pub fn torchvision_densenet_name(ours: &str) -> Option<String> {
    let parts: Vec<&str> = ours.split('.').collect();
    let name = match parts.as_slice() {
        ["stem", "conv", param] => format!("conv0.{param}"),
        ["stem", "norm", param] => format!("norm0.{param}"),
        [stage, rest @ ..] => {
            let s: usize = stage.strip_prefix("stage")?.parse().ok().filter(|s| (2..=5).contains(s))?;
            match rest {
                ["norm", param] if s == 5 => format!("norm5.{param}"),
                ["norm", param] => format!("transition{}.norm.{param}", s - 1),
                ["transition", "conv", param] if s > 2 => format!("transition{}.conv.{param}", s - 2),
                [layer, part @ ("norm1" | "conv1" | "norm2" | "conv2"), param] => {
                    let l: usize = layer.parse().ok()?;
                    format!("denseblock{}.denselayer{}.{part}.{param}", s - 1, l + 1)
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("features.{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vovnet_names_follow_the_authors_layout() {
        let cases = [
            ("stem.1.conv.weight", false, "stem.stem_1/conv.weight"),
            ("stem.3.norm.bias", false, "stem.stem_3/norm.bias"),
            ("stem.2.dw.weight", true, "stem.stem_2/dw_conv3x3.weight"),
            ("stem.3.norm.weight", true, "stem.stem_3/pw_norm.weight"),
            ("stem.1.norm.weight", true, "stem.stem_1/norm.weight"),
            ("stage4.1.layers.0.norm.weight", false, "stage4.OSA4_2.layers.0.OSA4_2_0/norm.weight"),
            ("stage4.1.concat.conv.weight", false, "stage4.OSA4_2.concat.OSA4_2_concat/conv.weight"),
            ("stage4.1.ese.fc.bias", false, "stage4.OSA4_2.ese.fc.bias"),
            ("stage2.0.reduce.conv.weight", true, "stage2.OSA2_1.conv_reduction.OSA2_1_reduction_0/conv.weight"),
            ("stage3.0.layers.2.pw.weight", true, "stage3.OSA3_1.layers.2.OSA3_1_2/pw_conv1x1.weight"),
        ];
        for (ours, dw, theirs) in cases {
            assert_eq!(vovnet_d2_name(ours, dw).as_deref(), Some(theirs), "{ours}");
        }
        assert_eq!(vovnet_d2_name("stage4.1.layers.0.dw.weight", false), None);
    }

    #[test]
    fn resnet_names_follow_torchvision() {
        let cases = [
            ("stem.conv.weight", "conv1.weight"),
            ("stem.norm.running_var", "bn1.running_var"),
            ("stage2.0.conv1.weight", "layer1.0.conv1.weight"),
            ("stage5.2.norm3.bias", "layer4.2.bn3.bias"),
            ("stage3.0.shortcut.conv.weight", "layer2.0.downsample.0.weight"),
            ("stage3.0.shortcut.norm.running_mean", "layer2.0.downsample.1.running_mean"),
        ];
        for (ours, theirs) in cases {
            assert_eq!(torchvision_resnet_name(ours).as_deref(), Some(theirs), "{ours}");
        }
    }

    #[test]
    fn resnet_names_follow_detectron2() {
        let cases = [
            ("stem.conv.weight", "stem.conv1.weight"),
            ("stem.norm.running_var", "stem.conv1.norm.running_var"),
            ("stage2.0.conv1.weight", "res2.0.conv1.weight"),
            ("stage5.2.norm3.bias", "res5.2.conv3.norm.bias"),
            ("stage3.0.shortcut.conv.weight", "res3.0.shortcut.weight"),
            ("stage3.0.shortcut.norm.weight", "res3.0.shortcut.norm.weight"),
        ];
        for (ours, theirs) in cases {
            assert_eq!(detectron2_resnet_name(ours).as_deref(), Some(theirs), "{ours}");
        }
        assert_eq!(detectron2_resnet_name("stage6.0.conv1.weight"), None);
    }

    #[test]
    fn densenet_names_follow_torchvision() {
        let cases = [
            ("stem.conv.weight", "features.conv0.weight"),
            ("stem.norm.running_mean", "features.norm0.running_mean"),
            ("stage2.0.norm1.weight", "features.denseblock1.denselayer1.norm1.weight"),
            ("stage4.47.conv2.weight", "features.denseblock3.denselayer48.conv2.weight"),
            ("stage2.norm.bias", "features.transition1.norm.bias"),
            ("stage3.transition.conv.weight", "features.transition1.conv.weight"),
            ("stage5.transition.conv.weight", "features.transition3.conv.weight"),
            ("stage5.norm.running_var", "features.norm5.running_var"),
        ];
        for (ours, theirs) in cases {
            assert_eq!(torchvision_densenet_name(ours).as_deref(), Some(theirs), "{ours}");
        }
        for ours in ["stage2.transition.conv.weight", "stage6.norm.weight", "stage3.0.conv3.weight", "head.weight"] {
            assert_eq!(torchvision_densenet_name(ours), None, "{ours}");
        }
    }
}
