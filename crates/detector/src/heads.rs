//! The box head (`FastRCNNConvFCHead`: convolutions then fully connected layers) and the mask head
//! (`MaskRCNNConvUpsampleHead`: convolutions, a 2x deconvolution and a per-class 1x1 predictor) as networks; the
//! RoI heads around them sample, pool, compute losses and post-process.

use std::sync::Arc;

use backbone::layers::ConvInit;
use backbone::norm::NormSpec;
use backbone::BatchStatsReducer;
use tch::{nn, Tensor};

use crate::config::{BoxHeadConfig, MaskHeadConfig};
use crate::layers::{ConvUnit, Deconv2x2, Linear, LinearInit};
use crate::DetectorError;

/// `count` 3x3 conv units (MSRA init, norm, ReLU) named `{prefix}1..{prefix}count` under `path`, from `channels`
/// to `dim` channels; returns them with the output width (`channels` when `count` is 0).
fn conv_stack(
    path: &nn::Path,
    prefix: &str,
    count: i64,
    channels: i64,
    dim: i64,
    norm: Option<&NormSpec>,
) -> Result<(Vec<ConvUnit>, i64), DetectorError> {
    let mut convs = Vec::new();
    let mut c = channels;
    for i in 0..count {
        let p = path.sub(format!("{prefix}{}", i + 1));
        convs.push(ConvUnit::new(&p, (c, dim, 3), ConvInit::MsraFanOut, norm, true)?);
        c = dim;
    }
    Ok((convs, c))
}

#[derive(Debug)]
pub(crate) struct BoxHead {
    convs: Vec<ConvUnit>,
    fcs: Vec<Linear>,
}

impl BoxHead {
    /// The head under `path` on `channels`-wide pooled features; `reducer` serves a SyncBN `config.norm`.
    pub(crate) fn new(
        path: &nn::Path,
        config: &BoxHeadConfig,
        channels: i64,
        reducer: Option<Arc<dyn BatchStatsReducer>>,
    ) -> Result<BoxHead, DetectorError> {
        let norm = config.norm.spec(config.gn_groups, reducer);
        let (convs, c) = conv_stack(path, "conv", config.num_conv, channels, config.conv_dim, norm.as_ref())?;
        let mut width = c * config.pooler_resolution * config.pooler_resolution;
        let mut fcs = Vec::new();
        for i in 0..config.num_fc {
            fcs.push(Linear::new(&path.sub(format!("fc{}", i + 1)), width, config.fc_dim, LinearInit::XavierFanIn));
            width = config.fc_dim;
        }
        Ok(BoxHead { convs, fcs })
    }

    pub(crate) fn output_width(config: &BoxHeadConfig, channels: i64) -> i64 {
        if config.num_fc > 0 {
            config.fc_dim
        } else {
            let c = if config.num_conv > 0 { config.conv_dim } else { channels };
            c * config.pooler_resolution * config.pooler_resolution
        }
    }

    /// `train` selects BatchNorm's batch statistics.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for conv in &self.convs {
            y = conv.forward(&y, train);
        }
        let mut y = y.flatten(1, -1);
        for fc in &self.fcs {
            y = fc.forward(&y).relu();
        }
        y
    }
}

/// 4 convs, a 2x2 deconvolution with ReLU and a 1x1 per-class predictor.
#[derive(Debug)]
pub(crate) struct MaskHead {
    convs: Vec<ConvUnit>,
    deconv: Deconv2x2,
    predictor: backbone::layers::Conv2d,
}

impl MaskHead {
    pub(crate) fn new(
        path: &nn::Path,
        config: &MaskHeadConfig,
        channels: i64,
        classes: i64,
        reducer: Option<Arc<dyn BatchStatsReducer>>,
    ) -> Result<MaskHead, DetectorError> {
        let norm = config.norm.spec(config.gn_groups, reducer);
        let (convs, c) = conv_stack(path, "mask_fcn", config.num_conv, channels, config.conv_dim, norm.as_ref())?;
        let deconv = Deconv2x2::new(&path.sub("deconv"), c, config.conv_dim);
        let opts = backbone::layers::ConvOpts { bias: true, init: ConvInit::Normal(0.001), ..Default::default() };
        let predictor = backbone::layers::Conv2d::new(&path.sub("predictor"), config.conv_dim, classes, 1, opts);
        Ok(MaskHead { convs, deconv, predictor })
    }

    /// `train` selects BatchNorm's batch statistics.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for conv in &self.convs {
            y = conv.forward(&y, train);
        }
        self.predictor.forward(&self.deconv.forward(&y).relu())
    }
}
