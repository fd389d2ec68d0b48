// Counts the libtorch operators dispatched while a window is open, through a thread-local RecordFunction callback
// (the mechanism torch.profiler uses): the operators of the thread that opens the window and of the autograd work
// it starts (autograd carries the callback to its device threads with the rest of the thread-local state), not
// those of unrelated threads such as the loader's workers. On CUDA each counted operator is roughly one kernel launch and some of them are
// host-device synchronisations, so the counts of one training step show where launch and sync overhead comes from
// without a GPU. Every C++ exception is caught here and returned as a message.

#include "vovdet_shim.h"

#include <ATen/record_function.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

std::mutex counts_mutex;
std::map<std::string, int64_t> counts;
// With tracing on, one entry per operator in dispatch order: its name and its inputs' shapes.
bool tracing = false;
std::vector<std::string> trace;
at::CallbackHandle handle = 0;

// "name(f32[2,3,64,96], i64[4], 7, _)": tensors as dtype and sizes, integers as values, anything else as "_".
std::string describe(const at::RecordFunction& fn) {
  std::string entry = fn.name();
  entry += "(";
  bool first = true;
  for (const c10::IValue& input : fn.inputs()) {
    if (!first) {
      entry += ", ";
    }
    first = false;
    if (input.isTensor()) {
      const at::Tensor& tensor = input.toTensor();
      if (!tensor.defined()) {
        entry += "undefined";
        continue;
      }
      entry += std::string(c10::toString(tensor.scalar_type())) + "[";
      for (int64_t d = 0; d < tensor.dim(); ++d) {
        entry += (d == 0 ? "" : ",") + std::to_string(tensor.size(d));
      }
      entry += "]";
    } else if (input.isInt()) {
      entry += std::to_string(input.toInt());
    } else if (input.isIntList()) {
      entry += "[";
      bool first_int = true;
      for (int64_t value : input.toIntVector()) {
        entry += (first_int ? "" : ",") + std::to_string(value);
        first_int = false;
      }
      entry += "]";
    } else {
      entry += "_";
    }
  }
  return entry + ")";
}

std::unique_ptr<at::ObserverContext> on_enter(const at::RecordFunction& fn) {
  std::lock_guard<std::mutex> guard(counts_mutex);
  counts[fn.name()] += 1;
  if (tracing) {
    try {
      trace.push_back(describe(fn));
    } catch (const c10::Error&) {
      // libtorch sometimes records an operator without its inputs even though this callback asks for them
      // (`inputs()` then throws); the name is still right.
      trace.push_back(std::string(fn.name()) + "(?)");
    }
  }
  return nullptr;
}

}  // namespace

extern "C" {

// Starts counting on the calling thread (operators only, autograd's included); stop on the same thread. With
// `with_trace`, every operator's name and input shapes are recorded in order too. NULL on success, else a message.
char* vovdet_op_count_start(int with_trace) {
  try {
    std::lock_guard<std::mutex> guard(counts_mutex);
    if (handle != 0) {
      return vovdet::copy_message("an operator count is already running");
    }
    counts.clear();
    trace.clear();
    tracing = with_trace != 0;
    handle = at::addThreadLocalCallback(at::RecordFunctionCallback(&on_enter)
                                            .needsInputs(tracing)
                                            .scopes({at::RecordScope::FUNCTION}));
    return nullptr;
  } catch (const std::exception& e) {
    return vovdet::copy_message(e.what());
  }
}

// Stops counting and writes "name<TAB>count\n" lines to *counts_out and the trace (one entry per line, empty
// without tracing) to *trace_out (free both with vovdet_free_message). NULL on success.
char* vovdet_op_count_stop(char** counts_out, char** trace_out) {
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
    std::string lines;
    for (const auto& entry : trace) {
      lines += entry + "\n";
    }
    trace.clear();
    *counts_out = vovdet::copy_message(text);
    *trace_out = vovdet::copy_message(lines);
    return nullptr;
  } catch (const std::exception& e) {
    return vovdet::copy_message(e.what());
  }
}

}  // extern "C"
