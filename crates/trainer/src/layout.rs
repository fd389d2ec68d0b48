//! Channels-last (NHWC) memory layout for tensors, the model's convolution weights, input batches and the
//! solver's momentum buffers (the config's `channels_last`), as PyTorch's `torch.channels_last`.

use detector::structures::ImageBatch;
use tch::{nn, Tensor};

use crate::solver::{Solver, SolverState};

/// `tensor` laid out channels-last (NHWC) when it is 4-D `[N, C, H, W]`: same shape and values, channels
/// innermost, with the strides of PyTorch's `tensor.contiguous(memory_format=torch.channels_last)` (so libtorch
/// recognises the layout even for size-1 dimensions). Other tensors, and tensors already in that layout, are
/// returned as shallow clones.
pub fn to_channels_last(tensor: &Tensor) -> Tensor {
    let size = tensor.size();
    let [_, channels, height, width] = size[..] else { return tensor.shallow_clone() };
    let strides = [height * width * channels, 1, width * channels, channels];
    if tensor.stride() == strides {
        return tensor.shallow_clone();
    }
    let mut out = Tensor::empty_strided(&size, strides, (tensor.kind(), tensor.device()));
    out.copy_(tensor);
    out
}

/// Re-lays out every 4-D variable of `vs` (the convolution weights) channels-last in place, as PyTorch's
/// `model.to(memory_format=torch.channels_last)` does (`param.data = ...`): every handle on a variable (the
/// model's layers, the solver) sees the new layout, values unchanged. Gradients and momentum buffers created
/// afterwards follow it.
pub fn variables_to_channels_last(vs: &nn::VarStore) {
    let _no_grad = tch::no_grad_guard();
    for (_, mut variable) in vs.variables() {
        if variable.dim() == 4 {
            let data = to_channels_last(&variable.detach());
            variable.set_data(&data);
        }
    }
}

/// The images of `batch` channels-last (see [`to_channels_last`]).
pub fn images_to_channels_last(batch: ImageBatch) -> ImageBatch {
    ImageBatch { images: to_channels_last(&batch.images), image_sizes: batch.image_sizes }
}

/// Re-lays out the solver's momentum buffers channels-last after a resume (they are read back in the standard
/// layout), so that they match their channels-last parameters and the multi-tensor update keeps its fast path.
pub fn momentum_to_channels_last(solver: &mut Solver) -> anyhow::Result<()> {
    let state = solver.state_dict()?;
    if state.tensors.is_empty() {
        return Ok(());
    }
    let tensors = state.tensors.iter().map(|(name, t)| (name.clone(), to_channels_last(t))).collect();
    solver.load_state_dict(&SolverState { tensors, scalars: state.scalars })?;
    Ok(())
}
