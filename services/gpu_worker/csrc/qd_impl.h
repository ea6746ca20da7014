// The quantized dense kernel over an 8-float vector policy `S` (qd_avx2.cpp, qd_generic.cpp).
//
// S provides: V, zero(), load(const float*), store(float*, V), fma(a, b, c) = a * b + c with one
// rounding, hsum(V) in the tree of quant_dense.h, and dequant<FMT>(block, V out[4]) (values 0..31).
//
// Two schedules compute identical bits (each output's accumulator sees the same operands in the same
// order):
// - one row (decode): blocks are dequantized into registers and multiplied at once, kRowTile weight
//   rows at a time (independent accumulators hide the FMA latency); W is streamed once.
// - several rows: a tile of kColTile weight rows x kChunk values is dequantized once into an L1
//   buffer, then every activation row (kRowGroup at a time, accumulators in registers) reads it, so
//   the dequantization is paid once per tile, not once per row.
#pragma once
#include <string.h>

#include <algorithm>

#include "quant_dense.h"

namespace neo_qd {

constexpr int kRowTile = 4;      // weight rows per one-row step
constexpr int kColTile = 3;      // weight rows per buffered tile
constexpr int kRowGroup = 3;     // activation rows per micro-kernel call: 3 x 3 accumulators, 3 weight
                                 // vectors, an activation vector (4 x 3 or 3 x 4 spill out of 16 registers)
constexpr int kChunk = 512;      // values of K per buffered tile (3 x 512 floats: 6 KiB)
constexpr int kRowsPerPass = 64; // activation rows per pass over W (accumulators: 4 x 64 x 8 floats)

template <class S>
struct Kernel {
  using V = typename S::V;

  template <int FMT, int NR>
  static void one_row(const Problem& p, int64_t n) {
    constexpr int BB = block_bytes(FMT);
    const int64_t nb = p.k / kBlock;
    const uint8_t* w = p.w + n * nb * BB;
    V acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = S::zero();
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = p.x + b * kBlock;
      V xv[4] = {S::load(x), S::load(x + 8), S::load(x + 16), S::load(x + 24)};
      for (int r = 0; r < NR; ++r) {
        V wv[4];
        S::template dequant<FMT>(w + (r * nb + b) * BB, wv);
        for (int i = 0; i < 4; ++i) acc[r] = S::fma(wv[i], xv[i], acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) p.y[n + r] = S::hsum(acc[r]) + (p.bias ? p.bias[n + r] : 0.0f);
  }

  // acc[r][i] (8 floats each, rows of the pass) += wbuf[r][0..kc) . x[i][0..kc)
  template <int NR, int MR>
  static void micro(const float* wbuf, int kc, const float* x, int64_t ldx, float* acc, int mstride) {
    V a[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MR; ++i) a[r][i] = S::load(acc + (r * mstride + i) * 8);
    for (int k = 0; k < kc; k += 8) {
      V wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = S::load(wbuf + r * kChunk + k);
      for (int i = 0; i < MR; ++i) {
        const V xv = S::load(x + i * ldx + k);
        for (int r = 0; r < NR; ++r) a[r][i] = S::fma(wv[r], xv, a[r][i]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MR; ++i) S::store(acc + (r * mstride + i) * 8, a[r][i]);
  }

  template <int NR>
  static void micro_rows(const float* wbuf, int kc, const float* x, int64_t ldx, float* acc, int mc) {
    int i = 0;
    for (; i + kRowGroup <= mc; i += kRowGroup) micro<NR, kRowGroup>(wbuf, kc, x + i * ldx, ldx, acc + i * 8, kRowsPerPass);
    switch (mc - i) {
      case 2: micro<NR, 2>(wbuf, kc, x + i * ldx, ldx, acc + i * 8, kRowsPerPass); break;
      case 1: micro<NR, 1>(wbuf, kc, x + i * ldx, ldx, acc + i * 8, kRowsPerPass); break;
    }
  }

  template <int FMT>
  static void many_rows(const Problem& p, int64_t n0, int64_t n1) {
    constexpr int BB = block_bytes(FMT);
    const int64_t nb = p.k / kBlock;
    alignas(64) float wbuf[kColTile * kChunk];
    alignas(64) float acc[kColTile * kRowsPerPass * 8];
    for (int64_t m0 = 0; m0 < p.m; m0 += kRowsPerPass) {
      const int mc = (int)std::min<int64_t>(kRowsPerPass, p.m - m0);
      for (int64_t n = n0; n < n1; n += kColTile) {
        const int nr = (int)std::min<int64_t>(kColTile, n1 - n);
        memset(acc, 0, sizeof(acc));
        for (int64_t k0 = 0; k0 < p.k; k0 += kChunk) {
          const int kc = (int)std::min<int64_t>(kChunk, p.k - k0);
          for (int r = 0; r < nr; ++r) {
            const uint8_t* w = p.w + ((n + r) * nb + k0 / kBlock) * BB;
            for (int b = 0; b < kc / kBlock; ++b) {
              V wv[4];
              S::template dequant<FMT>(w + b * BB, wv);
              for (int i = 0; i < 4; ++i) S::store(wbuf + r * kChunk + b * kBlock + i * 8, wv[i]);
            }
          }
          const float* x = p.x + m0 * p.ldx + k0;
          switch (nr) {
            case 3: micro_rows<3>(wbuf, kc, x, p.ldx, acc, mc); break;
            case 2: micro_rows<2>(wbuf, kc, x, p.ldx, acc, mc); break;
            default: micro_rows<1>(wbuf, kc, x, p.ldx, acc, mc); break;
          }
        }
        for (int r = 0; r < nr; ++r) {
          const float b = p.bias ? p.bias[n + r] : 0.0f;
          for (int i = 0; i < mc; ++i)
            p.y[(m0 + i) * p.ldy + n + r] = S::hsum(S::load(acc + (r * kRowsPerPass + i) * 8)) + b;
        }
      }
    }
  }

  template <int FMT>
  static void columns_fmt(const Problem& p, int64_t n0, int64_t n1) {
    if (p.m != 1) return many_rows<FMT>(p, n0, n1);
    int64_t n = n0;
    for (; n + kRowTile <= n1; n += kRowTile) one_row<FMT, kRowTile>(p, n);
    for (; n < n1; ++n) one_row<FMT, 1>(p, n);
  }

  static void columns(const Problem& p, int64_t n0, int64_t n1) {
    switch (p.fmt) {
      case kQ4_0: return columns_fmt<kQ4_0>(p, n0, n1);
      case kQ4_1: return columns_fmt<kQ4_1>(p, n0, n1);
      case kQ8_0: return columns_fmt<kQ8_0>(p, n0, n1);
    }
  }

  template <int FMT>
  static void rows_fmt(const uint8_t* w, int64_t k, const int64_t* ids, int64_t count, float* out) {
    constexpr int BB = block_bytes(FMT);
    const int64_t nb = k / kBlock;
    for (int64_t i = 0; i < count; ++i) {
      const uint8_t* row = w + ids[i] * nb * BB;
      for (int64_t b = 0; b < nb; ++b) {
        V wv[4];
        S::template dequant<FMT>(row + b * BB, wv);
        for (int j = 0; j < 4; ++j) S::store(out + i * k + b * kBlock + j * 8, wv[j]);
      }
    }
  }

  static void rows(int32_t fmt, const uint8_t* w, int64_t k, const int64_t* ids, int64_t count, float* out) {
    switch (fmt) {
      case kQ4_0: return rows_fmt<kQ4_0>(w, k, ids, count, out);
      case kQ4_1: return rows_fmt<kQ4_1>(w, k, ids, count, out);
      case kQ8_0: return rows_fmt<kQ8_0>(w, k, ids, count, out);
    }
  }
};

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}

}  // namespace neo_qd
