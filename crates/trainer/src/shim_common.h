// Shared by the trainer's C++ shims: every C++ exception is caught at the boundary and handed to Rust as a
// malloc'ed message (NULL means success), which the Rust side frees through
// vovdet_free_message (shim_common.cpp).
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace vovdet {

// A malloc'ed, NUL-terminated copy of `text`.
inline char* copy_message(const std::string& text) {
  char* message = static_cast<char*>(std::malloc(text.size() + 1));
  if (message != nullptr) {
    std::memcpy(message, text.c_str(), text.size() + 1);
  }
  return message;
}

// Runs `body`; NULL on success, else the exception's message.
template <typename F>
char* guarded(F body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

}  // namespace vovdet
