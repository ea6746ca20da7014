// Per-ISA SIMD primitives. Included by exactly one translation unit per ISA, after that unit's
// `#pragma GCC target`, with one of NEO_ISA_AVX512 / NEO_ISA_AVX2 / NEO_ISA_GENERIC defined.
// Everything here has internal linkage (anonymous namespace), so code built for one ISA can never be
// merged by the linker into another ISA's unit.
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(NEO_ISA_AVX512) || defined(NEO_ISA_AVX2)
#include <immintrin.h>
#endif

namespace {

static inline float bf16_bits_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float f16_bits_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16_bits(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline uint16_t f32_to_f16_bits(float f) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);          // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);         // overflow -> inf
  if (a < 0x38800000u) {                                            // subnormal or zero in fp16
    if (a < 0x33000000u) return (uint16_t)sign;                     // < half of smallest subnormal
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;                                       // 14 + (113 - e) - ... see below
    // value = m * 2^(e-150); fp16 subnormal unit = 2^-24 -> mantissa = m >> (126 - e)
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = a - 0x38000000u;                                     // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return (uint16_t)(sign | (r >> 13));
}

template <int DT> static inline float kv_to_f32(uint16_t h) {
  return DT == 0 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}
template <int DT> static inline uint16_t f32_to_kv(float f) {
  return DT == 0 ? f32_to_bf16_bits(f) : f32_to_f16_bits(f);
}

#if defined(NEO_ISA_AVX512)
struct Simd {
  using V = __m512;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V vmax(V a, V b) { return _mm512_max_ps(a, b); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  // out[k] = sum of the lanes of a[k], k < 8: fold each to 256 bits, then the AVX2 hadd tree
  static void hsum8(const V* a, float* out) {
    __m256 h[8];
    for (int k = 0; k < 8; ++k)
      h[k] = _mm256_add_ps(_mm512_castps512_ps256(a[k]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[k]), 1)));
    __m256 s01 = _mm256_hadd_ps(h[0], h[1]), s23 = _mm256_hadd_ps(h[2], h[3]);
    __m256 s45 = _mm256_hadd_ps(h[4], h[5]), s67 = _mm256_hadd_ps(h[6], h[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                        _mm256_permute2f128_ps(s0123, s4567, 0x31)));
  }
  template <int DT> static V load_kv(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    if (DT == 0) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
  // 2L bf16 values in one load, split into even- and odd-indexed elements (a permuted order that the
  // kernel's q and accumulators use as well): half the loads and conversions of load_kv.
  static void load_bf16_pair(const uint16_t* p, V& even, V& odd) {
    __m512i x = _mm512_loadu_si512((const void*)p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
  }
  // Store even/odd-ordered fp32 vectors as 2L natural-order bf16 (round to nearest even).
  static void store_bf16_pair(uint16_t* p, V even, V odd) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    __m512i e = _mm512_castps_si512(even), o = _mm512_castps_si512(odd);
    e = _mm512_add_epi32(e, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(e, 16), one)));
    o = _mm512_add_epi32(o, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(o, 16), one)));
    __m512i r = _mm512_or_si512(_mm512_srli_epi32(e, 16), _mm512_and_si512(o, _mm512_set1_epi32((int)0xffff0000u)));
    _mm512_storeu_si512((void*)p, r);
  }
  static void store_f16(uint16_t* p, V v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static V exp(V x) {
    x = _mm512_min_ps(_mm512_max_ps(x, set1(-87.0f)), set1(88.0f));
    V n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    V p = set1(1.9875691500E-4f);
    p = fma(p, r, set1(1.3981999507E-3f));
    p = fma(p, r, set1(8.3334519073E-3f));
    p = fma(p, r, set1(4.1665795894E-2f));
    p = fma(p, r, set1(1.6666665459E-1f));
    p = fma(p, r, set1(5.0000001201E-1f));
    p = fma(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, set1(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  }
  static void prefetch(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
};
#elif defined(NEO_ISA_AVX2)
struct Simd {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V vmax(V a, V b) { return _mm256_max_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[k] = sum of the lanes of a[k], k < 8 (hadd tree: ~9 shuffles/adds for 8 sums)
  static void hsum8(const V* a, float* out) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                        _mm256_permute2f128_ps(s0123, s4567, 0x31)));
  }
  template <int DT> static V load_kv(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    if (DT == 0) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
  static void load_bf16_pair(const uint16_t* p, V& even, V& odd) {
    __m256i x = _mm256_loadu_si256((const __m256i*)p);
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000u)));
  }
  static void store_bf16_pair(uint16_t* p, V even, V odd) {
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    __m256i e = _mm256_castps_si256(even), o = _mm256_castps_si256(odd);
    e = _mm256_add_epi32(e, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(e, 16), one)));
    o = _mm256_add_epi32(o, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(o, 16), one)));
    __m256i r = _mm256_or_si256(_mm256_srli_epi32(e, 16), _mm256_and_si256(o, _mm256_set1_epi32((int)0xffff0000u)));
    _mm256_storeu_si256((__m256i*)p, r);
  }
  static void store_f16(uint16_t* p, V v) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static V exp(V x) {
    x = _mm256_min_ps(_mm256_max_ps(x, set1(-87.0f)), set1(88.0f));
    V n = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    V p = set1(1.9875691500E-4f);
    p = fma(p, r, set1(1.3981999507E-3f));
    p = fma(p, r, set1(8.3334519073E-3f));
    p = fma(p, r, set1(4.1665795894E-2f));
    p = fma(p, r, set1(1.6666665459E-1f));
    p = fma(p, r, set1(5.0000001201E-1f));
    p = fma(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, set1(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static void prefetch(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
};
#elif defined(NEO_ISA_VEC16)
// Portable 16-lane SIMD through GCC vector extensions: the compiler lowers it to whatever the target
// has (4 x SSE2 on a baseline x86-64, 4 x NEON on aarch64). Same 16-lane shape as AVX-512.
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
struct Simd {
  using V = v16f;
  static constexpr int L = 16;
  static V zero() { return V{}; }
  static V set1(float x) { return V{} + x; }
  static V load(const float* p) { V v; memcpy(&v, p, sizeof v); return v; }
  static void store(float* p, V v) { memcpy(p, &v, sizeof v); }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V vmax(V a, V b) { return a > b ? a : b; }
  static float hsum(V v) {
    float s = 0.0f;
    for (int i = 0; i < L; ++i) s += v[i];
    return s;
  }
  static float hmax(V v) {
    float m = v[0];
    for (int i = 1; i < L; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static void hsum8(const V* a, float* out) { for (int k = 0; k < 8; ++k) out[k] = hsum(a[k]); }
  template <int DT> static V load_kv(const uint16_t* p) {
    if (DT == 0) {
      v16h h;
      memcpy(&h, p, sizeof h);
      return (V)(__builtin_convertvector(h, v16u) << 16);
    }
    V v;
    for (int i = 0; i < L; ++i) v[i] = f16_bits_to_f32(p[i]);
    return v;
  }
  static void load_bf16_pair(const uint16_t* p, V& even, V& odd) {
    v16u x;
    memcpy(&x, p, sizeof x);
    even = (V)(x << 16);
    odd = (V)(x & 0xffff0000u);
  }
  static void store_bf16_pair(uint16_t* p, V even, V odd) {
    v16u e = (v16u)even, o = (v16u)odd;
    e = e + (0x7fffu + ((e >> 16) & 1u));
    o = o + (0x7fffu + ((o >> 16) & 1u));
    v16u r = (e >> 16) | (o & 0xffff0000u);
    memcpy(p, &r, sizeof r);
  }
  static void store_f16(uint16_t* p, V v) { for (int i = 0; i < L; ++i) p[i] = f32_to_f16_bits(v[i]); }
  static V exp(V x) {
    x = vmax(x, set1(-87.0f));
    x = x < 88.0f ? x : set1(88.0f);
    V n = x * 1.44269504088896341f;
    v16i ni = __builtin_convertvector(n + (n >= 0.0f ? set1(0.5f) : set1(-0.5f)), v16i);  // round
    V nf = __builtin_convertvector(ni, V);
    V r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    V p = set1(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + (r + 1.0f);
    return p * (V)((ni + 127) << 23);
  }
  static void prefetch(const void* p) { __builtin_prefetch(p); }
};
#else
struct Simd {  // portable scalar fallback (any architecture)
  using V = float;
  static constexpr int L = 1;
  static V zero() { return 0.0f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V vmax(V a, V b) { return a > b ? a : b; }
  static float hsum(V v) { return v; }
  static float hmax(V v) { return v; }
  static void hsum8(const V* a, float* out) { for (int k = 0; k < 8; ++k) out[k] = a[k]; }
  template <int DT> static V load_kv(const uint16_t* p) { return kv_to_f32<DT>(*p); }
  static void load_bf16_pair(const uint16_t* p, V& even, V& odd) {
    even = bf16_bits_to_f32(p[0]);
    odd = bf16_bits_to_f32(p[1]);
  }
  static void store_bf16_pair(uint16_t* p, V even, V odd) {
    p[0] = f32_to_bf16_bits(even);
    p[1] = f32_to_bf16_bits(odd);
  }
  static void store_f16(uint16_t* p, V v) { *p = f32_to_f16_bits(v); }
  static V exp(V x) { return expf(x < -87.0f ? -87.0f : x); }
  static void prefetch(const void* p) { __builtin_prefetch(p); }
};
#endif

}  // namespace
