/* Plain C ABI of the NEO CPU decode-attention kernel (an ISPC or other build can implement the same).
 *
 * Layouts (row-major, element type = the KV dtype, 2 bytes: bf16 or fp16):
 *   q       [batch, num_q_heads, head_dim]
 *   k_new   [batch, num_kv_heads, head_dim]   (appended at position seq_lens[b]-1; may be NULL)
 *   v_new   [batch, num_kv_heads, head_dim]
 *   o       [batch, num_q_heads, head_dim]    (every element written)
 *   k_cache [num_blocks, num_kv_heads, block_size, head_dim]   one layer of the pool
 *   v_cache [num_blocks, num_kv_heads, block_size, head_dim]
 *   block_tables [batch, bt_stride] int32 (entries past the request's blocks are ignored)
 *   seq_lens [batch] int32, context length including the token appended by this call (>= 1)
 * Query head qh uses KV head qh / (num_q_heads / num_kv_heads). Accumulation is fp32.
 */
#ifndef NEO_ATTN_H
#define NEO_ATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum neo_dtype { NEO_BF16 = 0, NEO_F16 = 1 };

enum neo_status {
  NEO_OK = 0,
  NEO_EINVAL = -1,      /* bad shape / dtype / head ratio */
  NEO_EBLOCK = -2,      /* a block id out of range */
  NEO_ESEQLEN = -3,     /* seq_len < 1 or more blocks than bt_stride */
  NEO_ETIMEOUT = -4,    /* a doorbell did not ring in time */
  NEO_EABORT = -5,      /* the peer raised the abort word */
  NEO_ENOMEM = -6
};

typedef struct neo_attn_args {
  const void* q;
  const void* k_new;
  const void* v_new;
  void* o;
  void* k_cache;
  void* v_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int32_t batch;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;       /* 64, 128 or 256 */
  int32_t block_size;     /* 1..64 */
  int32_t bt_stride;
  int32_t num_blocks;
  int32_t dtype;          /* enum neo_dtype */
  float scale;            /* softmax scale, usually 1/sqrt(head_dim) */
} neo_attn_args;

/* Paged decode attention for one layer; blocks until done. Returns enum neo_status. */
int neo_attn_decode(const neo_attn_args* args);

/* Thread pool (process-wide). n <= 0 keeps the current size. */
void neo_set_num_threads(int n);
int neo_get_num_threads(void);
/* How long idle pool threads spin before sleeping, in microseconds. */
void neo_set_spin_us(int us);
/* Name of the instruction set the dispatcher picked: "avx512", "avx2", "vec16" (portable 16-lane
 * vectors, the default off x86) or "generic" (scalar; only when forced). */
const char* neo_isa_name(void);
/* Force an ISA (one of the names above, or "auto"); returns 0, or -1 if the CPU lacks it. */
int neo_force_isa(const char* name);

/* STREAM-style read of size_bytes (allocated, first-touched and read by the pool); best of reps, GB/s. */
double neo_measure_read_gbps(size_t size_bytes, int reps);
/* Same, also giving the best CPU-time-normalized figure: bytes / (process CPU seconds / threads),
 * which does not count time the threads spent descheduled (useful on a shared machine). */
double neo_measure_read(size_t size_bytes, int reps, double* cpu_gbps);

/* ---- doorbells (control words in shared memory) ---- */
void neo_store_u64(uint64_t* addr, uint64_t value);             /* release store */
uint64_t neo_load_u64(const uint64_t* addr);                     /* acquire load */
/* Wait until *addr >= target (spin spin_us, then poll with short sleeps). Returns the value seen,
 * or 0 with *timed_out=1 after timeout_us (<0: forever). Stops early when *abort_word >= abort_at
 * (if abort_word is not NULL), returning the value seen and setting *timed_out=2. */
uint64_t neo_wait_u64(const uint64_t* addr, uint64_t target, int64_t spin_us, int64_t timeout_us,
                      const uint64_t* abort_word, uint64_t abort_at, int* timed_out);

/* ---- one iteration of the cpu_attention service loop ---- */
typedef struct neo_slot_desc {
  uint64_t* req_seq;      /* written by the GPU side: job (iteration, layer) whose inputs are staged */
  uint64_t* done_seq;     /* written here: last job completed */
  int64_t* status;        /* written here before done_seq: 0 or a negative neo_status */
  void* q;                /* staging, [max_rows, Hq, D] */
  void* k_new;
  void* v_new;
  void* o;
  int32_t rows;           /* CPU rows of this sub-batch this iteration (0: slot idle) */
  const int32_t* seq_lens;
  const int32_t* block_tables;
  int32_t bt_stride;
  int32_t next_layer;     /* in/out: first layer not yet served (0 for a fresh iteration) */
} neo_slot_desc;

typedef struct neo_serve_args {
  uint8_t* k_pool;        /* [layers, num_blocks, Hkv, bs, D] */
  uint8_t* v_pool;
  const uint64_t* abort_word;   /* GPU side raises it to >= the job seq to cancel */
  int32_t num_layers, num_blocks, num_q_heads, num_kv_heads, head_dim, block_size, dtype;
  float scale;
  int32_t num_slots;
  neo_slot_desc slots[4];
  uint64_t iteration_id;
  int64_t spin_us;
  int64_t timeout_us;
  int64_t busy_ns;        /* out: time this call spent in the kernel (the rest waited on doorbells) */
} neo_serve_args;

/* Job sequence number of (iteration, layer): (iteration_id << 16) | (layer + 1). */
static inline uint64_t neo_job_seq(uint64_t iteration_id, uint32_t layer) {
  return (iteration_id << 16) | (uint64_t)(layer + 1);
}

/* For every layer (from slot.next_layer on) and every slot with rows > 0: wait for req_seq >= job
 * seq, run the kernel on the slot's staging, write status then done_seq = job seq. Slots are served
 * in whatever order their doorbells ring (layers in order within a slot). Returns NEO_OK when all are
 * served, NEO_ETIMEOUT when no doorbell rang for timeout_us (call again to resume: next_layer is
 * updated), NEO_EABORT when the abort word names this iteration, or the first kernel error (after
 * marking the rest of that slot's jobs done with the error status, so the peer never waits on them). */
int neo_serve_iteration(neo_serve_args* args, int32_t* failed_layer);

#ifdef __cplusplus
}
#endif
#endif
