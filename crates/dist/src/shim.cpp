// C ABI over PyTorch's c10d (TCPStore rendezvous, ProcessGroupGloo, and ProcessGroupNCCL when compiled with
// VOVDET_NCCL). Every function catches every C++ exception and returns it as a malloc'd message (NULL means
// success); the Rust side (src/ffi.rs) turns it into a `DistError`. Tensors cross as `at::Tensor*`, which is what
// tch's `C_tensor*` points to.

#include "shim.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef VOVDET_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using vovdet::Group;
using vovdet::guarded;
using vovdet::wait_all;

std::vector<at::Tensor> tensor_list(const at::Tensor* const* tensors, size_t count) {
  std::vector<at::Tensor> list;
  list.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    list.push_back(*tensors[i]);
  }
  return list;
}

std::shared_ptr<gloo::transport::Device> gloo_device(const std::string& master_addr) {
  if (const char* interface = std::getenv("GLOO_SOCKET_IFNAME"); interface != nullptr && *interface != '\0') {
    return c10d::ProcessGroupGloo::createDeviceForInterface(interface);
  }
  if (master_addr == "localhost" || master_addr.rfind("127.", 0) == 0) {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

// Mean over ranks whose backward is again the mean over ranks of the incoming gradient, so that the gradient of
// every rank's input is the derivative of the sum of all ranks' losses (as detectron2's differentiable all-reduce
// followed by a division by the world size).
struct AllReduceMean : public torch::autograd::Function<AllReduceMean> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            c10::intrusive_ptr<c10d::Backend> backend, int64_t world_size, int64_t timeout_ms) {
    ctx->saved_data["backend"] = c10::IValue::make_capsule(backend);
    ctx->saved_data["world_size"] = world_size;
    ctx->saved_data["timeout_ms"] = timeout_ms;
    return reduce_mean(input, backend, world_size, timeout_ms);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto backend = c10::static_intrusive_pointer_cast<c10d::Backend>(ctx->saved_data["backend"].toCapsule());
    auto world_size = ctx->saved_data["world_size"].toInt();
    auto timeout_ms = ctx->saved_data["timeout_ms"].toInt();
    return {reduce_mean(grads[0], backend, world_size, timeout_ms), at::Tensor(), at::Tensor(), at::Tensor()};
  }

  static at::Tensor reduce_mean(const at::Tensor& input, const c10::intrusive_ptr<c10d::Backend>& backend,
                                int64_t world_size, int64_t timeout_ms) {
    std::vector<at::Tensor> list{input.detach().clone(at::MemoryFormat::Contiguous)};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    backend->allreduce(list, options)->wait(std::chrono::milliseconds(timeout_ms));
    return list[0].div_(static_cast<double>(world_size));
  }
};

}  // namespace

extern "C" {

void vovdet_dist_free_message(char* message) { std::free(message); }

// Backend 0 is Gloo, 1 is NCCL. On success stores the group in *out. On rank 0, a listen_fd >= 0 is a socket
// already bound to the master address and listening, which the TCPStore server takes over (otherwise c10d binds
// the port on every interface).
char* vovdet_dist_init(int backend, const char* master_addr, uint16_t master_port, int rank, int world_size,
                       int64_t timeout_ms, int device_index, int listen_fd, Group** out) {
  return guarded([&] {
    std::string addr(master_addr);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions store_options;
    store_options.port = master_port;
    store_options.isServer = rank == 0;
    store_options.numWorkers = static_cast<size_t>(world_size);
    store_options.waitWorkers = true;
    store_options.timeout = timeout;
    if (rank == 0 && listen_fd >= 0) {
      store_options.masterListenFd = listen_fd;
    }
    auto store = c10::make_intrusive<c10d::TCPStore>(addr, store_options);

    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 0) {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(gloo_device(addr));
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
    } else {
#ifdef VOVDET_NCCL
      // Blocking wait makes Work::wait throw on timeout instead of letting the watchdog abort the process.
      setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
#else
      throw std::runtime_error("this build of crates/dist has no NCCL support (cargo feature `nccl`)");
#endif
    }
    // Names that c10d's logs and flight recorder show, as torch.distributed gives its default group.
    pg->setGroupUid("0");
    pg->setGroupDesc("default_pg");
    *out = new Group{store, pg, rank, world_size, backend == 0 ? -1 : device_index};
  });
}

// Releases the group. NCCL communicators are shut down first (as torch.distributed.destroy_process_group does),
// so that the process exits without c10d's warning about leaked communicators.
void vovdet_dist_free(Group* group) {
  if (group->device_index >= 0) {
    try {
      group->backend->shutdown();
    } catch (...) {
      // Shutting down after a failed collective may throw; the process is leaving the group either way.
    }
  }
  delete group;
}

// Sums every tensor over ranks in place (one collective per tensor, all issued before waiting).
char* vovdet_dist_all_reduce_sum(Group* group, const at::Tensor* const* tensors, size_t count, int64_t timeout_ms) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (size_t i = 0; i < count; ++i) {
      std::vector<at::Tensor> list{*tensors[i]};
      c10d::AllreduceOptions options;
      options.reduceOp = c10d::ReduceOp::SUM;
      options.timeout = timeout;
      works.push_back(group->backend->allreduce(list, options));
    }
    wait_all(works, timeout);
  });
}

// Copies every tensor of rank `root` into the same tensor of every other rank.
char* vovdet_dist_broadcast(Group* group, const at::Tensor* const* tensors, size_t count, int root,
                            int64_t timeout_ms) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (size_t i = 0; i < count; ++i) {
      std::vector<at::Tensor> list{*tensors[i]};
      c10d::BroadcastOptions options;
      options.rootRank = root;
      options.timeout = timeout;
      works.push_back(group->backend->broadcast(list, options));
    }
    wait_all(works, timeout);
  });
}

// Fills outputs[r] (world_size preallocated tensors shaped like input) with rank r's input.
char* vovdet_dist_all_gather(Group* group, const at::Tensor* input, const at::Tensor* const* outputs,
                             int64_t timeout_ms) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    std::vector<std::vector<at::Tensor>> output_lists{tensor_list(outputs, static_cast<size_t>(group->world_size))};
    std::vector<at::Tensor> inputs{*input};
    c10d::AllgatherOptions options;
    options.timeout = timeout;
    group->backend->allgather(output_lists, inputs, options)->wait(timeout);
  });
}

char* vovdet_dist_barrier(Group* group, int64_t timeout_ms) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::BarrierOptions options;
    options.timeout = timeout;
    if (group->device_index >= 0) {
      options.device_ids = {group->device_index};
      options.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(group->device_index));
    }
    group->backend->barrier(options)->wait(timeout);
  });
}

// Differentiable mean over ranks of `input`; stores a new tensor in *out.
char* vovdet_dist_all_reduce_mean_autograd(Group* group, const at::Tensor* input, int64_t timeout_ms,
                                           at::Tensor** out) {
  return guarded([&] {
    auto result = AllReduceMean::apply(*input, group->backend, static_cast<int64_t>(group->world_size), timeout_ms);
    *out = new at::Tensor(std::move(result));
  });
}

}  // extern "C"
