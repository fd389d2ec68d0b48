//! SGD with momentum over named tensors, matching `torch.optim.SGD`, with detectron2's per-name weight decay.

use std::collections::BTreeMap;

use tch::Tensor;

use super::config::SolverConfig;
use super::error::SolverError;
use super::multi_tensor;

/// Whether `name` is a parameter of a normalization layer. Our norm layers are submodules named `norm` or
/// `norm1`, `norm2`, ... (and torchvision-style `*_norm`), so the rule is: the path component before the final
/// `weight`/`bias` is `norm`, `norm<digits>` or ends with `_norm`.
pub fn is_norm_param(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    let (Some(_leaf), Some(module)) = (parts.next(), parts.next()) else {
        return false;
    };
    let numbered = module.strip_prefix("norm").is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()));
    numbered || module.ends_with("_norm")
}

/// The weight decay detectron2 would give parameter `name`: `weight_decay_norm` for norm layers,
/// `weight_decay_bias` (when set) for every `*.bias`, `weight_decay` otherwise.
pub fn weight_decay_for(name: &str, config: &SolverConfig) -> f64 {
    match config.weight_decay_bias {
        Some(bias_decay) if name.ends_with(".bias") || name == "bias" => bias_decay,
        _ if is_norm_param(name) => config.weight_decay_norm,
        _ => config.weight_decay,
    }
}

/// One trainable tensor with its decay and momentum buffer.
#[derive(Debug)]
pub(super) struct SgdParam {
    pub(super) name: String,
    pub(super) tensor: Tensor,
    pub(super) weight_decay: f64,
    pub(super) momentum_buffer: Option<Tensor>,
}

/// SGD with momentum exactly as `torch.optim.SGD` (dampening 0): `d = g + wd*p`; first step `buf = d` (here
/// `m*0 + d` on a zero buffer, the same bits), then `buf = m*buf + d`; `d = d + m*buf` (Nesterov) or `d = buf`; `p -= lr*d`. The tensor work runs through
/// libtorch's multi-tensor (`_foreach_*`) operators, one call per weight-decay group, as torch's `foreach=True`
/// path (the CUDA default): a few kernel launches for all parameters instead of several per parameter. On the
/// CPU those operators fall back to torch's single-tensor operations, so the results are bit-identical to
/// `torch.optim.SGD` there. Parameters are kept in name order; tensors that do not require grad are left out.
#[derive(Debug)]
pub struct Sgd {
    pub(super) params: Vec<SgdParam>,
    momentum: f64,
    nesterov: bool,
}

impl Sgd {
    /// Builds the optimizer over `params` (shallow copies sharing storage with the model), giving each the
    /// decay [`weight_decay_for`] assigns.
    pub fn new(params: BTreeMap<String, Tensor>, config: &SolverConfig) -> Self {
        let params = params
            .into_iter()
            .filter(|(_, tensor)| tensor.requires_grad())
            .map(|(name, tensor)| SgdParam {
                weight_decay: weight_decay_for(&name, config),
                name,
                tensor,
                momentum_buffer: None,
            })
            .collect();
        Sgd { params, momentum: config.momentum, nesterov: config.nesterov }
    }

    /// Names and decays of the optimized parameters, in update order.
    pub fn param_groups(&self) -> Vec<(&str, f64)> {
        self.params.iter().map(|p| (p.name.as_str(), p.weight_decay)).collect()
    }

    /// The gradients that exist (parameters unused in the last backward have none).
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.grad()).filter(Tensor::defined).collect()
    }

    /// The parameters that have a gradient.
    pub(super) fn with_gradients(&self) -> Vec<Tensor> {
        self.params.iter().filter(|p| p.tensor.grad().defined()).map(|p| p.tensor.shallow_clone()).collect()
    }

    /// Drops every gradient (`zero_grad(set_to_none=True)`, torch's default): the next backward writes fresh
    /// gradients instead of adding to zeroed ones.
    pub fn zero_grad(&mut self) {
        let params: Vec<Tensor> = self.params.iter().map(|p| p.tensor.shallow_clone()).collect();
        multi_tensor::drop_grads(&params).expect("dropping gradients of parameters");
    }

    /// One update with learning rate `lr` from the current gradients (parameters without one are left alone),
    /// applied only where the 0-dim bool `apply` on the parameters' device is true, without a host read: a
    /// skipped update leaves weights and momentum exactly as they were.
    pub fn step(&mut self, lr: f64, apply: &Tensor) -> Result<(), SolverError> {
        let mut decays: Vec<f64> = self.params.iter().map(|p| p.weight_decay).collect();
        decays.sort_by(f64::total_cmp);
        decays.dedup();
        for decay in decays {
            let group: Vec<(&Tensor, &mut Option<Tensor>)> = self
                .params
                .iter_mut()
                .filter(|p| p.weight_decay.to_bits() == decay.to_bits() && p.tensor.grad().defined())
                .map(|p| (&p.tensor, &mut p.momentum_buffer))
                .collect();
            multi_tensor::sgd_step(group, lr, self.momentum, decay, self.nesterov, apply)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_params_are_found_by_module_name() {
        assert!(is_norm_param("backbone.stem.stem_1.norm.weight"));
        assert!(is_norm_param("backbone.res2.0.norm3.bias"));
        assert!(is_norm_param("roi_heads.box_head.conv1.pw_norm.weight"));
        assert!(!is_norm_param("backbone.stem.stem_1.conv.weight"));
        assert!(!is_norm_param("normalizer.weight"));
        assert!(!is_norm_param("norm"));
        let config = SolverConfig { weight_decay_bias: Some(0.5), ..SolverConfig::default() };
        assert_eq!(weight_decay_for("a.norm.bias", &config), 0.5);
        assert_eq!(weight_decay_for("a.norm.weight", &config), 0.0);
        assert_eq!(weight_decay_for("a.conv.weight", &config), 1e-4);
        assert_eq!(weight_decay_for("a.norm.bias", &SolverConfig::default()), 0.0);
    }
}
