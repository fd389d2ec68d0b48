// Peak-memory statistics of libtorch's CUDA caching allocator for `trainer bench`, through the device-generic
// allocator API of torch 2.11 (c10::DeviceAllocator: getDeviceStats / resetPeakStats), so that no CUDA header is
// needed to compile it. Every C++ exception is caught here and returned as a message (NULL means success).

#include "vovdet_shim.h"

#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

c10::DeviceAllocator* cuda_allocator() {
  // Throws (c10::Error) when no CUDA allocator is registered, e.g. libtorch_cuda is not loaded.
  return c10::getDeviceAllocator(c10::DeviceType::CUDA);
}

}  // namespace

extern "C" {

// Writes the aggregate (all pools) allocated and reserved bytes of CUDA device `device`:
// out[0] allocated now, out[1] peak allocated (torch.cuda.max_memory_allocated), out[2] reserved now,
// out[3] peak reserved (torch.cuda.max_memory_reserved).
char* vovdet_cuda_memory_stats(int8_t device, int64_t* out) {
  return vovdet::guarded([&] {
    const auto stats = cuda_allocator()->getDeviceStats(device);
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
  });
}

// Resets the peaks of CUDA device `device` to the current values (torch.cuda.reset_peak_memory_stats).
char* vovdet_cuda_reset_peak_memory(int8_t device) {
  return vovdet::guarded([&] { cuda_allocator()->resetPeakStats(device); });
}

}  // extern "C"
