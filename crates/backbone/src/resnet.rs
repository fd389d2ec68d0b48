//! ResNet-50/101 baselines with bottleneck blocks, the stride on the 3x3 convolution (torchvision and
//! detectron2's scratch recipe), and any norm layer: GN for from-scratch training, FrozenBN for imported
//! ImageNet or torchvision weights.

use tch::{nn, Tensor};

use crate::layers::{ConvInit, ConvNorm, ConvOpts};
use crate::norm::NormSpec;
use crate::{BackboneError, FeatureSpec};

/// Looks up the number of bottleneck blocks per stage (stages 2..5) for `R-50` or `R-101`.
pub fn resnet_depths(name: &str) -> Option<[i64; 4]> {
    match name {
        "R-50" => Some([3, 4, 6, 3]),
        "R-101" => Some([3, 4, 23, 3]),
        _ => None,
    }
}

/// 1x1 → 3x3 → 1x1 with the stride on the 3x3 (or on the first 1x1, MSRA's layout) and a projection shortcut
/// where the shape changes.
#[derive(Debug)]
struct Bottleneck {
    conv1: ConvNorm,
    conv2: ConvNorm,
    conv3: ConvNorm,
    shortcut: Option<ConvNorm>,
}

impl Bottleneck {
    fn new(
        path: &nn::Path,
        cin: i64,
        width: i64,
        cout: i64,
        stride: i64,
        stride_in_1x1: bool,
        norm: &NormSpec,
    ) -> Result<Self, BackboneError> {
        let opts = ConvOpts { init: ConvInit::MsraFanOut, ..Default::default() };
        let strided = ConvOpts { stride, ..opts };
        let (opts1, opts2) = if stride_in_1x1 { (strided, opts) } else { (opts, strided) };
        let shortcut = if cin != cout || stride != 1 {
            Some(ConvNorm::new(&path.sub("shortcut"), "conv", "norm", cin, cout, 1, strided, norm, false)?)
        } else {
            None
        };
        Ok(Bottleneck {
            conv1: ConvNorm::new(path, "conv1", "norm1", cin, width, 1, opts1, norm, true)?,
            conv2: ConvNorm::new(path, "conv2", "norm2", width, width, 3, opts2, norm, true)?,
            conv3: ConvNorm::new(path, "conv3", "norm3", width, cout, 1, opts, norm, false)?,
            shortcut,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.conv3.forward_t(&self.conv2.forward_t(&self.conv1.forward_t(x, train), train), train);
        let identity = match &self.shortcut {
            Some(shortcut) => shortcut.forward_t(x, train),
            None => x.shallow_clone(),
        };
        (y + identity).relu()
    }
}

/// ResNet: 7x7 stride-2 stem with a 3x3 stride-2 max-pool, then four bottleneck stages.
#[derive(Debug)]
pub struct ResNet {
    stem: ConvNorm,
    stages: Vec<Vec<Bottleneck>>,
    specs: Vec<FeatureSpec>,
}

impl ResNet {
    /// Builds a ResNet with `depths` blocks per stage under `path` (variables `stem.*`, `stage2.*` ..), with the
    /// stride of a stage's first block on its 1x1 convolution when `stride_in_1x1`.
    pub fn new(
        path: &nn::Path,
        depths: [i64; 4],
        stride_in_1x1: bool,
        norm: &NormSpec,
    ) -> Result<ResNet, BackboneError> {
        let stem_opts = ConvOpts { stride: 2, init: ConvInit::MsraFanOut, ..Default::default() };
        let stem = ConvNorm::new(&path.sub("stem"), "conv", "norm", 3, 64, 7, stem_opts, norm, true)?;
        let mut specs = vec![FeatureSpec { name: "stem".into(), stride: 4, channels: 64 }];
        let mut stages = Vec::new();
        let mut cin = 64;
        for (i, &count) in depths.iter().enumerate() {
            let stage_path = path.sub(format!("stage{}", i + 2));
            let width = 64 << i;
            let cout = 256 << i;
            let mut blocks = Vec::new();
            for b in 0..count {
                let stride = if b == 0 && i > 0 { 2 } else { 1 };
                blocks.push(Bottleneck::new(&stage_path.sub(b), cin, width, cout, stride, stride_in_1x1, norm)?);
                cin = cout;
            }
            stages.push(blocks);
            specs.push(FeatureSpec { name: format!("stage{}", i + 2), stride: 4 << i, channels: cout });
        }
        Ok(ResNet { stem, stages, specs })
    }

    /// Output names, strides and widths: `stem`, `stage2`..`stage5`.
    pub fn feature_specs(&self) -> &[FeatureSpec] {
        &self.specs
    }

    /// Runs the network and returns every named output in [`Self::feature_specs`] order.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut y = self.stem.forward_t(x, train).max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut outputs = vec![y.shallow_clone()];
        for blocks in &self.stages {
            for block in blocks {
                y = block.forward_t(&y, train);
            }
            outputs.push(y.shallow_clone());
        }
        outputs
    }
}
