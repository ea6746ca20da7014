#include "qd_pool.h"

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace neo_qd {
namespace {

struct Job {
  TileFn fn;
  const void* ctx;
  int64_t tiles, grain;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> active{0};   // threads still allowed in: the caller's count, the caller first
};

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

// Claims and runs chunks until none is left.
void work(Job& j) {
  for (;;) {
    const int64_t t0 = j.next.fetch_add(j.grain, std::memory_order_relaxed);
    if (t0 >= j.tiles) return;
    const int64_t t1 = std::min(j.tiles, t0 + j.grain);
    j.fn(j.ctx, t0, t1);
    j.done.fetch_add(t1 - t0, std::memory_order_release);
  }
}

class Pool {
 public:
  ~Pool() {
    stop_.store(true);
    gen_.fetch_add(1);
    gen_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(int threads, TileFn fn, const void* ctx, int64_t tiles) {
    std::lock_guard<std::mutex> lock(mutex_);
    while ((int)threads_.size() < threads - 1) threads_.emplace_back([this] { loop(); });
    auto job = std::make_shared<Job>();
    job->fn = fn;
    job->ctx = ctx;
    job->tiles = tiles;
    job->grain = std::max<int64_t>(1, tiles / (4 * (int64_t)threads));
    job->active = threads;   // workers beyond the count asked for stay out
    std::atomic_store(&job_, job);
    gen_.fetch_add(1, std::memory_order_release);
    gen_.notify_all();
    work(*job);
    // the others' claimed chunks; yield rather than spin, as a claimer may be waiting for this core
    for (int spins = 0; job->done.load(std::memory_order_acquire) != tiles; ++spins) {
      if (spins < 2000) relax(); else sched_yield();
    }
    std::atomic_store(&job_, std::shared_ptr<Job>());
  }

  std::atomic<int64_t> spin_us{50};

 private:
  void loop() {
    uint32_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      const int64_t deadline = now_ns() + spin_us.load(std::memory_order_relaxed) * 1000;
      int spins = 0;
      uint32_t g;
      while ((g = gen_.load(std::memory_order_acquire)) == seen) {
        relax();
        if (++spins == 64) {
          spins = 0;
          if (now_ns() > deadline) gen_.wait(seen, std::memory_order_acquire);
        }
      }
      seen = g;
      if (stop_.load()) return;
      std::shared_ptr<Job> job = std::atomic_load(&job_);
      if (job && job->active.fetch_sub(1) > 1) work(*job);
    }
  }

  std::mutex mutex_;
  std::vector<std::thread> threads_;
  std::atomic<uint32_t> gen_{0};
  std::atomic<bool> stop_{false};
  std::shared_ptr<Job> job_;
};

Pool& pool() {
  static Pool p;
  return p;
}

}  // namespace

void run_tiles(int threads, TileFn fn, const void* ctx, int64_t tiles) {
  if (threads <= 1 || tiles < 2) return fn(ctx, 0, tiles);
  pool().run(threads, fn, ctx, tiles);
}

void set_spin_us(int64_t us) { pool().spin_us.store(us); }

}  // namespace neo_qd
