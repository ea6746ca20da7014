// Fork-join over tiles for the quantized dense kernel. The caller and the workers claim chunks of
// tiles from the job's counter, so a worker the OS has not scheduled yet (a loaded machine: more
// runnable threads than cores) delays nothing: the caller does its share and the rest. A worker
// only touches a job's buffers after claiming one of its unfinished tiles, i.e. while the caller is
// still waiting in run(). Which thread computes a tile never changes what it computes.
#pragma once
#include <stdint.h>

namespace neo_qd {

using TileFn = void (*)(const void* ctx, int64_t t0, int64_t t1);

// Runs fn(ctx, t0, t1) over tiles [0, tiles) on up to `threads` threads (the caller included).
void run_tiles(int threads, TileFn fn, const void* ctx, int64_t tiles);

// How long an idle worker spins before sleeping on a futex (microseconds).
void set_spin_us(int64_t us);

}  // namespace neo_qd
