// Interface between the ISA-neutral driver (qd_binding.cpp) and the per-ISA builds of the quantized
// dense kernel (qd_impl.h, compiled once per instruction set).
//
// y[M, N] = x[M, K] @ W[N, K].T (+ bias) where W holds GGUF blocks of 32 values, row-major: row n is
// K / 32 consecutive blocks. Every weight value is dequantized as the Python loader does (float32
// d * q, plus m for Q4_1, two roundings, never fused), so the products are those of the float32 path.
//
// Summation order (the same in every ISA build, for every M, every thread count): output (m, n) has
// one 8-lane accumulator; lane j sums w[n, k] * x[m, k] over k = j, j + 8, j + 16, ... in increasing
// k, one fused multiply-add each; the lanes are then added as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)).
// A row's result depends on nothing but that row and W (batch-invariant), the work is split over
// tiles of N only (thread-invariant), and the scalar build computes the same bits as the AVX2 one.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace neo_qd {

// GGML type ids of the supported block formats.
enum Format : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };
constexpr int kBlock = 32;   // values per block

constexpr int block_bytes(int fmt) { return fmt == kQ4_0 ? 18 : fmt == kQ4_1 ? 20 : fmt == kQ8_0 ? 34 : 0; }

struct Problem {
  int32_t fmt;
  const uint8_t* w;      // [n, k / 32] blocks
  int64_t n, k;
  const float* x;        // [m, k], row stride ldx
  int64_t m, ldx;
  float* y;              // [m, n], row stride ldy
  int64_t ldy;
  const float* bias;     // [n] or null
};

struct IsaKernels {
  const char* name;
  // Output columns [n0, n1) of every row of p.
  void (*columns)(const Problem& p, int64_t n0, int64_t n1);
  // out[i, :] = dequantized row ids[i] of W (an embedding lookup).
  void (*rows)(int32_t fmt, const uint8_t* w, int64_t k, const int64_t* ids, int64_t count, float* out);
};

const IsaKernels* isa_avx2();     // null where not built (not x86-64)
const IsaKernels* isa_generic();

}  // namespace neo_qd
