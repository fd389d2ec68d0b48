//! Model weights by name: the variables of a `VarStore` in the order checkpoints store them, reading a weights
//! file (a checkpoint folder is verified against its manifest first), and copying named tensors into the
//! variables with name and shape checks.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn::VarStore, Tensor};

use crate::checkpoint_error::CheckpointError;
use crate::manifest::{corrupt, weights_file, WhichWeights};

/// The model's variables by name, in name order, as the checkpoint stores them.
pub fn named_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    variables
}

pub(crate) fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    Tensor::read_safetensors(path).map_err(|e| corrupt(path, e.to_string()))
}

/// Checks `weights` against the variables of `vs` (see [`load_weights_into`]) and returns the missing names.
pub(crate) fn check_weights(
    vs: &VarStore,
    weights: &[(String, Tensor)],
    source: &Path,
    strict: bool,
) -> Result<Vec<String>, CheckpointError> {
    let mismatch = |message: String| CheckpointError::Mismatch { path: source.display().to_string(), message };
    let by_name: BTreeMap<&str, &Tensor> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let variables = named_variables(vs);
    let mut missing = Vec::new();
    for (name, variable) in &variables {
        match by_name.get(name.as_str()) {
            None => missing.push(name.clone()),
            Some(tensor) if tensor.size() != variable.size() => {
                return Err(mismatch(format!(
                    "tensor `{name}` has shape {:?}, the model {:?}",
                    tensor.size(),
                    variable.size()
                )))
            }
            Some(_) => {}
        }
    }
    if strict {
        if let Some(name) = missing.first() {
            return Err(mismatch(format!("the model has `{name}` (and {} more) that it lacks", missing.len() - 1)));
        }
        if let Some(extra) = by_name.keys().find(|n| !variables.iter().any(|(v, _)| v == *n)) {
            return Err(mismatch(format!("it has `{extra}`, which the model lacks")));
        }
    }
    Ok(missing)
}

/// Copies `weights` into the variables of `vs`. With `strict`, the names and shapes must match exactly (resume);
/// otherwise variables missing from `weights` are left as they are and their names returned (`--init-weights`),
/// while a shape mismatch is still an error. Nothing is copied when an error is returned.
pub fn load_weights_into(
    vs: &VarStore,
    weights: &[(String, Tensor)],
    source: &Path,
    strict: bool,
) -> Result<Vec<String>, CheckpointError> {
    let missing = check_weights(vs, weights, source, strict)?;
    let by_name: BTreeMap<&str, &Tensor> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let _no_grad = tch::no_grad_guard();
    for (name, variable) in named_variables(vs) {
        if let Some(tensor) = by_name.get(name.as_str()) {
            variable.shallow_clone().copy_(tensor);
        }
    }
    Ok(missing)
}

/// `--init-weights FILE` (and the weights of `eval` and `predict`): loads weights only, from a checkpoint folder
/// (verified against its manifest, see [`weights_file`]) or a `.safetensors` file (a note on stderr says that it
/// cannot be verified); returns the model variables the file did not have. `which` picks the model's weights or
/// their EMA in a checkpoint folder.
pub fn init_weights(vs: &VarStore, path: &Path, which: WhichWeights) -> Result<Vec<String>, CheckpointError> {
    let file = weights_file(path, which, &mut |note| log::info!("note: {note}"))?;
    let weights = read_tensors(&file)?;
    load_weights_into(vs, &weights, &file, false)
}
