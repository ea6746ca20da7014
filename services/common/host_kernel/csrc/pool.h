// A persistent fork-join thread pool: the caller is thread 0, workers 1..n-1 wait for the next job by
// spinning (spin_us) and then sleeping on a futex, so back-to-back layers pay no wake-up latency while
// an idle process costs no CPU.
#pragma once
#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace neo {

class ThreadPool {
 public:
  using Fn = void (*)(void* ctx, int tid, int nthreads);

  explicit ThreadPool(int n);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }
  // Runs fn(ctx, tid, n) on every thread (the caller is tid 0) and returns when all have finished.
  void run(Fn fn, void* ctx);

  static std::atomic<int64_t> spin_us;

 private:
  void worker(int tid);

  int n_;
  std::vector<std::thread> threads_;
  std::atomic<uint32_t> generation_{0};   // bumped once per job; workers wait for a change
  std::atomic<int> pending_{0};            // workers still running the current job
  std::atomic<bool> stop_{false};
  Fn fn_ = nullptr;                        // the current job (written before generation_ bumps)
  void* ctx_ = nullptr;
};

// The process-wide pool; resized by neo_set_num_threads (not while a job runs).
ThreadPool& global_pool();
void resize_global_pool(int n);
std::mutex& pool_mutex();   // serializes jobs from several caller threads

}  // namespace neo
