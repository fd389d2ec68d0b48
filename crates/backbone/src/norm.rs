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
                // An empty batch (a head with no RoIs) has no statistics: the running ones stay as they are.
                None if train && x.numel() == 0 => x * weight.view([1, -1, 1, 1]) + bias.view([1, -1, 1, 1]),
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

/// BatchNorm in training mode with statistics over every process, weighted by each process's element count
/// (detectron2's `NaiveSyncBatchNorm` with `stats_mode="N"`): a process whose input is empty (a head with no RoIs)
/// still joins the all-reduce, with zero weight, so no rank waits for it and the statistics are those of the
/// non-empty inputs. When every process is empty the running statistics stay as they are.
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
    let count = if channels > 0 { xf.numel() as i64 / channels } else { 0 };
    let weighted = if count > 0 {
        let mean = xf.mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
        let meansq = (&xf * &xf).mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
        Tensor::cat(&[mean, meansq, Tensor::ones([1], (Kind::Float, x.device()))], 0) * count as f64
    } else {
        // Zeros that keep the (empty) input in the autograd graph, so backward reaches it as on other ranks.
        Tensor::zeros([2 * channels + 1], (Kind::Float, x.device())) + xf.sum(Kind::Float) * 0.0
    };
    let reduced = reducer.all_reduce_mean(&weighted);
    let total = reduced.narrow(0, 2 * channels, 1);
    let stats = reduced.narrow(0, 0, 2 * channels) / total.clamp_min(f64::from(f32::MIN_POSITIVE));
    let mean = stats.narrow(0, 0, channels);
    let var = stats.narrow(0, channels, channels) - &mean * &mean;
    tch::no_grad(|| {
        // detectron2's `momentum * min(total, 1)`: no update when no process had any element.
        let momentum = total.detach().gt(0.0).to_kind(Kind::Float) * BN_MOMENTUM;
        let keep = 1.0 - &momentum;
        let _ = running_mean.shallow_clone().g_mul_(&keep).g_add_(&(mean.detach() * &momentum));
        let _ = running_var.shallow_clone().g_mul_(&keep).g_add_(&(var.detach() * &momentum));
    });
    let scale = weight * (var + EPS).rsqrt();
    let shift = bias - &mean * &scale;
    (xf * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1])).to_kind(x.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A second process whose batch is `other`: the mean of this process's weighted statistics and its own.
    #[derive(Debug)]
    struct TwoProcesses {
        other: std::sync::Mutex<Tensor>,
    }

    impl BatchStatsReducer for TwoProcesses {
        fn all_reduce_mean(&self, stats: &Tensor) -> Tensor {
            let other = self.other.lock().unwrap();
            let channels = other.size()[1];
            let count = (other.numel() as i64 / channels) as f64;
            let theirs = if count > 0.0 {
                let mean = other.mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
                let meansq = (&*other * &*other).mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
                Tensor::cat(&[mean, meansq, Tensor::ones([1], (Kind::Float, Device::Cpu))], 0) * count
            } else {
                Tensor::zeros([2 * channels + 1], (Kind::Float, Device::Cpu))
            };
            (stats + theirs) / 2.0
        }
    }

    fn sync_bn(other: Tensor) -> (nn::VarStore, Norm) {
        let vs = nn::VarStore::new(Device::Cpu);
        let reducer: Arc<dyn BatchStatsReducer> = Arc::new(TwoProcesses { other: std::sync::Mutex::new(other) });
        let spec = NormSpec { kind: NormKind::SyncBN, gn_groups: 1, reducer: Some(reducer) };
        let norm = Norm::new(&vs.root(), 3, &spec).unwrap();
        (vs, norm)
    }

    #[test]
    fn sync_bn_weighs_processes_by_their_element_counts() {
        tch::manual_seed(0);
        let (mine, theirs) = (
            Tensor::randn([3, 3, 2, 2], (Kind::Float, Device::Cpu)),
            Tensor::randn([1, 3, 2, 2], (Kind::Float, Device::Cpu)) * 3.0 + 1.0,
        );
        let (_vs, norm) = sync_bn(theirs.shallow_clone());
        let out = norm.forward_t(&mine, true);
        let whole = Tensor::cat(&[&mine, &theirs], 0);
        let expected = whole
            .batch_norm(None::<Tensor>, None::<Tensor>, None::<Tensor>, None::<Tensor>, true, 0.1, EPS, false)
            .narrow(0, 0, 3);
        let error = (&out - &expected).abs().max().double_value(&[]);
        assert!(error < 1e-5, "{error}");
    }

    #[test]
    fn sync_bn_with_an_empty_batch_joins_with_zero_weight() {
        tch::manual_seed(0);
        let theirs = Tensor::randn([2, 3, 2, 2], (Kind::Float, Device::Cpu));
        let (vs, norm) = sync_bn(theirs);
        let empty = Tensor::zeros([0, 3, 2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let out = norm.forward_t(&empty, true);
        assert_eq!(out.size(), [0, 3, 2, 2]);
        out.sum(Kind::Float).backward();
        let variables: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let running_mean = &variables["running_mean"];
        assert!(running_mean.isfinite().all().int64_value(&[]) == 1);
        assert!(running_mean.abs().sum(Kind::Float).double_value(&[]) > 0.0, "the other process's statistics count");
        // Every process empty: the statistics stay as they were.
        let (vs, norm) = sync_bn(Tensor::zeros([0, 3, 2, 2], (Kind::Float, Device::Cpu)));
        let _ = norm.forward_t(&Tensor::zeros([0, 3, 2, 2], (Kind::Float, Device::Cpu)), true);
        let variables: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        assert_eq!(variables["running_var"].sum(Kind::Float).double_value(&[]), 3.0);
    }
}
