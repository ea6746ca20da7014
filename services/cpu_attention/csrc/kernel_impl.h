// The decode-attention inner kernel, written once against the Simd primitives of simd.h and compiled
// once per ISA (kernel_avx512.cpp, kernel_avx2.cpp, kernel_generic.cpp define NEO_ISA_* and the
// table name, then include this file).
//
// Per chunk (request b, KV head h, blocks j0..j1): the G query heads of the group are converted to
// fp32 (pre-scaled) once; then for each block, every K row is loaded and converted once and dotted
// with all G queries while in registers (groups of up to 4 heads; larger groups re-read the row from
// L1, never from memory); an online (running-max) softmax updates m, l and the fp32 accumulators, and
// every V row is likewise loaded once and accumulated into all G heads.
#include "isa.h"
#include "simd.h"

namespace {

using neo::Chunk;
using neo::KernelCtx;
using V = Simd::V;
constexpr int L = Simd::L;
constexpr int SB = neo::kMaxBlock;  // score row stride

// s[g*SB + t] = q_g . k_t  for t < n, g < NG
template <int D, int NG, int DT>
static inline void scores(const float* __restrict q, const uint16_t* __restrict kp, int n, float* __restrict s) {
  for (int t = 0; t < n; ++t) {
    const uint16_t* kr = kp + (size_t)t * D;
    V a[NG], b[NG];
    for (int g = 0; g < NG; ++g) { a[g] = Simd::zero(); b[g] = Simd::zero(); }
    for (int i = 0; i < D; i += 2 * L) {
      V k0 = Simd::template load_kv<DT>(kr + i);
      V k1 = Simd::template load_kv<DT>(kr + i + L);
      for (int g = 0; g < NG; ++g) {
        a[g] = Simd::fma(Simd::load(q + g * D + i), k0, a[g]);
        b[g] = Simd::fma(Simd::load(q + g * D + i + L), k1, b[g]);
      }
    }
    for (int g = 0; g < NG; ++g) s[g * SB + t] = Simd::hsum(Simd::add(a[g], b[g]));
  }
}

// acc_g = acc_g * alpha_g + sum_t p[g*SB + t] * v_t
template <int D, int NG, int DT>
static inline void accumulate(float* __restrict acc, const float* __restrict p, const float* alpha,
                              const uint16_t* __restrict vp, int n) {
  for (int i = 0; i < D; i += L) {
    V a[NG];
    for (int g = 0; g < NG; ++g) a[g] = Simd::mul(Simd::load(acc + g * D + i), Simd::set1(alpha[g]));
    for (int t = 0; t < n; ++t) {
      V v = Simd::template load_kv<DT>(vp + (size_t)t * D + i);
      for (int g = 0; g < NG; ++g) a[g] = Simd::fma(Simd::set1(p[g * SB + t]), v, a[g]);
    }
    for (int g = 0; g < NG; ++g) Simd::store(acc + g * D + i, a[g]);
  }
}

template <int D, int DT>
static void scores_n(int ng, const float* q, const uint16_t* kp, int n, float* s) {
  switch (ng) {
    case 1: scores<D, 1, DT>(q, kp, n, s); break;
    case 2: scores<D, 2, DT>(q, kp, n, s); break;
    case 3: scores<D, 3, DT>(q, kp, n, s); break;
    default: scores<D, 4, DT>(q, kp, n, s); break;
  }
}

template <int D, int DT>
static void accumulate_n(int ng, float* acc, const float* p, const float* alpha, const uint16_t* vp, int n) {
  switch (ng) {
    case 1: accumulate<D, 1, DT>(acc, p, alpha, vp, n); break;
    case 2: accumulate<D, 2, DT>(acc, p, alpha, vp, n); break;
    case 3: accumulate<D, 3, DT>(acc, p, alpha, vp, n); break;
    default: accumulate<D, 4, DT>(acc, p, alpha, vp, n); break;
  }
}

static inline void prefetch_block(const uint16_t* p, size_t bytes) {
  const char* c = (const char*)p;
  for (size_t off = 0; off < bytes; off += 64) Simd::prefetch(c + off);
}

template <int D, int DT>
static void chunk_impl(const KernelCtx& ctx, const Chunk& c) {
  const int Hq = ctx.num_q_heads, Hkv = ctx.num_kv_heads, G = Hq / Hkv, bs = ctx.block_size;
  const int len = ctx.seq_lens[c.b];
  const int32_t* bt = ctx.block_tables + (size_t)c.b * ctx.bt_stride;
  const size_t head_stride = (size_t)bs * D;                 // elements of one (block, head)
  const size_t block_stride = (size_t)Hkv * head_stride;

  alignas(64) float qf[neo::kMaxGroup * D];
  alignas(64) float acc[neo::kMaxGroup * D];
  alignas(64) float s[neo::kMaxGroup * SB];
  float m[neo::kMaxGroup], l[neo::kMaxGroup], alpha[neo::kMaxGroup];

  const uint16_t* qsrc = ctx.q + ((size_t)c.b * Hq + (size_t)c.h * G) * D;
  for (int i = 0; i < G * D; ++i) qf[i] = kv_to_f32<DT>(qsrc[i]) * ctx.scale;
  for (int i = 0; i < G * D; ++i) acc[i] = 0.0f;
  for (int g = 0; g < G; ++g) { m[g] = -1e30f; l[g] = 0.0f; }

  for (int j = c.j0; j < c.j1; ++j) {
    const int n = (len - j * bs) < bs ? (len - j * bs) : bs;
    const size_t base = (size_t)bt[j] * block_stride + (size_t)c.h * head_stride;
    const uint16_t* kp = ctx.k_cache + base;
    const uint16_t* vp = ctx.v_cache + base;
    if (j + 1 < c.j1) {  // the next block is elsewhere in memory: start fetching it now
      const size_t nb = (size_t)bt[j + 1] * block_stride + (size_t)c.h * head_stride;
      prefetch_block(ctx.k_cache + nb, head_stride * 2);
      prefetch_block(ctx.v_cache + nb, head_stride * 2);
    }
    for (int g0 = 0; g0 < G; g0 += 4) {
      const int ng = G - g0 < 4 ? G - g0 : 4;
      scores_n<D, DT>(ng, qf + g0 * D, kp, n, s + g0 * SB);
    }
    for (int g = 0; g < G; ++g) {
      float* sg = s + g * SB;
      float mx = m[g];
      for (int t = 0; t < n; ++t) mx = sg[t] > mx ? sg[t] : mx;
      alpha[g] = mx > m[g] ? expf(m[g] - mx) : 1.0f;
      m[g] = mx;
      for (int t = n; t < ((n + L - 1) / L) * L; ++t) sg[t] = -1e30f;
      V sum = Simd::zero(), mv = Simd::set1(mx);
      for (int t = 0; t < n; t += L) {
        V p = Simd::exp(Simd::add(Simd::load(sg + t), Simd::mul(mv, Simd::set1(-1.0f))));
        Simd::store(sg + t, p);
        sum = Simd::add(sum, p);
      }
      l[g] = l[g] * alpha[g] + Simd::hsum(sum);
    }
    for (int g0 = 0; g0 < G; g0 += 4) {
      const int ng = G - g0 < 4 ? G - g0 : 4;
      accumulate_n<D, DT>(ng, acc + g0 * D, s + g0 * SB, alpha + g0, vp, n);
    }
  }

  if (c.part < 0) {
    uint16_t* out = ctx.o + ((size_t)c.b * Hq + (size_t)c.h * G) * D;
    for (int g = 0; g < G; ++g) {
      const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
      for (int d = 0; d < D; ++d) out[g * D + d] = f32_to_kv<DT>(acc[g * D + d] * inv);
    }
  } else {
    float* part = ctx.parts + (size_t)c.part * G * (D + 2);
    for (int g = 0; g < G; ++g) {
      float* pg = part + (size_t)g * (D + 2);
      pg[0] = m[g];
      pg[1] = l[g];
      for (int d = 0; d < D; ++d) pg[2 + d] = acc[g * D + d];
    }
  }
}

static void chunk_entry(const KernelCtx& ctx, const Chunk& c) {
  const bool f16 = ctx.dtype != 0;
  switch (ctx.head_dim) {
    case 64: f16 ? chunk_impl<64, 1>(ctx, c) : chunk_impl<64, 0>(ctx, c); break;
    case 128: f16 ? chunk_impl<128, 1>(ctx, c) : chunk_impl<128, 0>(ctx, c); break;
    case 256: f16 ? chunk_impl<256, 1>(ctx, c) : chunk_impl<256, 0>(ctx, c); break;
    default: break;  // rejected by the driver
  }
}

static float read_sum_impl(const float* p, size_t n) {
  V a0 = Simd::zero(), a1 = Simd::zero(), a2 = Simd::zero(), a3 = Simd::zero();
  size_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 = Simd::add(a0, Simd::load(p + i));
    a1 = Simd::add(a1, Simd::load(p + i + L));
    a2 = Simd::add(a2, Simd::load(p + i + 2 * L));
    a3 = Simd::add(a3, Simd::load(p + i + 3 * L));
  }
  float r = Simd::hsum(Simd::add(Simd::add(a0, a1), Simd::add(a2, a3)));
  for (; i < n; ++i) r += p[i];
  return r;
}

const neo::IsaKernels kTable = {NEO_ISA_NAME, chunk_entry, read_sum_impl};

}  // namespace

namespace neo {
const IsaKernels* NEO_ISA_TABLE() { return &kTable; }
}  // namespace neo
