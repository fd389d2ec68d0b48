// The overlapped gradient all-reduce of `GradReducer` (src/reducer.rs): a post-accumulate-grad hook on every
// parameter marks its gradient ready; while the reducer is armed, each bucket whose gradients are all ready is
// flattened and its asynchronous all-reduce launched from inside backward, strictly in bucket order, as PyTorch's
// DDP does. `finish` launches the rest, all-reduces the "has a gradient" flags, waits, averages and copies back.
//
// The hooks run inside the autograd engine (the calling thread on CPU, a device thread on CUDA) under the engine's
// per-parameter lock; they take the state's mutex and never throw: a failure is recorded and returned by finish.
// Each hook holds a shared_ptr to the state, so a hook that outlives the reducer (a backward after the free) finds
// `alive == false` and does nothing; the free also removes the hooks, breaking the param -> hook -> state ->
// param cycle.

#include "shim.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using torch::autograd::Variable;

// Error kinds reported to Rust by vovdet_reducer_finish.
constexpr int kCollectiveError = 0;
constexpr int kInvalidError = 1;

struct State {
  std::mutex mutex;
  c10::intrusive_ptr<c10d::Backend> backend;
  int world_size = 1;
  int device_index = -1;
  std::chrono::milliseconds timeout{0};
  bool fp16 = false;
  bool alive = true;
  // Parameters in bucket order (slots), their indices in the caller's list, and each slot's bucket.
  std::vector<at::Tensor> params;
  std::vector<int64_t> param_ids;
  std::vector<size_t> bucket_of;
  // Bucket b holds slots bucket_begin[b] .. bucket_begin[b + 1].
  std::vector<size_t> bucket_begin;
  // Per armed backward.
  bool armed = false;
  std::vector<char> marked;      // the slot's hook fired
  std::vector<char> has_grad;    // the slot had a gradient when its bucket was flattened
  std::vector<size_t> pending;   // unmarked slots per bucket
  size_t next_launch = 0;        // first bucket not launched
  size_t launched_in_backward = 0;
  std::vector<at::Tensor> buffers;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  std::string error;             // first failure inside a hook

  size_t bucket_count() const { return bucket_begin.size() - 1; }

  void reset_step() {
    armed = false;
    marked.assign(params.size(), 0);
    has_grad.assign(params.size(), 0);
    pending.assign(bucket_count(), 0);
    for (size_t b = 0; b < bucket_count(); ++b) {
      pending[b] = bucket_begin[b + 1] - bucket_begin[b];
    }
    next_launch = 0;
    buffers.clear();
    works.clear();
    error.clear();
  }

  // Flattens bucket `next_launch` (zeros for parameters without a gradient) and starts its all-reduce.
  void launch_next() {
    at::NoGradGuard no_grad;
    size_t b = next_launch;
    std::vector<at::Tensor> pieces;
    for (size_t slot = bucket_begin[b]; slot < bucket_begin[b + 1]; ++slot) {
      const at::Tensor& grad = params[slot].grad();
      if (grad.defined()) {
        has_grad[slot] = 1;
        pieces.push_back(grad.detach().reshape({-1}));
      } else {
        auto options = at::TensorOptions().dtype(params[slot].scalar_type()).device(params[slot].device());
        pieces.push_back(at::zeros({params[slot].numel()}, options));
      }
    }
    at::Tensor flat = at::cat(pieces, 0);
    if (fp16) {
      // PyTorch's fp16_compress_hook: compress, divide by the world size, then sum.
      flat = flat.to(at::kHalf).div_(static_cast<double>(world_size));
    }
    std::vector<at::Tensor> list{flat};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = timeout;
    works.push_back(backend->allreduce(list, options));
    buffers.push_back(flat);
    ++next_launch;
  }

  // The hook of slot `slot`; called by the autograd engine after the gradient accumulated.
  void on_grad(size_t slot) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!alive || !armed || !error.empty()) {
      return;
    }
    size_t b = bucket_of[slot];
    if (marked[slot]) {
      if (b < next_launch) {
        error = "the gradient of parameter " + std::to_string(param_ids[slot]) + " accumulated again after bucket " +
                std::to_string(b) + " was launched (a parameter used by two backward passes of one armed step?)";
      }
      return;
    }
    marked[slot] = 1;
    --pending[b];
    try {
      while (next_launch < bucket_count() && pending[next_launch] == 0) {
        launch_next();
        ++launched_in_backward;
      }
    } catch (...) {
      error = "launching the all-reduce of bucket " + std::to_string(next_launch) +
              " from a gradient hook: " + vovdet::current_exception_text();
    }
  }
};

struct Hook : public torch::autograd::PostAccumulateGradHook {
  Hook(std::shared_ptr<State> state, size_t slot) : state(std::move(state)), slot(slot) {}
  void operator()(const Variable& /*param*/) override {
    try {
      state->on_grad(slot);
    } catch (...) {
      // on_grad records its own failures; nothing may escape into the autograd engine.
    }
  }
  std::shared_ptr<State> state;
  size_t slot;
};

// Waits for the step's collectives, checks the flags and writes the averaged gradients back (no lock held).
void complete(State& s, std::vector<at::Tensor>& buffers, std::vector<c10::intrusive_ptr<c10d::Work>>& works,
              const std::vector<char>& has_grad, const at::Tensor& flags, int* kind) {
  vovdet::wait_all(works, s.timeout);
  at::Tensor counts = flags.to(at::kCPU).contiguous();
  const float* count = counts.data_ptr<float>();
  size_t mismatched = 0, example = 0;
  for (size_t slot = 0; slot < s.params.size(); ++slot) {
    if (count[slot] != 0.0f && count[slot] != static_cast<float>(s.world_size)) {
      if (mismatched++ == 0) {
        example = slot;
      }
    }
  }
  if (mismatched > 0) {
    *kind = kInvalidError;
    throw std::runtime_error(
        std::to_string(mismatched) + " parameter(s) have gradients on some ranks only, e.g. parameter " +
        std::to_string(s.param_ids[example]) + " has a gradient on " +
        std::to_string(static_cast<long>(count[example])) + " of " + std::to_string(s.world_size) +
        " ranks (this rank: " + (has_grad[example] ? "yes" : "no") +
        "); every rank's loss must use the same parameters");
  }
  at::NoGradGuard no_grad;
  for (size_t b = 0; b < buffers.size(); ++b) {
    if (!s.fp16) {
      buffers[b].div_(static_cast<double>(s.world_size));
    }
    int64_t offset = 0;
    for (size_t slot = s.bucket_begin[b]; slot < s.bucket_begin[b + 1]; ++slot) {
      int64_t numel = s.params[slot].numel();
      if (has_grad[slot]) {
        at::Tensor& grad = s.params[slot].mutable_grad();
        grad.detach().copy_(buffers[b].narrow(0, offset, numel).view(grad.sizes()));
      }
      offset += numel;
    }
  }
}

}  // namespace

struct VovdetReducer {
  std::shared_ptr<State> state;
};

extern "C" {

// Plans nothing: the Rust side passes the parameters already in bucket order, with each bucket's end slot.
char* vovdet_reducer_new(vovdet::Group* group, const at::Tensor* const* params, const int64_t* param_ids,
                         size_t count, const size_t* bucket_ends, size_t bucket_count, int fp16, int64_t timeout_ms,
                         VovdetReducer** out) {
  return vovdet::guarded([&] {
    auto state = std::make_shared<State>();
    state->backend = group->backend;
    state->world_size = group->world_size;
    state->device_index = group->device_index;
    state->timeout = std::chrono::milliseconds(timeout_ms);
    state->fp16 = fp16 != 0;
    state->bucket_begin.push_back(0);
    for (size_t b = 0; b < bucket_count; ++b) {
      for (size_t slot = state->bucket_begin.back(); slot < bucket_ends[b]; ++slot) {
        state->bucket_of.push_back(b);
      }
      state->bucket_begin.push_back(bucket_ends[b]);
    }
    TORCH_CHECK(state->bucket_begin.back() == count, "bucket ends do not cover the ", count, " parameters");
    for (size_t slot = 0; slot < count; ++slot) {
      const at::Tensor& param = *params[slot];
      TORCH_CHECK(param.requires_grad() && param.is_leaf(), "parameter ", param_ids[slot],
                  " is not a leaf tensor that requires grad");
      TORCH_CHECK(torch::autograd::impl::post_acc_grad_hooks(param) == nullptr, "parameter ", param_ids[slot],
                  " already has a post-accumulate-grad hook (another GradReducer over the same parameters?)");
      state->params.push_back(param);
      state->param_ids.push_back(param_ids[slot]);
    }
    state->reset_step();
    for (size_t slot = 0; slot < count; ++slot) {
      torch::autograd::impl::set_post_acc_grad_hooks(state->params[slot], std::make_unique<Hook>(state, slot));
    }
    *out = new VovdetReducer{state};
  });
}

// Removes this reducer's hooks and releases it; a hook still running elsewhere sees `alive == false`.
void vovdet_reducer_free(VovdetReducer* reducer) {
  std::vector<at::Tensor> params;
  {
    std::lock_guard<std::mutex> lock(reducer->state->mutex);
    reducer->state->alive = false;
    params.swap(reducer->state->params);
    reducer->state->buffers.clear();
    reducer->state->works.clear();
  }
  for (auto& param : params) {
    try {
      auto& hook = torch::autograd::impl::post_acc_grad_hooks(param);
      auto* mine = dynamic_cast<Hook*>(hook.get());
      if (mine != nullptr && mine->state == reducer->state) {
        hook.reset();
      }
    } catch (...) {
      // A parameter without autograd metadata any more has no hook to remove.
    }
  }
  delete reducer;
}

// Makes the next backward launch bucket all-reduces from its hooks.
char* vovdet_reducer_arm(VovdetReducer* reducer) {
  return vovdet::guarded([&] {
    State& s = *reducer->state;
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.armed) {
      return;
    }
    TORCH_CHECK(s.next_launch == 0, "the previous armed backward was not finished (", s.next_launch,
                " bucket(s) launched); call finish first");
    s.reset_step();
    s.launched_in_backward = 0;
    s.armed = true;
  });
}

// Launches the remaining buckets and the flags, waits, checks, averages and copies back; always disarms.
// *kind tells Rust how to report a failure; *launched_in_backward counts the buckets launched by hooks.
char* vovdet_reducer_finish(VovdetReducer* reducer, int* kind, size_t* launched_in_backward) {
  *kind = kCollectiveError;
  return vovdet::guarded([&] {
    State& s = *reducer->state;
    std::vector<at::Tensor> buffers;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    std::vector<char> has_grad;
    at::Tensor flags;
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      if (!s.armed) {
        s.reset_step();
        s.launched_in_backward = 0;
      }
      *launched_in_backward = s.launched_in_backward;
      std::string error = s.error;
      try {
        if (error.empty()) {
          while (s.next_launch < s.bucket_count()) {
            s.launch_next();
          }
          std::vector<float> local(s.has_grad.begin(), s.has_grad.end());
          flags = at::tensor(local, at::kFloat);
          if (s.device_index >= 0) {
            flags = flags.to(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(s.device_index)));
          }
          std::vector<at::Tensor> list{flags};
          c10d::AllreduceOptions options;
          options.reduceOp = c10d::ReduceOp::SUM;
          options.timeout = s.timeout;
          s.works.push_back(s.backend->allreduce(list, options));
        }
      } catch (...) {
        error = "launching the all-reduce of bucket " + std::to_string(s.next_launch) + ": " +
                vovdet::current_exception_text();
      }
      buffers.swap(s.buffers);
      works.swap(s.works);
      has_grad = s.has_grad;
      s.reset_step();
      if (!error.empty()) {
        throw std::runtime_error(error);
      }
    }
    complete(s, buffers, works, has_grad, flags, kind);
  });
}

}  // extern "C"
