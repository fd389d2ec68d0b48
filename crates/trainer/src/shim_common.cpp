// The one function that frees the messages and texts all of the trainer's shims malloc (see vovdet_shim.h in torch-link).
#include "vovdet_shim.h"

extern "C" void vovdet_free_message(char* message) { std::free(message); }
