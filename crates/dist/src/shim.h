// Declarations shared by the C++ parts of crates/dist (shim.cpp, reducer.cpp): the process group handed to Rust
// as an opaque pointer, waiting for collectives, and the conversion of C++ exceptions into malloc'd messages (NULL
// means success).

#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

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

inline char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out == nullptr) {
    // NULL means success to the caller; without memory for the message there is no honest way to report.
    std::abort();
  }
  std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}

// The text of the exception being handled (call inside a catch block only).
inline std::string current_exception_text() {
  try {
    throw;
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown C++ exception";
  }
}

// Runs `body`, converting any exception into a malloc'd message.
template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (...) {
    return copy_message(current_exception_text());
  }
}

}  // namespace vovdet
