// The one function that frees the messages and texts all of the trainer's shims malloc (see shim_common.h).
#include "shim_common.h"

extern "C" void vovdet_free_message(char* message) { std::free(message); }
