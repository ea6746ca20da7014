// AVX2 + FMA + F16C build of the quantized dense kernel (Haswell / Zen and later).
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "qd_impl.h"

namespace neo_qd {
namespace {

struct Avx2 {
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(V v) {   // ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }

  template <int FMT>
  static void dequant(const uint8_t* blk, V out[4]) {
    const V d = _mm256_set1_ps(_cvtsh_ss(load_u16(blk)));
    if constexpr (FMT == kQ8_0) {
      for (int i = 0; i < 4; ++i) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * i));
        out[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
      }
    } else {
      constexpr int off = FMT == kQ4_1 ? 4 : 2;
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + off));
      const __m128i mask = _mm_set1_epi8(0x0f);
      const __m128i lo = _mm_and_si128(packed, mask);                      // values 0..15
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);   // values 16..31
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int i = 0; i < 4; ++i) {
        __m256i q = _mm256_cvtepu8_epi32(parts[i]);
        if constexpr (FMT == kQ4_0) {
          q = _mm256_sub_epi32(q, _mm256_set1_epi32(8));
          out[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
        } else {   // d * q, rounded, then + m, rounded (-ffp-contract=off keeps them apart)
          const V m = _mm256_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
          out[i] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), m);
        }
      }
    }
  }
};

const IsaKernels kAvx2 = {"avx2", &Kernel<Avx2>::columns, &Kernel<Avx2>::rows};

}  // namespace

const IsaKernels* isa_avx2() { return &kAvx2; }

}  // namespace neo_qd
#else
#include "quant_dense.h"
namespace neo_qd { const IsaKernels* isa_avx2() { return nullptr; } }
#endif
