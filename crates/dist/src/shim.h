// Declarations shared by the C++ parts of crates/dist (shim.cpp, reducer.cpp): the process group handed to Rust
// as an opaque pointer and waiting for collectives; exceptions become messages through vovdet_shim.h (torch-link).

#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "vovdet_shim.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace vovdet {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int world_size;
  // CUDA device index used by NCCL barriers; -1 for Gloo.
  int device_index;
};

// Waits for every collective of `works`, each bounded by `timeout` (c10d throws when it passes).
inline void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works, std::chrono::milliseconds timeout) {
  for (auto& work : works) {
    work->wait(timeout);
  }
}

}  // namespace vovdet
