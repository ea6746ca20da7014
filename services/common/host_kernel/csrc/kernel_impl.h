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
constexpr int SB = neo::kMaxBlock + 32;  // score row stride (room for padded lanes)

// Two vectors of KV elements [p, p + 2L). For bf16 they come from one load, even-indexed elements in
// v0 and odd-indexed in v1 ("pair order"); q and the accumulators are kept in the same order, and
// pos<DT>() maps a natural element index to its place. fp16 keeps the natural order.
template <int DT>
static inline void load2(const uint16_t* p, V& v0, V& v1) {
  if (DT == 0) {
    Simd::load_bf16_pair(p, v0, v1);
  } else {
    v0 = Simd::template load_kv<DT>(p);
    v1 = Simd::template load_kv<DT>(p + L);
  }
}

template <int DT>
static inline int pos(int e) {
  if (DT != 0) return e;
  const int grp = e / (2 * L) * (2 * L), r = e % (2 * L);
  return grp + (r & 1) * L + (r >> 1);
}

// s[g*SB + t] = q_g . k_t  for t < n, g < NG (s is written up to the next multiple of 8).
// Each K row is converted once and used by all NG heads while in registers; the per-token dot
// products are reduced 8 tokens at a time (hsum8) instead of one horizontal sum each.
template <int D, int NG, int DT>
static inline void scores(const float* __restrict q, const uint16_t* __restrict kp, int n, float* __restrict s,
                          const uint16_t* next_k, const uint16_t* next_v, int next_rows) {
  // Prefetch the next block's K and V rows while computing this one, a row of each per token, so the
  // misses overlap with the arithmetic instead of arriving in one burst that stalls the fill buffers.
  const int rows_per_t = next_k ? (next_rows + n - 1) / n : 0;
  for (int t0 = 0; t0 < n; t0 += 8) {
    V part[NG][8];
    const int nt = n - t0 < 8 ? n - t0 : 8;
    for (int tt = 0; tt < 8; ++tt) {
      if (tt >= nt) {
        for (int g = 0; g < NG; ++g) part[g][tt] = Simd::zero();
        continue;
      }
      const uint16_t* kr = kp + (size_t)(t0 + tt) * D;
      for (int r = 0; r < rows_per_t; ++r) {
        const int row = (t0 + tt) * rows_per_t + r;
        if (row < next_rows) {
          for (int off = 0; off < D * 2; off += 64) Simd::prefetch((const char*)(next_k + (size_t)row * D) + off);
          for (int off = 0; off < D * 2; off += 64) Simd::prefetch((const char*)(next_v + (size_t)row * D) + off);
        }
      }
      V a[NG], b[NG];
      for (int g = 0; g < NG; ++g) { a[g] = Simd::zero(); b[g] = Simd::zero(); }
      for (int i = 0; i < D; i += 2 * L) {
        V k0, k1;
        load2<DT>(kr + i, k0, k1);
        for (int g = 0; g < NG; ++g) {
          a[g] = Simd::fma(Simd::load(q + g * D + i), k0, a[g]);
          b[g] = Simd::fma(Simd::load(q + g * D + i + L), k1, b[g]);
        }
      }
      for (int g = 0; g < NG; ++g) part[g][tt] = Simd::add(a[g], b[g]);
    }
    for (int g = 0; g < NG; ++g) Simd::hsum8(part[g], s + g * SB + t0);
  }
}

// acc_g = acc_g * alpha_g + sum_t p[g*SB + t] * v_t. IC column chunks per pass give NG*IC independent
// FMA chains (enough to hide FMA latency) and share each broadcast probability across IC chunks.
template <int D, int NG, int DT>
static inline void accumulate(float* __restrict acc, const float* __restrict p, const float* alpha,
                              const uint16_t* __restrict vp, int n) {
  // enough independent FMA chains (8 with 16 registers, 16 with 32), in pairs of column chunks
  constexpr int CHAINS = L >= 16 ? 16 : 8;
  constexpr int IC1 = (CHAINS / NG) & ~1;
  constexpr int IC0 = IC1 < 2 ? 2 : IC1;
  constexpr int IC = IC0 * L > D ? D / L : IC0;
  for (int i = 0; i < D; i += IC * L) {
    V a[NG][IC];
    for (int g = 0; g < NG; ++g) {
      const V al = Simd::set1(alpha[g]);
      for (int c = 0; c < IC; ++c) a[g][c] = Simd::mul(Simd::load(acc + g * D + i + c * L), al);
    }
    for (int t = 0; t < n; ++t) {
      V v[IC];
      for (int c = 0; c < IC; c += 2) load2<DT>(vp + (size_t)t * D + i + c * L, v[c], v[c + 1]);
      for (int g = 0; g < NG; ++g) {
        const V pg = Simd::set1(p[g * SB + t]);
        for (int c = 0; c < IC; ++c) a[g][c] = Simd::fma(pg, v[c], a[g][c]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < IC; ++c) Simd::store(acc + g * D + i + c * L, a[g][c]);
  }
}

template <int D, int DT>
static void scores_n(int ng, const float* q, const uint16_t* kp, int n, float* s, const uint16_t* nk,
                     const uint16_t* nv, int nr) {
  switch (ng) {
    case 1: scores<D, 1, DT>(q, kp, n, s, nk, nv, nr); break;
    case 2: scores<D, 2, DT>(q, kp, n, s, nk, nv, nr); break;
    case 3: scores<D, 3, DT>(q, kp, n, s, nk, nv, nr); break;
    default: scores<D, 4, DT>(q, kp, n, s, nk, nv, nr); break;
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
  const V vscale = Simd::set1(ctx.scale);
  for (int i = 0; i < G * D; i += 2 * L) {  // q -> fp32 (pair order for bf16), pre-scaled
    V q0, q1;
    load2<DT>(qsrc + i, q0, q1);
    Simd::store(qf + i, Simd::mul(q0, vscale));
    Simd::store(qf + i + L, Simd::mul(q1, vscale));
  }
  for (int i = 0; i < G * D; i += L) Simd::store(acc + i, Simd::zero());
  for (int g = 0; g < G; ++g) { m[g] = -1e30f; l[g] = 0.0f; }

  for (int j = c.j0; j < c.j1; ++j) {
    const int n = (len - j * bs) < bs ? (len - j * bs) : bs;
    const size_t base = (size_t)bt[j] * block_stride + (size_t)c.h * head_stride;
    const uint16_t* kp = ctx.k_cache + base;
    const uint16_t* vp = ctx.v_cache + base;
    // The next block is elsewhere in memory: its K and V are prefetched while this one computes.
    const uint16_t *nk = nullptr, *nv = nullptr;
    int nrows = 0;
    if (j + 1 < c.j1 && ctx.prefetch_bytes) {
      const size_t nb = (size_t)bt[j + 1] * block_stride + (size_t)c.h * head_stride;
      nk = ctx.k_cache + nb;
      nv = ctx.v_cache + nb;
      nrows = (len - (j + 1) * bs) < bs ? (len - (j + 1) * bs) : bs;
    }
    for (int g0 = 0; g0 < G; g0 += 4) {
      const int ng = G - g0 < 4 ? G - g0 : 4;
      scores_n<D, DT>(ng, qf + g0 * D, kp, n, s + g0 * SB, g0 ? nullptr : nk, nv, nrows);
    }
    for (int g = 0; g < G; ++g) {
      float* sg = s + g * SB;
      for (int t = n; t < (n + L - 1) / L * L; ++t) sg[t] = -1e30f;  // lanes past n
      V vmx = Simd::load(sg);
      for (int t = L; t < n; t += L) vmx = Simd::vmax(vmx, Simd::load(sg + t));
      const float bmx = Simd::hmax(vmx);
      const float mx = bmx > m[g] ? bmx : m[g];
      alpha[g] = mx > m[g] ? (m[g] <= -1e29f ? 0.0f : expf(m[g] - mx)) : 1.0f;
      m[g] = mx;
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
      const V inv = Simd::set1(l[g] > 0.0f ? 1.0f / l[g] : 0.0f);
      for (int i = g * D; i < (g + 1) * D; i += 2 * L) {
        const V a0 = Simd::mul(Simd::load(acc + i), inv), a1 = Simd::mul(Simd::load(acc + i + L), inv);
        if (DT == 0) {
          Simd::store_bf16_pair(out + i, a0, a1);   // undoes the pair order
        } else {
          Simd::store_f16(out + i, a0);
          Simd::store_f16(out + i + L, a1);
        }
      }
    }
  } else {
    float* part = ctx.parts + (size_t)c.part * G * (D + 2);
    for (int g = 0; g < G; ++g) {
      float* pg = part + (size_t)g * (D + 2);
      pg[0] = m[g];
      pg[1] = l[g];
      for (int d = 0; d < D; ++d) pg[2 + d] = acc[g * D + pos<DT>(d)];
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
