//! Backbones for vovdet: VoVNet V1/V2 (every variant of `shared/notes/vovnet.md`), ResNet-50/101 baselines and
//! the DenseNets the VoVNet paper compares against, their norm layers (GroupNorm, BatchNorm, FrozenBN, SyncBN), initialisation, freezing, FLOP counting and the
//! import of weights written with the authors' vovnet-detectron2 or torchvision parameter names.
//!
//! A backbone exposes named outputs (`stem`, `stage2`..`stage5`) with their strides and widths; the FPN reads
//! those instead of hard-coding channel counts.

pub mod densenet;
pub mod flops;
pub mod layers;
pub mod norm;
pub mod resnet;
pub mod vovnet;
pub mod weights;

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

pub use norm::{BatchStatsReducer, NormKind, NormSpec};
pub use weights::{ImportReport, WeightFormat};

use densenet::DenseNet;
use resnet::ResNet;
use vovnet::VoVNet;

/// Errors raised while building a backbone or importing its weights.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// `model.backbone.name` names no known network.
    #[error("unknown backbone `{name}` (model.backbone.name); valid names: {valid}")]
    UnknownName { name: String, valid: String },
    /// A GroupNorm layer whose width is not a multiple of the group count.
    #[error(
        "GroupNorm at `{layer}`: {channels} channels are not divisible by {groups} groups; \
         set model.backbone.gn_groups to a divisor of every width (slim VoVNets need e.g. 16)"
    )]
    GroupCount { layer: String, channels: i64, groups: i64 },
    /// `freeze_at` beyond the last stage.
    #[error("model.backbone.freeze_at = {0} is out of range: 0 (nothing frozen) to 5 (stem and stages 2..5)")]
    FreezeAt(u32),
    /// A from-scratch configuration that freezes layers or uses FrozenBN.
    #[error(
        "from-scratch training (no weights to initialise from) with {0}: frozen random layers and FrozenBN without \
         pretrained statistics are the classic cause of ~0 AP; use model.backbone.freeze_at = 0 with norm = \"GN\" \
         (or \"BN\"/\"SyncBN\"), or give pretrained weights"
    )]
    ScratchFrozen(String),
    /// `stride_in_1x1` set for a network that is not a ResNet.
    #[error("model.backbone.stride_in_1x1 applies to ResNets only, not to `{0}`")]
    StrideIn1x1(String),
    /// An unknown output name in `out_features`.
    #[error("model.backbone.out_features: unknown output `{name}`; valid outputs: {valid}")]
    UnknownFeature { name: String, valid: String },
    /// Weights file unreadable, truncated or not safetensors.
    #[error("cannot read weights file {path}: {reason}")]
    WeightsFile { path: String, reason: String },
    /// Weights file whose names or shapes do not match the model.
    #[error("weights file {path} does not match the model: {details}")]
    WeightsMismatch { path: String, details: String },
}

fn default_version() -> u8 {
    2
}
fn default_gn_groups() -> i64 {
    32
}
fn default_out_features() -> Vec<String> {
    ["stage2", "stage3", "stage4", "stage5"].map(String::from).to_vec()
}

/// The `[model.backbone]` section of a config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// `V-19-slim-dw`, `V-19-dw`, `V-19-slim`, `V-19`, `V-27-slim`, `V-39`, `V-57`, `V-99`, `R-50`, `R-101`,
    /// `DenseNet-121`, `DenseNet-169`, `DenseNet-201` or `DenseNet-161`.
    pub name: String,
    /// VoVNet version: 2 (default) turns eSE and identity mapping on, 1 turns both off (ignored by other networks).
    #[serde(default = "default_version")]
    pub version: u8,
    /// Overrides the version's eSE choice (eSE in every OSA module).
    #[serde(default)]
    pub ese: Option<bool>,
    /// Overrides the version's identity-mapping choice (modules 2..N of each stage).
    #[serde(default)]
    pub identity: Option<bool>,
    /// Norm layer after every convolution.
    #[serde(default)]
    pub norm: NormKind,
    /// GroupNorm group count.
    #[serde(default = "default_gn_groups")]
    pub gn_groups: i64,
    /// 0 freezes nothing; k freezes the stem (1) and stages 2..k.
    #[serde(default)]
    pub freeze_at: u32,
    /// Outputs handed to the FPN.
    #[serde(default = "default_out_features")]
    pub out_features: Vec<String>,
    /// ResNet only: the stride of each stage's first block on its 1x1 convolution instead of the 3x3 (MSRA's
    /// original ResNet, detectron2's `RESNETS.STRIDE_IN_1X1 = True`, the layout of detectron2's ImageNet-
    /// pretrained model-zoo checkpoints); false is torchvision's layout and detectron2's scratch recipe.
    #[serde(default)]
    pub stride_in_1x1: bool,
}

impl BackboneConfig {
    /// A config for `name` with the from-scratch defaults (V2, GN(32), nothing frozen, stage2..stage5 out).
    pub fn new(name: &str) -> Self {
        BackboneConfig {
            name: name.to_string(),
            version: default_version(),
            ese: None,
            identity: None,
            norm: NormKind::GN,
            gn_groups: default_gn_groups(),
            freeze_at: 0,
            out_features: default_out_features(),
            stride_in_1x1: false,
        }
    }

    /// Refuses settings that cannot train from random initialisation: frozen layers or FrozenBN.
    /// Call it when no weights are given to initialise from.
    pub fn check_from_scratch(&self) -> Result<(), BackboneError> {
        if self.freeze_at > 0 {
            return Err(BackboneError::ScratchFrozen(format!("model.backbone.freeze_at = {}", self.freeze_at)));
        }
        if self.norm == NormKind::FrozenBN {
            return Err(BackboneError::ScratchFrozen("model.backbone.norm = \"FrozenBN\"".into()));
        }
        Ok(())
    }
}

/// Every backbone name accepted in `model.backbone.name`.
pub fn backbone_names() -> Vec<&'static str> {
    let mut names: Vec<_> = vovnet::VOVNET_SPECS.iter().map(|s| s.name).collect();
    names.extend(["R-50", "R-101"]);
    names.extend(densenet::DENSENET_SPECS.iter().map(|s| s.name));
    names
}

/// Name, stride and channel count of one backbone output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureSpec {
    /// Output name: `stem`, `stage2` .. `stage5`.
    pub name: String,
    /// Stride relative to the input image.
    pub stride: i64,
    /// Number of channels.
    pub channels: i64,
}

/// The network behind a [`Backbone`]; the variants carry the networks' own names, which all end in `Net`.
#[allow(clippy::enum_variant_names)]
#[derive(Debug)]
enum Network {
    VoVNet(VoVNet, vovnet::VoVNetSpec),
    ResNet(ResNet),
    DenseNet(DenseNet),
}

/// A backbone built from a [`BackboneConfig`], returning the configured outputs.
#[derive(Debug)]
pub struct Backbone {
    network: Network,
    config: BackboneConfig,
    out_indices: Vec<usize>,
}

impl Backbone {
    /// Builds the backbone under `path` and applies `freeze_at`. `norm` carries the SyncBN reducer if any;
    /// its kind and group count come from `config`.
    pub fn new(
        path: &nn::Path,
        config: &BackboneConfig,
        reducer: Option<std::sync::Arc<dyn BatchStatsReducer>>,
    ) -> Result<Backbone, BackboneError> {
        if config.freeze_at > 5 {
            return Err(BackboneError::FreezeAt(config.freeze_at));
        }
        if config.stride_in_1x1 && resnet::resnet_depths(&config.name).is_none() {
            return Err(BackboneError::StrideIn1x1(config.name.clone()));
        }
        let norm = NormSpec { kind: config.norm, gn_groups: config.gn_groups, reducer };
        let v2 = config.version >= 2;
        let network = if let Some(spec) = vovnet::vovnet_spec(&config.name) {
            let ese = config.ese.unwrap_or(v2);
            let identity = config.identity.unwrap_or(v2);
            Network::VoVNet(VoVNet::new(path, spec, ese, identity, &norm)?, *spec)
        } else if let Some(depths) = resnet::resnet_depths(&config.name) {
            Network::ResNet(ResNet::new(path, depths, config.stride_in_1x1, &norm)?)
        } else if let Some(spec) = densenet::densenet_spec(&config.name) {
            Network::DenseNet(DenseNet::new(path, spec, &norm)?)
        } else {
            return Err(BackboneError::UnknownName { name: config.name.clone(), valid: backbone_names().join(", ") });
        };
        let all = match &network {
            Network::VoVNet(net, _) => net.feature_specs(),
            Network::ResNet(net) => net.feature_specs(),
            Network::DenseNet(net) => net.feature_specs(),
        };
        let out_indices = config
            .out_features
            .iter()
            .map(|name| {
                all.iter().position(|s| &s.name == name).ok_or_else(|| BackboneError::UnknownFeature {
                    name: name.clone(),
                    valid: all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Backbone { network, config: config.clone(), out_indices })
    }

    /// The config the backbone was built from.
    pub fn config(&self) -> &BackboneConfig {
        &self.config
    }

    /// Every output the network computes (`stem`, `stage2`..`stage5`).
    pub fn all_feature_specs(&self) -> &[FeatureSpec] {
        match &self.network {
            Network::VoVNet(net, _) => net.feature_specs(),
            Network::ResNet(net) => net.feature_specs(),
            Network::DenseNet(net) => net.feature_specs(),
        }
    }

    /// The configured outputs (`out_features`), in order.
    pub fn output_specs(&self) -> Vec<FeatureSpec> {
        let all = self.all_feature_specs();
        self.out_indices.iter().map(|&i| all[i].clone()).collect()
    }

    /// Runs the backbone on an NCHW batch and returns the configured outputs, in [`Self::output_specs`] order.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let all = match &self.network {
            Network::VoVNet(net, _) => net.forward_t(x, train),
            Network::ResNet(net) => net.forward_t(x, train),
            Network::DenseNet(net) => net.forward_t(x, train),
        };
        self.out_indices.iter().map(|&i| all[i].shallow_clone()).collect()
    }

    /// Variable-name prefixes (relative to the backbone's path) that `freeze_at` freezes.
    pub fn frozen_prefixes(&self) -> Vec<String> {
        (1..=self.config.freeze_at).map(|k| if k == 1 { "stem.".to_string() } else { format!("stage{k}.") }).collect()
    }

    /// Maps one of our variable names (relative to the backbone's path) to its name in `format`, or `None` when
    /// the format has no such tensor.
    pub fn external_name(&self, format: WeightFormat, ours: &str) -> Option<String> {
        match (&self.network, format) {
            (_, WeightFormat::Vovdet) => Some(ours.to_string()),
            (Network::VoVNet(_, spec), WeightFormat::Detectron2) => weights::vovnet_d2_name(ours, spec.depthwise),
            (Network::ResNet(_), WeightFormat::Detectron2) => weights::detectron2_resnet_name(ours),
            (Network::ResNet(_), WeightFormat::Torchvision) => weights::torchvision_resnet_name(ours),
            (Network::DenseNet(_), WeightFormat::Torchvision) => weights::torchvision_densenet_name(ours),
            _ => None,
        }
    }
}

/// Turns off gradients for every variable of `vs` whose name starts with `root` followed by one of the
/// backbone's [`Backbone::frozen_prefixes`]; returns how many tensors were frozen. The optimizer skips
/// tensors that do not require gradients.
pub fn freeze(vs: &nn::VarStore, root: &str, backbone: &Backbone) -> usize {
    let prefixes: Vec<String> = backbone.frozen_prefixes().iter().map(|p| format!("{root}{p}")).collect();
    let mut frozen = 0;
    for (name, tensor) in vs.variables() {
        if prefixes.iter().any(|p| name.starts_with(p)) {
            let _ = tensor.set_requires_grad(false);
            frozen += 1;
        }
    }
    frozen
}
