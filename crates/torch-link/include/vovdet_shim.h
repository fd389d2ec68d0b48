// Shared by every C++ shim of vovdet (dist, detector, trainer; on their include path through
// torch_link::shim_build): a C++ exception never crosses into Rust. Each exported function catches everything and
// returns a malloc'd message, NULL meaning success; each crate's Rust side frees it through that crate's own
// free function.

#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace vovdet {

// A malloc'd, NUL-terminated copy of `message`.
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
