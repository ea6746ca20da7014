// pybind11 module `neo_common.host_kernel._native`: thin wrappers over the C ABI in neo_attn.h.
// Buffers travel as integer addresses; the Python layer (kernel.py, segment.py) validates shapes and
// keeps the owning arrays alive. Every call that can take long releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "neo_attn.h"

namespace py = pybind11;

namespace neo {
int init_default_threads();
}

template <class T>
static T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

static int attend_raw(uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t o, uintptr_t k_cache,
                      uintptr_t v_cache, uintptr_t block_tables, uintptr_t seq_lens, int batch, int hq,
                      int hkv, int head_dim, int block_size, int bt_stride, int num_blocks, int dtype,
                      float scale) {
  neo_attn_args a;
  a.q = ptr<const void>(q);
  a.k_new = ptr<const void>(k_new);
  a.v_new = ptr<const void>(v_new);
  a.o = ptr<void>(o);
  a.k_cache = ptr<void>(k_cache);
  a.v_cache = ptr<void>(v_cache);
  a.block_tables = ptr<const int32_t>(block_tables);
  a.seq_lens = ptr<const int32_t>(seq_lens);
  a.batch = batch;
  a.num_q_heads = hq;
  a.num_kv_heads = hkv;
  a.head_dim = head_dim;
  a.block_size = block_size;
  a.bt_stride = bt_stride;
  a.num_blocks = num_blocks;
  a.dtype = dtype;
  a.scale = scale;
  return neo_attn_decode(&a);
}

// slot tuple: (req_addr, done_addr, status_addr, q, k_new, v_new, o, rows, seq_lens_addr, bt_addr,
//              bt_stride, next_layer)
using SlotTuple = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int,
                             uintptr_t, uintptr_t, int, int>;

// Returns (status, failed_layer, next_layer per slot, nanoseconds spent in the kernel).
static std::tuple<int, int, std::vector<int>, int64_t> serve_iteration(uintptr_t k_pool, uintptr_t v_pool, uintptr_t abort_word,
                                           int num_layers, int num_blocks, int hq, int hkv, int head_dim,
                                           int block_size, int dtype, float scale, uint64_t iteration_id,
                                           const std::vector<SlotTuple>& slots, int64_t spin_us,
                                           int64_t timeout_us) {
  if (slots.size() > 4) throw std::invalid_argument("at most 4 slots");
  neo_serve_args s{};
  s.k_pool = ptr<uint8_t>(k_pool);
  s.v_pool = ptr<uint8_t>(v_pool);
  s.abort_word = ptr<const uint64_t>(abort_word);
  s.num_layers = num_layers;
  s.num_blocks = num_blocks;
  s.num_q_heads = hq;
  s.num_kv_heads = hkv;
  s.head_dim = head_dim;
  s.block_size = block_size;
  s.dtype = dtype;
  s.scale = scale;
  s.num_slots = (int32_t)slots.size();
  for (size_t i = 0; i < slots.size(); ++i) {
    const SlotTuple& t = slots[i];
    neo_slot_desc& d = s.slots[i];
    d.req_seq = ptr<uint64_t>(std::get<0>(t));
    d.done_seq = ptr<uint64_t>(std::get<1>(t));
    d.status = ptr<int64_t>(std::get<2>(t));
    d.q = ptr<void>(std::get<3>(t));
    d.k_new = ptr<void>(std::get<4>(t));
    d.v_new = ptr<void>(std::get<5>(t));
    d.o = ptr<void>(std::get<6>(t));
    d.rows = std::get<7>(t);
    d.seq_lens = ptr<const int32_t>(std::get<8>(t));
    d.block_tables = ptr<const int32_t>(std::get<9>(t));
    d.bt_stride = std::get<10>(t);
    d.next_layer = std::get<11>(t);
  }
  s.iteration_id = iteration_id;
  s.spin_us = spin_us;
  s.timeout_us = timeout_us;
  int32_t failed = -1;
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = neo_serve_iteration(&s, &failed);
  }
  std::vector<int> next;
  for (size_t i = 0; i < slots.size(); ++i) next.push_back(s.slots[i].next_layer);
  return {rc, failed, next, s.busy_ns};
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "NEO CPU decode-attention kernel (C ABI wrappers)";
  neo::init_default_threads();
  m.def("attend_raw", &attend_raw, py::call_guard<py::gil_scoped_release>());
  m.def("set_num_threads", &neo_set_num_threads, py::call_guard<py::gil_scoped_release>());
  m.def("get_num_threads", &neo_get_num_threads);
  m.def("set_spin_us", &neo_set_spin_us);
  m.def("isa_name", &neo_isa_name);
  m.def("force_isa", [](const std::string& n) { return neo_force_isa(n.c_str()); });
  m.def("measure_read_gbps", &neo_measure_read_gbps, py::call_guard<py::gil_scoped_release>());
  m.def("measure_read", [](size_t size, int reps) {  // (wall GB/s, CPU-time-normalized GB/s)
    double cpu = 0.0, wall;
    {
      py::gil_scoped_release nogil;
      wall = neo_measure_read(size, reps, &cpu);
    }
    return std::make_pair(wall, cpu);
  });
  m.def("store_u64", [](uintptr_t a, uint64_t v) { neo_store_u64(ptr<uint64_t>(a), v); });
  m.def("load_u64", [](uintptr_t a) { return neo_load_u64(ptr<const uint64_t>(a)); });
  m.def(
      "wait_u64",
      [](uintptr_t a, uint64_t target, int64_t spin_us, int64_t timeout_us, uintptr_t abort_word,
         uint64_t abort_at) {
        int flag = 0;
        uint64_t v;
        {
          py::gil_scoped_release nogil;
          v = neo_wait_u64(ptr<const uint64_t>(a), target, spin_us, timeout_us,
                           ptr<const uint64_t>(abort_word), abort_at, &flag);
        }
        return std::make_pair(v, flag);
      },
      py::arg("addr"), py::arg("target"), py::arg("spin_us"), py::arg("timeout_us"),
      py::arg("abort_word") = 0, py::arg("abort_at") = 0);
  m.def("serve_iteration", &serve_iteration);
  m.def("job_seq", [](uint64_t it, uint32_t layer) { return neo_job_seq(it, layer); });
}
