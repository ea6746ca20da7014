// Portable scalar build of the quantized dense kernel: eight lanes emulated with std::fma in the
// AVX2 build's order, so it computes the same bits (on any CPU; slowly where fma is not in hardware).
#include <cmath>

#include "qd_impl.h"

namespace neo_qd {
namespace {

float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0 && man == 0) {
    bits = sign;
  } else if (exp == 0) {   // subnormal: normalise the mantissa
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

struct Generic {
  struct V {
    float l[8];
  };
  static V zero() { return V{}; }
  static V load(const float* p) {
    V v;
    memcpy(v.l, p, sizeof(v.l));
    return v;
  }
  static void store(float* p, const V& v) { memcpy(p, v.l, sizeof(v.l)); }
  static V fma(const V& a, const V& b, const V& c) {
    V r;
    for (int i = 0; i < 8; ++i) r.l[i] = std::fma(a.l[i], b.l[i], c.l[i]);
    return r;
  }
  static float hsum(const V& v) {
    float s[4];
    for (int i = 0; i < 4; ++i) s[i] = v.l[i] + v.l[i + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
  }

  template <int FMT>
  static void dequant(const uint8_t* blk, V out[4]) {
    const float d = half_to_float(load_u16(blk));
    float o[32];
    if constexpr (FMT == kQ8_0) {
      for (int j = 0; j < 32; ++j) o[j] = d * (float)(int8_t)blk[2 + j];
    } else {
      constexpr int off = FMT == kQ4_1 ? 4 : 2;
      const float m = FMT == kQ4_1 ? half_to_float(load_u16(blk + 2)) : 0.0f;
      for (int j = 0; j < 32; ++j) {
        const int q = j < 16 ? (blk[off + j] & 0x0f) : (blk[off + j - 16] >> 4);
        if constexpr (FMT == kQ4_0) {
          o[j] = d * (float)(q - 8);
        } else {
          const float dq = d * (float)q;
          o[j] = dq + m;
        }
      }
    }
    for (int i = 0; i < 4; ++i) memcpy(out[i].l, o + 8 * i, sizeof(out[i].l));
  }
};

const IsaKernels kGeneric = {"generic", &Kernel<Generic>::columns, &Kernel<Generic>::rows};

}  // namespace

const IsaKernels* isa_generic() { return &kGeneric; }

}  // namespace neo_qd
