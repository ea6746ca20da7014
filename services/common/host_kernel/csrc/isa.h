// Interface between the ISA-neutral driver (dispatch.cpp) and the per-ISA kernel units.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace neo {

constexpr int kMaxGroup = 16;     // query heads per KV head
constexpr int kMaxBlock = 64;     // tokens per block
constexpr int kMaxHeadDim = 256;

// One work item: KV head `h` of request `b`, blocks [j0, j1) of its block table.
struct Chunk {
  int32_t b, h, j0, j1;
  int32_t part;      // index of its partial-result slot, or -1: the item covers the whole request
};

struct KernelCtx {
  const uint16_t* q;
  uint16_t* o;
  const uint16_t* k_cache;
  const uint16_t* v_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int32_t num_q_heads, num_kv_heads, head_dim, block_size, bt_stride, dtype;
  float scale;
  float* parts;      // [num_parts, G, head_dim + 2]: m, l, acc[head_dim]
  int32_t prefetch_bytes;  // of the next block's K and V, issued when a block starts (0: none)
};

struct IsaKernels {
  const char* name;
  // Attend one chunk; writes o directly (part < 0) or its partial slot.
  void (*chunk)(const KernelCtx& ctx, const Chunk& c);
  // Sum of n floats (memory bandwidth probe).
  float (*read_sum)(const float* p, size_t n);
};

const IsaKernels* isa_avx512();
const IsaKernels* isa_avx2();
const IsaKernels* isa_vec16();
const IsaKernels* isa_generic();

}  // namespace neo
