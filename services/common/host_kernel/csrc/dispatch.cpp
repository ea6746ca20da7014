// ISA-neutral driver: argument checks, run-time ISA choice, split-K work planning over the thread pool,
// the log-sum-exp merge of partial results, the memory-bandwidth probe and the doorbell service loop.
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

#include "isa.h"
#include "neo_attn.h"
#include "pool.h"

namespace neo {
namespace {

const IsaKernels* pick_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && isa_avx512())
    return isa_avx512();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      isa_avx2())
    return isa_avx2();
#endif
  return isa_vec16();
}

std::atomic<const IsaKernels*> g_isa{nullptr};

const IsaKernels* named_isa(const char* name) {
  const IsaKernels* best = pick_isa();
  if (!strcmp(name, "avx512")) return best == isa_avx512() ? best : nullptr;
  if (!strcmp(name, "avx2")) return (best == isa_avx512() || best == isa_avx2()) ? isa_avx2() : nullptr;
  if (!strcmp(name, "vec16")) return isa_vec16();
  if (!strcmp(name, "generic")) return isa_generic();
  if (!strcmp(name, "auto")) return best;
  return nullptr;
}

// The best ISA of this CPU, unless NEO_CPU_ISA names another one it supports.
const IsaKernels& isa() {
  const IsaKernels* k = g_isa.load(std::memory_order_acquire);
  if (!k) {
    const char* env = getenv("NEO_CPU_ISA");
    k = env ? named_isa(env) : nullptr;
    if (!k) k = pick_isa();
    g_isa.store(k, std::memory_order_release);
  }
  return *k;
}

inline uint16_t f32_to_bits(float f, int dtype) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if (dtype == NEO_BF16) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
  }
  uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
  if (a < 0x38800000u) {
    if (a < 0x33000000u) return (uint16_t)sign;
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = a - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return (uint16_t)(sign | (r >> 13));
}

struct Job {
  KernelCtx ctx;
  const IsaKernels* k;
  const Chunk* chunks;
  int num_chunks;
  // merge phase: (b, h) pairs whose request was split, with their first part and part count
  const int32_t* merge_list;   // [n, 4]: b, h, first_part, nparts
  int num_merge;
  std::atomic<int> next{0};
};

void run_chunks(void* p, int, int) {
  Job& job = *static_cast<Job*>(p);
  for (;;) {
    int i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job.num_chunks) break;
    job.k->chunk(job.ctx, job.chunks[i]);
  }
}

void run_merge(void* p, int, int) {
  Job& job = *static_cast<Job*>(p);
  const KernelCtx& c = job.ctx;
  const int G = c.num_q_heads / c.num_kv_heads, D = c.head_dim;
  float acc[kMaxHeadDim];
  for (;;) {
    int i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job.num_merge) break;
    const int32_t* e = job.merge_list + 4 * i;
    const int b = e[0], h = e[1], first = e[2], np = e[3];
    for (int g = 0; g < G; ++g) {
      float M = -INFINITY;
      for (int k = 0; k < np; ++k) M = std::max(M, c.parts[((size_t)(first + k) * G + g) * (D + 2)]);
      float Lsum = 0.0f;
      for (int d = 0; d < D; ++d) acc[d] = 0.0f;
      for (int k = 0; k < np; ++k) {
        const float* pg = c.parts + ((size_t)(first + k) * G + g) * (D + 2);
        const float w = std::exp(pg[0] - M);
        Lsum += pg[1] * w;
        for (int d = 0; d < D; ++d) acc[d] += w * pg[2 + d];
      }
      const float inv = Lsum > 0.0f ? 1.0f / Lsum : 0.0f;
      uint16_t* out = c.o + ((size_t)b * c.num_q_heads + (size_t)h * G + g) * D;
      for (int d = 0; d < D; ++d) out[d] = f32_to_bits(acc[d] * inv, c.dtype);
    }
  }
}

// Scratch reused across calls (grow-only); guarded by pool_mutex().
struct Scratch {
  std::vector<Chunk> chunks;
  std::vector<int32_t> merge;
  std::vector<float> parts;
};
Scratch& scratch() {
  static Scratch s;
  return s;
}

// NEO_CPU_PREFETCH_BYTES: how much of the next block's K and V to prefetch when a block starts.
int prefetch_bytes() {
  static const int v = [] {
    const char* e = getenv("NEO_CPU_PREFETCH_BYTES");
    return e ? atoi(e) : 512;
  }();
  return v;
}

int check_args(const neo_attn_args* a) {
  if (!a || a->batch < 0 || a->num_kv_heads < 1 || a->num_q_heads < 1) return NEO_EINVAL;
  if (a->num_q_heads % a->num_kv_heads) return NEO_EINVAL;
  if (a->num_q_heads / a->num_kv_heads > kMaxGroup) return NEO_EINVAL;
  if (a->head_dim != 64 && a->head_dim != 128 && a->head_dim != 256) return NEO_EINVAL;
  if (a->block_size < 1 || a->block_size > kMaxBlock) return NEO_EINVAL;
  if (a->dtype != NEO_BF16 && a->dtype != NEO_F16) return NEO_EINVAL;
  if (a->batch == 0) return NEO_OK;
  if (!a->q || !a->o || !a->k_cache || !a->v_cache || !a->block_tables || !a->seq_lens) return NEO_EINVAL;
  if ((a->k_new == nullptr) != (a->v_new == nullptr)) return NEO_EINVAL;
  for (int b = 0; b < a->batch; ++b) {
    const int len = a->seq_lens[b];
    if (len < 1) return NEO_ESEQLEN;
    const int nb = (len + a->block_size - 1) / a->block_size;
    if (nb > a->bt_stride) return NEO_ESEQLEN;
    const int32_t* bt = a->block_tables + (size_t)b * a->bt_stride;
    for (int j = 0; j < nb; ++j)
      if (bt[j] < 0 || bt[j] >= a->num_blocks) return NEO_EBLOCK;
  }
  return NEO_OK;
}

void append_new(const neo_attn_args* a) {
  const size_t D = a->head_dim, bs = a->block_size, Hkv = a->num_kv_heads;
  for (int b = 0; b < a->batch; ++b) {
    const int pos = a->seq_lens[b] - 1;
    const int blk = a->block_tables[(size_t)b * a->bt_stride + pos / bs];
    const size_t slot = pos % bs;
    for (size_t h = 0; h < Hkv; ++h) {
      const size_t dst = (((size_t)blk * Hkv + h) * bs + slot) * D;
      const size_t src = ((size_t)b * Hkv + h) * D;
      memcpy((uint16_t*)a->k_cache + dst, (const uint16_t*)a->k_new + src, D * 2);
      memcpy((uint16_t*)a->v_cache + dst, (const uint16_t*)a->v_new + src, D * 2);
    }
  }
}

int attn_locked(const neo_attn_args* a) {
  int rc = check_args(a);
  if (rc != NEO_OK || a->batch == 0) return rc;
  if (a->k_new) append_new(a);  // B*Hkv rows of D: tiny next to the KV read

  ThreadPool& pool = global_pool();
  const int nt = pool.size();
  const int Hkv = a->num_kv_heads, G = a->num_q_heads / Hkv, bs = a->block_size, D = a->head_dim;
  int64_t total = 0;
  for (int b = 0; b < a->batch; ++b) total += (int64_t)((a->seq_lens[b] + bs - 1) / bs) * Hkv;
  // Chunk length in blocks: ~8 chunks per thread for balance, but >= 8 blocks so the merge stays cheap.
  int64_t chunk = nt == 1 ? (int64_t)1 << 30 : std::max<int64_t>(8, (total + 8 * nt - 1) / (8 * nt));

  Scratch& s = scratch();
  s.chunks.clear();
  s.merge.clear();
  int parts = 0;
  for (int b = 0; b < a->batch; ++b) {
    const int nb = (a->seq_lens[b] + bs - 1) / bs;
    const int nc = (int)((nb + chunk - 1) / chunk);
    for (int h = 0; h < Hkv; ++h) {
      if (nc == 1) {
        s.chunks.push_back(Chunk{b, h, 0, nb, -1});
        continue;
      }
      s.merge.insert(s.merge.end(), {b, h, parts, nc});
      for (int c = 0; c < nc; ++c) {
        const int j0 = (int)(c * chunk), j1 = (int)std::min<int64_t>(nb, (c + 1) * chunk);
        s.chunks.push_back(Chunk{b, h, j0, j1, parts++});
      }
    }
  }
  const size_t need = (size_t)parts * G * (D + 2);
  if (s.parts.size() < need) s.parts.resize(need);

  Job job;
  job.ctx = KernelCtx{(const uint16_t*)a->q, (uint16_t*)a->o, (const uint16_t*)a->k_cache,
                      (const uint16_t*)a->v_cache, a->block_tables, a->seq_lens, a->num_q_heads,
                      Hkv, D, bs, a->bt_stride, a->dtype, a->scale, s.parts.data(), prefetch_bytes()};
  job.k = &isa();
  job.chunks = s.chunks.data();
  job.num_chunks = (int)s.chunks.size();
  job.merge_list = s.merge.data();
  job.num_merge = (int)(s.merge.size() / 4);
  pool.run(run_chunks, &job);
  if (job.num_merge) {
    job.next.store(0, std::memory_order_relaxed);
    pool.run(run_merge, &job);
  }
  return NEO_OK;
}

inline int64_t now_us() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

struct ReadJob {
  float* buf;
  size_t n;
  const IsaKernels* k;
  bool init;
  float sink[256];
};

void run_read(void* p, int tid, int nt) {
  ReadJob& j = *static_cast<ReadJob*>(p);
  const size_t per = (j.n / nt + 15) & ~(size_t)15;
  const size_t lo = std::min(j.n, per * tid), hi = std::min(j.n, lo + per);
  if (j.init) {
    for (size_t i = lo; i < hi; ++i) j.buf[i] = 1.0f;
  } else {
    j.sink[tid & 255] = j.k->read_sum(j.buf + lo, hi - lo);
  }
}

}  // namespace
}  // namespace neo

using namespace neo;

extern "C" {

int neo_attn_decode(const neo_attn_args* a) {
  std::lock_guard<std::mutex> lock(pool_mutex());
  return attn_locked(a);
}

void neo_set_num_threads(int n) {
  if (n > 0) resize_global_pool(n);
}

int neo_get_num_threads(void) {
  std::lock_guard<std::mutex> lock(pool_mutex());
  return global_pool().size();
}

void neo_set_spin_us(int us) { ThreadPool::spin_us.store(us < 0 ? 0 : us); }

const char* neo_isa_name(void) { return isa().name; }

int neo_force_isa(const char* name) {
  const IsaKernels* k = named_isa(name);
  if (!k) return -1;
  g_isa.store(k, std::memory_order_release);
  return 0;
}

double neo_measure_read_gbps(size_t size_bytes, int reps) { return neo_measure_read(size_bytes, reps, nullptr); }

double neo_measure_read(size_t size_bytes, int reps, double* cpu_gbps) {
  std::lock_guard<std::mutex> lock(pool_mutex());
  ThreadPool& pool = global_pool();
  ReadJob job;
  job.n = size_bytes / sizeof(float);
  void* mem = nullptr;
  if (posix_memalign(&mem, 2 << 20, job.n * sizeof(float)) != 0) return -1.0;
  job.buf = (float*)mem;
  job.k = &isa();
  job.init = true;
  pool.run(run_read, &job);  // first touch by the threads that read it
  job.init = false;
  double best = 0.0, best_cpu = 0.0;
  for (int r = 0; r < std::max(1, reps); ++r) {
    timespec t0, t1, c0, c1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pool.run(run_read, &job);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    const double c = ((c1.tv_sec - c0.tv_sec) + 1e-9 * (c1.tv_nsec - c0.tv_nsec)) / pool.size();
    best = std::max(best, job.n * sizeof(float) / s / 1e9);
    if (c > 0) best_cpu = std::max(best_cpu, job.n * sizeof(float) / c / 1e9);
  }
  if (cpu_gbps) *cpu_gbps = best_cpu;
  free(mem);
  return best;
}

void neo_store_u64(uint64_t* addr, uint64_t value) { __atomic_store_n(addr, value, __ATOMIC_RELEASE); }

uint64_t neo_load_u64(const uint64_t* addr) { return __atomic_load_n(addr, __ATOMIC_ACQUIRE); }

uint64_t neo_wait_u64(const uint64_t* addr, uint64_t target, int64_t spin_us, int64_t timeout_us,
                      const uint64_t* abort_word, uint64_t abort_at, int* timed_out) {
  if (timed_out) *timed_out = 0;
  const int64_t t0 = now_us();
  uint64_t v;
  int spins = 0;
  int64_t sleep_ns = 2000;
  for (;;) {
    v = __atomic_load_n(addr, __ATOMIC_ACQUIRE);
    if (v >= target) return v;
    if (abort_word && __atomic_load_n(abort_word, __ATOMIC_ACQUIRE) >= abort_at) {
      if (timed_out) *timed_out = 2;
      return v;
    }
    if (++spins < 256) {
      cpu_relax();
      continue;
    }
    spins = 0;
    const int64_t el = now_us() - t0;
    if (timeout_us >= 0 && el > timeout_us) {
      if (timed_out) *timed_out = 1;
      return 0;
    }
    if (el > spin_us) {  // past the spin budget: poll with sleeps growing to 50 us
      timespec ts{0, sleep_ns};
      nanosleep(&ts, nullptr);
      sleep_ns = std::min<int64_t>(sleep_ns * 2, 50000);
    }
  }
}

int neo_serve_iteration(neo_serve_args* s, int32_t* failed_layer) {
  if (failed_layer) *failed_layer = -1;
  if (s) s->busy_ns = 0;
  if (!s || s->num_slots < 0 || s->num_slots > 4 || s->num_layers < 1 || s->num_layers > 65534) return NEO_EINVAL;
  const size_t layer_bytes =
      (size_t)s->num_blocks * s->num_kv_heads * s->block_size * s->head_dim * 2;
  int next_layer[4] = {0, 0, 0, 0};
  int remaining = 0;
  for (int i = 0; i < s->num_slots; ++i) {
    next_layer[i] = s->slots[i].rows > 0 ? std::max(0, std::min(s->slots[i].next_layer, s->num_layers))
                                         : s->num_layers;
    remaining += s->num_layers - next_layer[i];
  }
  struct Save {  // report progress back however we leave
    neo_serve_args* s;
    int* nl;
    ~Save() { for (int i = 0; i < s->num_slots; ++i) s->slots[i].next_layer = nl[i]; }
  } save{s, next_layer};
  const uint64_t last_seq = neo_job_seq(s->iteration_id, (uint32_t)(s->num_layers - 1));
  int64_t t_last = now_us();  // last progress: spin and timeout budgets count from here
  int64_t sleep_ns = 2000;
  int spins = 0;
  int rc_all = NEO_OK;
  while (remaining > 0) {
    bool progressed = false;
    for (int i = 0; i < s->num_slots; ++i) {
      const neo_slot_desc& sl = s->slots[i];
      if (next_layer[i] >= s->num_layers) continue;
      const uint64_t seq = neo_job_seq(s->iteration_id, (uint32_t)next_layer[i]);
      if (__atomic_load_n(sl.req_seq, __ATOMIC_ACQUIRE) < seq) continue;
      const int layer = next_layer[i];
      neo_attn_args a;
      a.q = sl.q;
      a.k_new = sl.k_new;
      a.v_new = sl.v_new;
      a.o = sl.o;
      a.k_cache = s->k_pool + layer * layer_bytes;
      a.v_cache = s->v_pool + layer * layer_bytes;
      a.block_tables = sl.block_tables;
      a.seq_lens = sl.seq_lens;
      a.batch = sl.rows;
      a.num_q_heads = s->num_q_heads;
      a.num_kv_heads = s->num_kv_heads;
      a.head_dim = s->head_dim;
      a.block_size = s->block_size;
      a.bt_stride = sl.bt_stride;
      a.num_blocks = s->num_blocks;
      a.dtype = s->dtype;
      a.scale = s->scale;
      int rc;
      const int64_t t_job = now_ns();
      {
        std::lock_guard<std::mutex> lock(pool_mutex());
        rc = attn_locked(&a);
      }
      s->busy_ns += now_ns() - t_job;
      __atomic_store_n(sl.status, (int64_t)rc, __ATOMIC_RELEASE);
      if (rc != NEO_OK) {
        // Mark every remaining job of this slot done (with the error) so the peer never waits.
        __atomic_store_n(sl.done_seq, last_seq, __ATOMIC_RELEASE);
        if (failed_layer && *failed_layer < 0) *failed_layer = layer;
        if (rc_all == NEO_OK) rc_all = rc;
        remaining -= s->num_layers - layer;
        next_layer[i] = s->num_layers;
      } else {
        __atomic_store_n(sl.done_seq, seq, __ATOMIC_RELEASE);
        ++next_layer[i];
        --remaining;
      }
      progressed = true;
    }
    if (progressed) {
      sleep_ns = 2000;
      spins = 0;
      t_last = now_us();
      continue;
    }
    // Nothing ready: spin, then sleep-poll; stop on abort or timeout.
    if (s->abort_word) {
      uint64_t ab = __atomic_load_n(s->abort_word, __ATOMIC_ACQUIRE);
      if (ab != 0 && (ab >> 16) >= s->iteration_id) return rc_all != NEO_OK ? rc_all : NEO_EABORT;
    }
    if (++spins < 256) {
      cpu_relax();
      continue;
    }
    spins = 0;
    const int64_t el = now_us() - t_last;
    if (s->timeout_us >= 0 && el > s->timeout_us) return rc_all != NEO_OK ? rc_all : NEO_ETIMEOUT;
    if (el > s->spin_us) {
      timespec ts{0, sleep_ns};
      nanosleep(&ts, nullptr);
      sleep_ns = std::min<int64_t>(sleep_ns * 2, 50000);
    }
  }
  return rc_all;
}

}  // extern "C"

namespace neo {
// Called once by the binding at import: size the pool from this process's affinity mask.
int init_default_threads() {
  int n = default_threads();
  resize_global_pool(n);
  return n;
}
}  // namespace neo
