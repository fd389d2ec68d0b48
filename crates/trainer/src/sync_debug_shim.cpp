// CUDA's sync debug mode (what torch.cuda.set_sync_debug_mode sets): while it is on, every CUDA call that makes the
// host wait for the device (a blocking copy, a stream or device synchronisation) prints libtorch's warning
// "called a synchronizing CUDA operation" or fails with it. It is one process-wide setting in libc10_cuda
// (c10::cuda::warning_state()), so it covers the autograd engine's device threads too. Compiled with
// VOVDET_CUDA when libtorch is a CUDA build and the CUDA headers are installed (build.rs); otherwise setting a
// mode other than 0 fails.

#include "vovdet_shim.h"

#ifdef VOVDET_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <stdexcept>

extern "C" {

// Sets the mode: 0 off, 1 warn, 2 error.
char* vovdet_set_cuda_sync_debug_mode(int mode) {
  return vovdet::guarded([&] {
    if (mode < 0 || mode > 2) {
      throw std::invalid_argument("CUDA sync debug mode must be 0, 1 or 2");
    }
#ifdef VOVDET_CUDA
    c10::cuda::warning_state().set_sync_debug_mode(static_cast<c10::cuda::SyncDebugMode>(mode));
#else
    if (mode != 0) {
      throw std::runtime_error("this trainer was built against a libtorch without CUDA (or without the CUDA headers)");
    }
#endif
  });
}

// The current mode (0 off, 1 warn, 2 error); always 0 without CUDA.
int vovdet_cuda_sync_debug_mode() {
#ifdef VOVDET_CUDA
  return static_cast<int>(c10::cuda::warning_state().get_sync_debug_mode());
#else
  return 0;
#endif
}

}  // extern "C"
