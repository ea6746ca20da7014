// AVX-512 build of the kernel (Skylake-SP and later; the GPU hosts' Xeons).
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
// GCC 12's AVX-512 headers use `__m512 __Y = __Y;` for undefined vectors: silence that noise.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#define NEO_ISA_AVX512 1
#define NEO_ISA_NAME "avx512"
#define NEO_ISA_TABLE isa_avx512
#include "kernel_impl.h"
#else
#include "isa.h"
namespace neo { const IsaKernels* isa_avx512() { return nullptr; } }
#endif
