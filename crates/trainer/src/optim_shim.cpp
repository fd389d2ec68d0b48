// The optimizer's tensor work as PyTorch's multi-tensor ("foreach") paths do it: torch.optim.SGD(foreach=True),
// clip_grad_norm_ and GradScaler.unscale_. On CUDA each foreach operator is a handful of kernel launches for all
// parameters together instead of several per parameter, and the fp16 overflow check is one device-side flag
// instead of one host read per gradient. On CPU the foreach operators fall back to the per-tensor operators of
// torch's single-tensor paths, so results are bit-identical to torch.optim.SGD there.
// Every C++ exception is caught here and returned as a malloc'ed message (NULL means success).

#include "vovdet_shim.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

// vovdet::guarded with autograd off (the optimizer updates leaves that require grad in place).
template <typename F>
char* without_grad(F body) {
  return vovdet::guarded([&] {
    at::NoGradGuard no_grad;
    body();
  });
}

std::vector<at::Tensor> list(at::Tensor** tensors, int64_t count) {
  std::vector<at::Tensor> out;
  out.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    out.push_back(*tensors[i]);
  }
  return out;
}

std::vector<at::Tensor> grads_of(at::Tensor** params, int64_t count) {
  std::vector<at::Tensor> out;
  out.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    out.push_back(params[i]->grad());
  }
  return out;
}

}  // namespace

extern "C" {

// One SGD step over `count` parameters (all with gradients) sharing `weight_decay`, as torch's _multi_tensor_sgd
// with dampening 0 (d = g + wd*p; buf = m*buf + d; d = d + m*buf (Nesterov) or d = buf; p -= lr*d), applied only
// where the 0-dim bool tensor `apply` (on the parameters' device) is true, without reading it on the host: a
// skipped step leaves parameters and buffers bit-for-bit unchanged, an applied one is bit-identical to
// torch.optim.SGD. The guard: d is zeroed in place when skipping (it may hold inf/NaN), the momentum factor
// becomes 1 and the direction is multiplied by 0 (finite buffers, so exactly 0). `buffers[i]` is NULL when
// parameter i has no momentum buffer yet; a zero buffer is created there (a heap at::Tensor the caller owns):
// m*0 + d equals torch's first-step buf = d. The gradients themselves may be overwritten (they are dropped
// after the step).
char* vovdet_sgd_step(at::Tensor** params, at::Tensor** buffers, int64_t count, double lr, double momentum,
                      double weight_decay, int nesterov, at::Tensor* apply) {
  return without_grad([&] {
    if (count == 0) {
      return;
    }
    std::vector<at::Tensor> parameters = list(params, count);
    std::vector<at::Tensor> directions = grads_of(params, count);
    if (weight_decay != 0.0) {
      directions = at::_foreach_add(directions, parameters, weight_decay);
    }
    at::Tensor skip = apply->logical_not();
    for (auto& direction : directions) {
      direction.masked_fill_(skip, 0.0);
    }
    at::Tensor applied = apply->to(parameters[0].scalar_type());
    if (momentum == 0.0) {
      at::_foreach_mul_(directions, applied);
      at::_foreach_add_(parameters, directions, -lr);
      return;
    }
    std::vector<at::Tensor> bufs;
    for (int64_t i = 0; i < count; ++i) {
      if (buffers[i] == nullptr) {
        buffers[i] = new at::Tensor(at::zeros_like(parameters[i]));
      }
      bufs.push_back(*buffers[i]);
    }
    at::Tensor factor = at::where(*apply, at::scalar_tensor(momentum, applied.options()),
                                  at::scalar_tensor(1.0, applied.options()));
    at::_foreach_mul_(bufs, factor);
    at::_foreach_add_(bufs, directions, 1.0);
    if (nesterov != 0) {
      at::_foreach_add_(directions, bufs, momentum);
      at::_foreach_mul_(directions, applied);
      at::_foreach_add_(parameters, directions, -lr);
    } else {
      at::_foreach_add_(parameters, at::_foreach_mul(bufs, applied), -lr);
    }
  });
}

// The L2 norm of all gradients of `params` together, as clip_grad_norm_ computes it (the norm of the per-tensor
// norms), returned as a new heap 0-dim tensor in *total.
char* vovdet_total_grad_norm(at::Tensor** params, int64_t count, at::Tensor** total) {
  return without_grad([&] {
    std::vector<at::Tensor> norms = at::_foreach_norm(grads_of(params, count), 2);
    *total = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
  });
}

// Multiplies every gradient of `params` by the 0-dim tensor `coefficient` (clip_grad_norm_'s _foreach_mul_).
char* vovdet_scale_grads(at::Tensor** params, int64_t count, at::Tensor* coefficient) {
  return without_grad([&] {
    std::vector<at::Tensor> grads = grads_of(params, count);
    at::_foreach_mul_(grads, *coefficient);
  });
}

// GradScaler.unscale_: multiplies every gradient by `inverse_scale` (a [1] float tensor on their device) and sets
// `found_inf` (a [1] float tensor there) to 1 when any value is inf or NaN, with no host read.
char* vovdet_unscale_grads(at::Tensor** params, int64_t count, at::Tensor* found_inf, at::Tensor* inverse_scale) {
  return without_grad([&] {
    std::vector<at::Tensor> grads = grads_of(params, count);
    at::_amp_foreach_non_finite_check_and_unscale_(grads, *found_inf, *inverse_scale);
  });
}

// optimizer.zero_grad(set_to_none=True): drops the gradients, so the next backward writes fresh ones instead
// of adding to zeroed buffers.
char* vovdet_drop_grads(at::Tensor** params, int64_t count) {
  return without_grad([&] {
    for (int64_t i = 0; i < count; ++i) {
      params[i]->mutable_grad().reset();
    }
  });
}

// One EMA update, as d2go's multi-tensor EMA: ema = ema * decay + model * (1 - decay).
char* vovdet_ema_update(at::Tensor** averaged, at::Tensor** sources, int64_t count, double decay) {
  return without_grad([&] {
    if (count > 0) {
      std::vector<at::Tensor> ema = list(averaged, count);
      at::_foreach_mul_(ema, decay);
      at::_foreach_add_(ema, list(sources, count), 1.0 - decay);
    }
  });
}

// Copies `sources[i]` into `targets[i]` for every i (swapping EMA weights into the model and back).
char* vovdet_copy_tensors(at::Tensor** targets, at::Tensor** sources, int64_t count) {
  return without_grad([&] {
    if (count > 0) {
      std::vector<at::Tensor> out = list(targets, count);
      at::_foreach_copy_(out, list(sources, count), false);
    }
  });
}

}  // extern "C"
