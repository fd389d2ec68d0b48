// Counts the libtorch operators dispatched while a window is open, through a global RecordFunction callback (the
// mechanism torch.profiler uses). On CUDA each counted operator is roughly one kernel launch and some of them are
// host-device synchronisations, so the counts of one training step show where launch and sync overhead comes from
// without a GPU. Every C++ exception is caught here and returned as a message.

#include "shim_common.h"

#include <ATen/record_function.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>

namespace {

std::mutex counts_mutex;
std::map<std::string, int64_t> counts;
at::CallbackHandle handle = 0;

std::unique_ptr<at::ObserverContext> on_enter(const at::RecordFunction& fn) {
  std::lock_guard<std::mutex> guard(counts_mutex);
  counts[fn.name()] += 1;
  return nullptr;
}

}  // namespace

extern "C" {

// Starts counting (operators only, on every thread, autograd's included). NULL on success, else a message.
char* vovdet_op_count_start() {
  try {
    std::lock_guard<std::mutex> guard(counts_mutex);
    if (handle != 0) {
      return vovdet::copy_message("an operator count is already running");
    }
    counts.clear();
    handle = at::addGlobalCallback(
        at::RecordFunctionCallback(&on_enter).needsInputs(false).scopes({at::RecordScope::FUNCTION}));
    return nullptr;
  } catch (const std::exception& e) {
    return vovdet::copy_message(e.what());
  }
}

// Stops counting and writes "name<TAB>count\n" lines to *out (free with vovdet_free_message). NULL on success.
char* vovdet_op_count_stop(char** out) {
  try {
    if (handle == 0) {
      return vovdet::copy_message("no operator count is running");
    }
    at::removeCallback(handle);
    handle = 0;
    std::string text;
    std::lock_guard<std::mutex> guard(counts_mutex);
    for (const auto& entry : counts) {
      text += entry.first + "\t" + std::to_string(entry.second) + "\n";
    }
    *out = vovdet::copy_message(text);
    return nullptr;
  } catch (const std::exception& e) {
    return vovdet::copy_message(e.what());
  }
}

}  // extern "C"
