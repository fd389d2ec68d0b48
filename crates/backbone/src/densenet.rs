//! DenseNet-121/169/201/161 (Huang et al. 2017) with torchvision's layout, the baseline of the VoVNet paper's
//! efficiency claims: a 7x7 stride-2 stem with a 3x3 stride-2 max-pool, then four dense blocks whose layers each
//! concatenate every earlier feature map of the block (norm → ReLU → 1x1 conv to `4 * growth` → norm → ReLU → 3x3
//! conv to `growth`), joined by transitions (norm → ReLU → 1x1 conv halving the width → 2x2 average pool).
//!
//! Detection outputs. DenseNet is pre-activation, so a dense block's raw concatenation is un-normalised. Each stage
//! output is therefore the block's concatenation after a norm and a ReLU, and that norm is the one torchvision
//! already applies there: the next transition's `norm` for `stage2`..`stage4` (its ReLU output feeds both the FPN
//! and the transition's convolution) and `norm5` for `stage5` (torchvision's `features` ends with `norm5`; its
//! classifier applies the ReLU). No norm is added, so the parameters are exactly torchvision's `features` and its
//! weights map 1:1. To keep `freeze_at` meaning "everything that computes `stageK`", a transition's norm belongs to
//! the stage it normalises (`stageK.norm`) and its convolution to the next stage (`stageK+1.transition.conv`).
//! Dense layers are computed as torchvision computes them without gradient checkpointing: each layer concatenates
//! its inputs anew, which is the memory cost the VoVNet paper measures.

use tch::{nn, Tensor};

use crate::layers::{Conv2d, ConvInit, ConvNorm, ConvOpts};
use crate::norm::{Norm, NormSpec};
use crate::{BackboneError, FeatureSpec};

/// Widths and depths of one DenseNet variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseNetSpec {
    /// Variant name as written in configs, e.g. `DenseNet-201`.
    pub name: &'static str,
    /// Channels each dense layer adds to its block's concatenation.
    pub growth: i64,
    /// Output channels of the stem convolution.
    pub stem: i64,
    /// Dense layers per block, stages 2..5.
    pub layers_per_block: [i64; 4],
}

/// The 1x1 bottleneck of a dense layer is `BOTTLENECK_FACTOR * growth` wide (torchvision's `bn_size`).
const BOTTLENECK_FACTOR: i64 = 4;

/// torchvision's DenseNet variants.
pub const DENSENET_SPECS: [DenseNetSpec; 4] = [
    DenseNetSpec { name: "DenseNet-121", growth: 32, stem: 64, layers_per_block: [6, 12, 24, 16] },
    DenseNetSpec { name: "DenseNet-169", growth: 32, stem: 64, layers_per_block: [6, 12, 32, 32] },
    DenseNetSpec { name: "DenseNet-201", growth: 32, stem: 64, layers_per_block: [6, 12, 48, 32] },
    DenseNetSpec { name: "DenseNet-161", growth: 48, stem: 96, layers_per_block: [6, 12, 36, 24] },
];

/// Looks a variant up by its config name.
pub fn densenet_spec(name: &str) -> Option<&'static DenseNetSpec> {
    DENSENET_SPECS.iter().find(|s| s.name == name)
}

/// Pre-activation unit: norm → ReLU → convolution (no bias).
#[derive(Debug)]
struct NormReluConv {
    norm: Norm,
    conv: Conv2d,
}

impl NormReluConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        path: &nn::Path,
        norm_name: &str,
        conv_name: &str,
        cin: i64,
        cout: i64,
        kernel: i64,
        norm: &NormSpec,
    ) -> Result<Self, BackboneError> {
        Ok(NormReluConv {
            norm: Norm::new(&path.sub(norm_name), cin, norm)?,
            conv: Conv2d::new(&path.sub(conv_name), cin, cout, kernel, ConvOpts::default()),
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.conv.forward(&self.norm.forward_t(x, train).relu())
    }
}

/// One dense layer: the concatenation of every earlier map of the block through a 1x1 bottleneck and a 3x3
/// convolution, producing `growth` new channels.
#[derive(Debug)]
struct DenseLayer {
    bottleneck: NormReluConv,
    conv: NormReluConv,
}

impl DenseLayer {
    fn new(path: &nn::Path, cin: i64, growth: i64, norm: &NormSpec) -> Result<Self, BackboneError> {
        let width = BOTTLENECK_FACTOR * growth;
        Ok(DenseLayer {
            bottleneck: NormReluConv::new(path, "norm1", "conv1", cin, width, 1, norm)?,
            conv: NormReluConv::new(path, "norm2", "conv2", width, growth, 3, norm)?,
        })
    }

    fn forward_t(&self, features: &[Tensor], train: bool) -> Tensor {
        self.conv.forward_t(&self.bottleneck.forward_t(&Tensor::cat(features, 1), train), train)
    }
}

/// A stage: the previous stage's transition convolution and average pool (stages 3..5), a dense block, and the
/// norm that, with a ReLU, turns the block's concatenation into the stage output.
#[derive(Debug)]
struct Stage {
    transition: Option<Conv2d>,
    layers: Vec<DenseLayer>,
    norm: Norm,
}

impl Stage {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let input = match &self.transition {
            Some(conv) => conv.forward(x).avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>),
            None => x.shallow_clone(),
        };
        let mut features = vec![input];
        for layer in &self.layers {
            let new = layer.forward_t(&features, train);
            features.push(new);
        }
        self.norm.forward_t(&Tensor::cat(&features, 1), train).relu()
    }
}

/// DenseNet: stem and stages 2..5, exposing `stem` and `stage2..stage5` (strides 4, 4, 8, 16, 32).
#[derive(Debug)]
pub struct DenseNet {
    stem: ConvNorm,
    stages: Vec<Stage>,
    specs: Vec<FeatureSpec>,
}

impl DenseNet {
    /// Builds `spec` under `path`: variables `stem.{conv,norm}.*`, `stageK.{i}.{norm1,conv1,norm2,conv2}.*` for
    /// dense layer `i`, `stageK.norm.*` and, for K = 3..5, `stageK.transition.conv.*`. Convolutions start from
    /// torchvision's `kaiming_normal_` (fan-in), norms from weight 1 and bias 0.
    pub fn new(path: &nn::Path, spec: &DenseNetSpec, norm: &NormSpec) -> Result<DenseNet, BackboneError> {
        let stem_opts = ConvOpts { stride: 2, init: ConvInit::KaimingNormalFanIn, ..Default::default() };
        let stem = ConvNorm::new(&path.sub("stem"), "conv", "norm", 3, spec.stem, 7, stem_opts, norm, true)?;
        let mut specs = vec![FeatureSpec { name: "stem".into(), stride: 4, channels: spec.stem }];
        let mut stages = Vec::new();
        let mut cin = spec.stem;
        for (i, &count) in spec.layers_per_block.iter().enumerate() {
            let stage_path = path.sub(format!("stage{}", i + 2));
            let transition = (i > 0).then(|| {
                let halved = cin / 2;
                let conv = Conv2d::new(&stage_path.sub("transition").sub("conv"), cin, halved, 1, ConvOpts::default());
                cin = halved;
                conv
            });
            let mut layers = Vec::new();
            for l in 0..count {
                layers.push(DenseLayer::new(&stage_path.sub(l), cin, spec.growth, norm)?);
                cin += spec.growth;
            }
            let stage_norm = Norm::new(&stage_path.sub("norm"), cin, norm)?;
            stages.push(Stage { transition, layers, norm: stage_norm });
            specs.push(FeatureSpec { name: format!("stage{}", i + 2), stride: 4 << i, channels: cin });
        }
        Ok(DenseNet { stem, stages, specs })
    }

    /// Output names, strides and widths: `stem`, `stage2`..`stage5`.
    pub fn feature_specs(&self) -> &[FeatureSpec] {
        &self.specs
    }

    /// Runs the network and returns every named output in [`Self::feature_specs`] order.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut y = self.stem.forward_t(x, train).max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut outputs = vec![y.shallow_clone()];
        for stage in &self.stages {
            y = stage.forward_t(&y, train);
            outputs.push(y.shallow_clone());
        }
        outputs
    }
}
