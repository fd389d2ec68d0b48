//! The exponential moving average of the model's weights (`[solver.ema]`, see [`EmaConfig`] for the update
//! rule): updated after every optimizer step in two multi-tensor operations, saved in checkpoints
//! (`ema.safetensors`), and swapped into the model for evaluation ([`ModelEma::with_weights`]).

use std::collections::BTreeMap;

use tch::{nn::VarStore, Tensor};

use super::config::EmaConfig;
use super::error::SolverError;
use super::multi_tensor::{copy_tensors, ema_update};

/// What a checkpoint stores of the EMA.
#[derive(Debug)]
pub struct EmaState {
    /// Every model variable's average (or copy), by name, in name order.
    pub tensors: Vec<(String, Tensor)>,
    /// Updates done so far (the position on the decay ramp).
    pub updates: u64,
}

/// The EMA of one model; see the module documentation.
#[derive(Debug)]
pub struct ModelEma {
    config: EmaConfig,
    updates: u64,
    /// Names of the averaged tensors, then of the copied ones (each group in name order).
    names: Vec<String>,
    /// The EMA tensors, in the order of `names`.
    averages: Vec<Tensor>,
    /// The model's variables they follow, in the same order.
    sources: Vec<Tensor>,
    /// How many leading entries are averaged (trainable parameters); the rest are copied.
    averaged_count: usize,
}

impl ModelEma {
    /// An EMA starting at the current weights of `vs`: the variables that require gradients are averaged, the
    /// others (BatchNorm statistics, frozen stages) copied. Build it after freezing and after any change of
    /// memory layout, as it keeps handles to the variables.
    pub fn new(vs: &VarStore, config: &EmaConfig) -> Self {
        let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| (!a.1.requires_grad(), &a.0).cmp(&(!b.1.requires_grad(), &b.0)));
        let averaged_count = variables.iter().filter(|(_, t)| t.requires_grad()).count();
        let averages = tch::no_grad(|| variables.iter().map(|(_, t)| t.detach().copy()).collect());
        let (names, sources) = variables.into_iter().unzip();
        ModelEma { config: *config, updates: 0, names, averages, sources, averaged_count }
    }

    /// The decay of update number `update` (counted from 1).
    pub fn decay_at(&self, update: u64) -> f64 {
        match self.config.warmup {
            0 => self.config.decay,
            warmup => self.config.decay * (1.0 - (-(update as f64) / warmup as f64).exp()),
        }
    }

    /// Updates done so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Moves the average towards the model's current weights (call after every optimizer step).
    pub fn update(&mut self) -> Result<(), SolverError> {
        let decay = self.decay_at(self.updates + 1);
        let split = self.averaged_count;
        ema_update(&self.averages[..split], &self.sources[..split], decay)?;
        copy_tensors(&self.averages[split..], &self.sources[split..])?;
        self.updates += 1;
        Ok(())
    }

    /// The EMA weights by name, in name order (what `ema.safetensors` holds; shallow handles, not copies).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> =
            self.names.iter().cloned().zip(self.averages.iter().map(Tensor::shallow_clone)).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// A copy of the state for a checkpoint.
    pub fn state_dict(&self) -> EmaState {
        let tensors = self.named_tensors().into_iter().map(|(name, tensor)| (name, tensor.copy())).collect();
        EmaState { tensors, updates: self.updates }
    }

    /// Restores a [`ModelEma::state_dict`]: it must hold exactly this model's variables with their shapes;
    /// nothing changes when it does not.
    pub fn load_state_dict(&mut self, state: &EmaState) -> Result<(), SolverError> {
        let by_name: BTreeMap<&str, &Tensor> = state.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        if let Some(extra) = by_name.keys().find(|name| !self.names.iter().any(|n| n == *name)) {
            return Err(SolverError::State(format!("EMA tensor `{extra}` is not a model variable")));
        }
        for (name, average) in self.names.iter().zip(&self.averages) {
            match by_name.get(name.as_str()) {
                None => return Err(SolverError::State(format!("the EMA lacks model variable `{name}`"))),
                Some(saved) if saved.size() != average.size() => {
                    return Err(SolverError::State(format!(
                        "EMA tensor `{name}` has shape {:?}, the model {:?}",
                        saved.size(),
                        average.size()
                    )))
                }
                Some(_) => {}
            }
        }
        let saved: Vec<Tensor> = self
            .names
            .iter()
            .zip(&self.averages)
            .map(|(name, average)| {
                transfer::to_device(by_name[name.as_str()], average.device()).to_kind(average.kind())
            })
            .collect();
        copy_tensors(&self.averages, &saved)?;
        self.updates = state.updates;
        Ok(())
    }

    /// Runs `body` with the EMA weights in the model, then puts the model's own weights back (also when `body`
    /// fails): how evaluation and best-model selection use the EMA.
    pub fn with_weights<T>(&self, body: impl FnOnce() -> T) -> Result<T, SolverError> {
        let saved: Vec<Tensor> = tch::no_grad(|| self.sources.iter().map(|t| t.detach().copy()).collect());
        copy_tensors(&self.sources, &self.averages)?;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
        copy_tensors(&self.sources, &saved)?;
        match result {
            Ok(value) => Ok(value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    fn store() -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let layer = vs.root() / "layer";
        let _ = layer.var("weight", &[3, 2], nn::Init::Const(1.0));
        let _ = layer.zeros_no_train("running_mean", &[2]);
        vs
    }

    #[test]
    fn decay_ramps_up_and_buffers_are_copied() {
        let vs = store();
        let config = EmaConfig { enabled: true, decay: 0.9, warmup: 4 };
        let mut ema = ModelEma::new(&vs, &config);
        assert!((ema.decay_at(1) - 0.9 * (1.0 - (-0.25f64).exp())).abs() < 1e-15);
        assert!(ema.decay_at(100) > 0.8999 && ema.decay_at(100) < 0.9);
        let zero_warmup = ModelEma::new(&vs, &EmaConfig { warmup: 0, ..config });
        assert_eq!(zero_warmup.decay_at(1), 0.9);

        let variables = vs.variables();
        tch::no_grad(|| {
            let _ = variables["layer.weight"].shallow_clone().fill_(3.0);
            let _ = variables["layer.running_mean"].shallow_clone().fill_(5.0);
        });
        ema.update().unwrap();
        let d = ema.decay_at(1);
        let named: BTreeMap<String, Tensor> = ema.named_tensors().into_iter().collect();
        let expected = (1.0f32 * d as f32) + 3.0f32 * (1.0 - d) as f32;
        assert!((named["layer.weight"].double_value(&[0, 0]) - f64::from(expected)).abs() < 1e-6);
        assert_eq!(named["layer.running_mean"].double_value(&[1]), 5.0);
        assert_eq!(ema.updates(), 1);
    }

    #[test]
    fn with_weights_swaps_and_restores_and_state_round_trips() {
        let vs = store();
        let mut ema = ModelEma::new(&vs, &EmaConfig { enabled: true, decay: 0.5, warmup: 0 });
        let weight = vs.variables()["layer.weight"].shallow_clone();
        tch::no_grad(|| {
            let _ = weight.shallow_clone().fill_(3.0);
        });
        ema.update().unwrap();
        let inside = ema.with_weights(|| weight.double_value(&[0, 0])).unwrap();
        assert_eq!(inside, 2.0);
        assert_eq!(weight.double_value(&[0, 0]), 3.0);

        let state = ema.state_dict();
        let mut other = ModelEma::new(&vs, &EmaConfig { enabled: true, decay: 0.5, warmup: 0 });
        other.load_state_dict(&state).unwrap();
        assert_eq!(other.updates(), 1);
        let named: BTreeMap<String, Tensor> = other.named_tensors().into_iter().collect();
        assert_eq!(named["layer.weight"].double_value(&[0, 0]), 2.0);

        let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        let missing = EmaState { tensors: vec![("layer.weight".into(), zeros(&[3, 2]))], updates: 1 };
        let message = other.load_state_dict(&missing).unwrap_err().to_string();
        assert!(message.contains("lacks model variable `layer.running_mean`"), "{message}");
        let reshaped = EmaState {
            tensors: vec![("layer.weight".into(), zeros(&[2])), ("layer.running_mean".into(), zeros(&[2]))],
            updates: 1,
        };
        let message = other.load_state_dict(&reshaped).unwrap_err().to_string();
        assert!(message.contains("`layer.weight` has shape [2]"), "{message}");
        assert_eq!(other.updates(), 1, "a failed load changes nothing");
    }
}
