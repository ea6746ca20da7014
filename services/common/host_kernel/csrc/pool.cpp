#include "pool.h"

#include <time.h>

#include <memory>

namespace neo {

std::atomic<int64_t> ThreadPool::spin_us{100};

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

static inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

ThreadPool::ThreadPool(int n) : n_(n < 1 ? 1 : n) {
  for (int t = 1; t < n_; ++t) threads_.emplace_back([this, t] { worker(t); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  for (auto& th : threads_) th.join();
}

void ThreadPool::worker(int tid) {
  // Jobs are counted from 0 at construction: a worker that starts late must still see the first
  // job (or the stop) that the constructor's caller may already have posted.
  uint32_t seen = 0;
  for (;;) {
    uint32_t g = generation_.load(std::memory_order_acquire);
    if (g == seen) {
      const int64_t deadline = now_ns() + spin_us.load(std::memory_order_relaxed) * 1000;
      int spins = 0;
      while ((g = generation_.load(std::memory_order_acquire)) == seen) {
        cpu_relax();
        if (++spins == 64) {
          spins = 0;
          if (now_ns() > deadline) {
            generation_.wait(seen, std::memory_order_acquire);
          }
        }
      }
    }
    seen = g;
    if (stop_.load(std::memory_order_acquire)) return;
    fn_(ctx_, tid, n_);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(Fn fn, void* ctx) {
  if (n_ == 1) {
    fn(ctx, 0, 1);
    return;
  }
  fn_ = fn;
  ctx_ = ctx;
  pending_.store(n_ - 1, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  fn(ctx, 0, n_);
  while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
}

static std::unique_ptr<ThreadPool>& pool_ptr() {
  static std::unique_ptr<ThreadPool> p;
  return p;
}

std::mutex& pool_mutex() {
  static std::mutex m;
  return m;
}

ThreadPool& global_pool() {
  auto& p = pool_ptr();
  if (!p) {
    unsigned hc = std::thread::hardware_concurrency();
    p.reset(new ThreadPool(hc ? (int)hc : 1));
  }
  return *p;
}

void resize_global_pool(int n) {
  std::lock_guard<std::mutex> lock(pool_mutex());
  auto& p = pool_ptr();
  if (p && p->size() == n) return;
  p.reset();
  p.reset(new ThreadPool(n));
}

}  // namespace neo
