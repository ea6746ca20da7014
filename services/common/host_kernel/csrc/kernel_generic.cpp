// Portable scalar build of the kernel: correct on any CPU, used when no SIMD unit above is present.
#define NEO_ISA_GENERIC 1
#define NEO_ISA_NAME "generic"
#define NEO_ISA_TABLE isa_generic
#include "kernel_impl.h"
