// Portable 16-lane build of the kernel (GCC vector extensions; the baseline of any architecture).
#define NEO_ISA_VEC16 1
#define NEO_ISA_NAME "vec16"
#define NEO_ISA_TABLE isa_vec16
#include "kernel_impl.h"
