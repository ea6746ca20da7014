// AVX2 + FMA + F16C build of the kernel (Haswell / Zen and later).
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#pragma GCC target("avx2,fma,f16c,bmi2")
#define NEO_ISA_AVX2 1
#define NEO_ISA_NAME "avx2"
#define NEO_ISA_TABLE isa_avx2
#include "kernel_impl.h"
#else
#include "isa.h"
namespace neo { const IsaKernels* isa_avx2() { return nullptr; } }
#endif
