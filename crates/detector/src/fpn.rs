//! Feature pyramid network (Lin et al. 2017, detectron2 `FPN`): a 1x1 lateral and a 3x3 output convolution per
//! backbone level, top-down nearest-neighbour upsampling added to the laterals, and P6 as a max-pool (kernel 1,
//! stride 2) of P5 for the RPN.

use std::sync::Arc;

use backbone::layers::ConvInit;
use backbone::{BatchStatsReducer, FeatureSpec};
use tch::{nn, Tensor};

use crate::config::FpnConfig;
use crate::layers::ConvUnit;
use crate::DetectorError;

/// The pyramid: outputs `p{k}` at stride `2^k` for every input level, then one more level by max-pool.
#[derive(Debug)]
pub struct Fpn {
    laterals: Vec<ConvUnit>,
    outputs: Vec<ConvUnit>,
    in_indices: Vec<usize>,
    specs: Vec<FeatureSpec>,
}

impl Fpn {
    /// Builds the pyramid under `path` (`lateral{k}.*`, `output{k}.*`) on the backbone outputs `backbone_specs`,
    /// using those named in `config.in_features`.
    /// `reducer` serves a SyncBN `config.norm`.
    pub fn new(
        path: &nn::Path,
        config: &FpnConfig,
        backbone_specs: &[FeatureSpec],
        reducer: Option<Arc<dyn BatchStatsReducer>>,
    ) -> Result<Fpn, DetectorError> {
        let norm = config.norm.spec(config.gn_groups, reducer);
        let mut laterals = Vec::new();
        let mut outputs = Vec::new();
        let mut in_indices = Vec::new();
        let mut specs = Vec::new();
        let mut previous_stride = 0;
        for name in &config.in_features {
            let index = backbone_specs.iter().position(|s| &s.name == name).ok_or_else(|| DetectorError::Config {
                field: "fpn.in_features".into(),
                message: format!(
                    "`{name}` is not a backbone output (model.backbone.out_features: {})",
                    backbone_specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            })?;
            let spec = &backbone_specs[index];
            if spec.stride <= previous_stride || (spec.stride as u64).count_ones() != 1 {
                return Err(DetectorError::Config {
                    field: "fpn.in_features".into(),
                    message: "levels must be listed finest first with power-of-two strides".into(),
                });
            }
            previous_stride = spec.stride;
            let level = spec.stride.trailing_zeros();
            let c = config.out_channels;
            let lateral = &path.sub(format!("lateral{level}"));
            laterals.push(ConvUnit::new(lateral, (spec.channels, c, 1), ConvInit::XavierFanIn, norm.as_ref(), false)?);
            let output = &path.sub(format!("output{level}"));
            outputs.push(ConvUnit::new(output, (c, c, 3), ConvInit::XavierFanIn, norm.as_ref(), false)?);
            in_indices.push(index);
            specs.push(FeatureSpec { name: format!("p{level}"), stride: spec.stride, channels: c });
        }
        let last = specs.last().expect("in_features is not empty").clone();
        let level = last.stride.trailing_zeros() + 1;
        specs.push(FeatureSpec { name: format!("p{level}"), stride: last.stride * 2, channels: last.channels });
        Ok(Fpn { laterals, outputs, in_indices, specs })
    }

    /// Names (`p2`..`p6`), strides and widths of the outputs, finest first.
    pub fn output_specs(&self) -> &[FeatureSpec] {
        &self.specs
    }

    /// Turns the backbone outputs (in backbone order) into the pyramid, finest first; `train` selects BatchNorm's
    /// batch statistics.
    pub fn forward(&self, backbone_outputs: &[Tensor], train: bool) -> Vec<Tensor> {
        let count = self.laterals.len();
        let mut results: Vec<Tensor> = Vec::with_capacity(count + 1);
        let mut previous: Option<Tensor> = None;
        for i in (0..count).rev() {
            let lateral = self.laterals[i].forward(&backbone_outputs[self.in_indices[i]], train);
            let merged = match previous {
                None => lateral,
                Some(top) => {
                    let size = lateral.size();
                    lateral + top.upsample_nearest2d([size[2], size[3]], None, None)
                }
            };
            results.push(self.outputs[i].forward(&merged, train));
            previous = Some(merged);
        }
        results.reverse();
        let top = results.last().expect("at least one level").max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false);
        results.push(top);
        results
    }
}
