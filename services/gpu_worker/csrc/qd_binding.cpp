// pybind11 module `neo_gpu_worker._quant_dense`: the run-time ISA choice, the split of N over the
// threads (qd_pool.h) and thin wrappers taking
// buffers as integer addresses (quant_dense.py checks shapes, dtypes and keeps the tensors alive).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>

#include "qd_pool.h"
#include "quant_dense.h"

namespace py = pybind11;

namespace neo_qd {
namespace {

enum Isa : int { kAuto = 0, kGeneric = 1, kAvx2 = 2 };

const IsaKernels* best_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      isa_avx2())
    return isa_avx2();
#endif
  return isa_generic();
}

const IsaKernels* pick(int isa) {
  static const IsaKernels* best = best_isa();
  if (isa == kGeneric) return isa_generic();
  if (isa == kAvx2) {
    if (best != isa_avx2()) throw std::invalid_argument("this CPU or build has no AVX2 + FMA + F16C kernel");
    return best;
  }
  return best;
}

constexpr int64_t kTile = 4;   // N is split in tiles of this many rows (the kernels' tile)

struct Job {
  const IsaKernels* k;
  Problem p;
};

void run_part(const void* ctx, int64_t t0, int64_t t1) {
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t n0 = t0 * kTile, n1 = std::min(j.p.n, t1 * kTile);
  if (n0 < n1) j.k->columns(j.p, n0, n1);
}

void matmul(int fmt, uintptr_t w, int64_t n, int64_t k, uintptr_t x, int64_t m, int64_t ldx, uintptr_t y,
            int64_t ldy, uintptr_t bias, int threads, int isa) {
  if (!block_bytes(fmt)) throw std::invalid_argument("unsupported block format " + std::to_string(fmt));
  if (k % kBlock) throw std::invalid_argument("K must be a multiple of 32");
  const Job job{pick(isa), Problem{fmt, reinterpret_cast<const uint8_t*>(w), n, k, reinterpret_cast<const float*>(x),
                                   m, ldx, reinterpret_cast<float*>(y), ldy, reinterpret_cast<const float*>(bias)}};
  if (m == 0 || n == 0) return;
  const int64_t tiles = (n + kTile - 1) / kTile;
  // a small problem is not worth waking the workers for
  run_tiles(tiles < 8 * (int64_t)threads ? 1 : threads, &run_part, &job, tiles);
}

void rows(int fmt, uintptr_t w, int64_t k, uintptr_t ids, int64_t count, uintptr_t out, int isa) {
  if (!block_bytes(fmt)) throw std::invalid_argument("unsupported block format " + std::to_string(fmt));
  if (k % kBlock) throw std::invalid_argument("K must be a multiple of 32");
  pick(isa)->rows(fmt, reinterpret_cast<const uint8_t*>(w), k, reinterpret_cast<const int64_t*>(ids), count,
                  reinterpret_cast<float*>(out));
}

}  // namespace
}  // namespace neo_qd

PYBIND11_MODULE(_quant_dense, m) {
  m.doc() = "y = x @ W.T over GGUF block-quantized W (Q4_0, Q4_1, Q8_0), batch- and thread-invariant";
  m.def("matmul", &neo_qd::matmul, py::call_guard<py::gil_scoped_release>());
  m.def("rows", &neo_qd::rows, py::call_guard<py::gil_scoped_release>());
  m.def("isa_name", [](int isa) { return std::string(neo_qd::pick(isa)->name); }, py::arg("isa") = 0);
  m.def("set_spin_us", &neo_qd::set_spin_us);
}
