// Autocast for any device type and dtype. tch 0.24 can only switch CUDA fp16 autocast on and off; this shim sets
// the device type's autocast state and dtype (fp16 or bf16, CUDA or CPU) as torch.autocast's __enter__ does, and
// restores the previous state on exit, clearing the cast cache when the outermost region ends.
#include <ATen/autocast_mode.h>

#include "vovdet_shim.h"

namespace {

at::DeviceType device_type(int cuda) { return cuda != 0 ? at::kCUDA : at::kCPU; }

}  // namespace

extern "C" {

// Enters an autocast region on CUDA (`cuda` != 0) or CPU with `bf16` != 0 ? bfloat16 : float16. Writes the
// previous enabled flag and dtype (as a c10::ScalarType integer) for the matching exit.
char* vovdet_autocast_enter(int cuda, int bf16, int* previous_enabled, int* previous_dtype) {
  return vovdet::guarded([&] {
    const at::DeviceType type = device_type(cuda);
    *previous_enabled = at::autocast::is_autocast_enabled(type) ? 1 : 0;
    *previous_dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
    at::autocast::set_autocast_dtype(type, bf16 != 0 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::increment_nesting();
  });
}

// Leaves the region entered by `vovdet_autocast_enter`, restoring the state it reported.
char* vovdet_autocast_exit(int cuda, int previous_enabled, int previous_dtype) {
  return vovdet::guarded([&] {
    const at::DeviceType type = device_type(cuda);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, previous_enabled != 0);
    at::autocast::set_autocast_dtype(type, static_cast<at::ScalarType>(previous_dtype));
  });
}

}  // extern "C"
