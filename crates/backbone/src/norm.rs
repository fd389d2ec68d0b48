//! Normalisation layers: GroupNorm (the from-scratch default), BatchNorm, FrozenBN (for imported pretrained
//! weights only) and SyncBN, whose cross-process statistics come from a [`BatchStatsReducer`] that
//! `crates/dist` provides.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::BackboneError;

/// Which normalisation follows each convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum NormKind {
    /// GroupNorm with `gn_groups` groups: batch-independent, the from-scratch default.
    #[default]
    GN,
    /// BatchNorm with statistics from the local batch.
    BN,
    /// BatchNorm with fixed affine and statistics; only meaningful with imported pretrained weights.
    FrozenBN,
    /// BatchNorm whose batch statistics are averaged over every training process.
    SyncBN,
}

/// Averages per-channel batch statistics over every process of a distributed run (implemented in
/// `crates/dist`). Without one, SyncBN is plain BatchNorm, as in detectron2 with a world size of 1.
pub trait BatchStatsReducer: Send + Sync + fmt::Debug {
    /// Returns the mean over processes of `stats`, a 1-D float tensor on the model's device.
    fn all_reduce_mean(&self, stats: &Tensor) -> Tensor;
}

/// Everything needed to build a norm layer: the kind, the GroupNorm group count and, for SyncBN, the reducer.
#[derive(Debug, Clone)]
pub struct NormSpec {
    /// Which normalisation.
    pub kind: NormKind,
    /// Number of groups for GroupNorm.
    pub gn_groups: i64,
    /// Cross-process statistics for SyncBN; `None` in a single process.
    pub reducer: Option<Arc<dyn BatchStatsReducer>>,
}

impl NormSpec {
    /// A spec with no SyncBN reducer.
    pub fn new(kind: NormKind, gn_groups: i64) -> Self {
        NormSpec { kind, gn_groups, reducer: None }
    }
}

const EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// A normalisation layer over NCHW tensors. Parameters are named `weight` and `bias`, and BatchNorm
/// statistics `running_mean` and `running_var`, as in PyTorch.
#[derive(Debug)]
pub enum Norm {
    /// GroupNorm with affine parameters.
    Group { groups: i64, weight: Tensor, bias: Tensor },
    /// BatchNorm; `reducer` is set for SyncBN.
    Batch {
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        reducer: Option<Arc<dyn BatchStatsReducer>>,
    },
    /// BatchNorm reduced to a fixed per-channel affine transform.
    Frozen { weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor },
}

/// Dotted name of a var-store path, for error messages.
pub(crate) fn path_name(path: &nn::Path) -> String {
    path.components().collect::<Vec<_>>().join(".")
}

impl Norm {
    /// Creates a norm layer for `channels` channels under `path`.
    pub fn new(path: &nn::Path, channels: i64, spec: &NormSpec) -> Result<Norm, BackboneError> {
        let affine = |p: &nn::Path| (p.ones("weight", &[channels]), p.zeros("bias", &[channels]));
        Ok(match spec.kind {
            NormKind::GN => {
                if spec.gn_groups <= 0 || channels % spec.gn_groups != 0 {
                    return Err(BackboneError::GroupCount { layer: path_name(path), channels, groups: spec.gn_groups });
                }
                let (weight, bias) = affine(path);
                Norm::Group { groups: spec.gn_groups, weight, bias }
            }
            NormKind::BN | NormKind::SyncBN => {
                let (weight, bias) = affine(path);
                Norm::Batch {
                    weight,
                    bias,
                    running_mean: path.zeros_no_train("running_mean", &[channels]),
                    running_var: path.ones_no_train("running_var", &[channels]),
                    reducer: if spec.kind == NormKind::SyncBN { spec.reducer.clone() } else { None },
                }
            }
            NormKind::FrozenBN => Norm::Frozen {
                weight: path.ones_no_train("weight", &[channels]),
                bias: path.zeros_no_train("bias", &[channels]),
                running_mean: path.zeros_no_train("running_mean", &[channels]),
                running_var: path.ones_no_train("running_var", &[channels]),
            },
        })
    }

    /// Normalises `x`; `train` selects batch statistics (and updates the running ones) for BatchNorm.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Norm::Group { groups, weight, bias } => x.group_norm(*groups, Some(weight), Some(bias), EPS, true),
            Norm::Batch { weight, bias, running_mean, running_var, reducer } => match reducer {
                Some(reducer) if train => sync_batch_norm(x, weight, bias, running_mean, running_var, reducer.as_ref()),
                _ => x.batch_norm(
                    Some(weight),
                    Some(bias),
                    Some(running_mean),
                    Some(running_var),
                    train,
                    BN_MOMENTUM,
                    EPS,
                    true,
                ),
            },
            Norm::Frozen { weight, bias, running_mean, running_var } => {
                let scale = weight * (running_var + EPS).rsqrt();
                let shift = bias - running_mean * &scale;
                x * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1])
            }
        }
    }
}

/// BatchNorm in training mode with the batch mean and mean square averaged over processes.
fn sync_batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    reducer: &dyn BatchStatsReducer,
) -> Tensor {
    let channels = x.size()[1];
    let xf = x.to_kind(Kind::Float);
    let mean = xf.mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
    let meansq = (&xf * &xf).mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
    let reduced = reducer.all_reduce_mean(&Tensor::cat(&[&mean, &meansq], 0));
    let mean = reduced.narrow(0, 0, channels);
    let var = reduced.narrow(0, channels, channels) - &mean * &mean;
    tch::no_grad(|| {
        let _ = running_mean.shallow_clone().g_mul_scalar_(1.0 - BN_MOMENTUM).g_add_(&(mean.detach() * BN_MOMENTUM));
        let _ = running_var.shallow_clone().g_mul_scalar_(1.0 - BN_MOMENTUM).g_add_(&(var.detach() * BN_MOMENTUM));
    });
    let scale = weight * (var + EPS).rsqrt();
    let shift = bias - &mean * &scale;
    (xf * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1])).to_kind(x.kind())
}
