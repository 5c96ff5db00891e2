// How paged attention divides a step's work: tasks of (sequence, KV head, tile of query tokens), each seen
// through a TaskView of the pool; long decodes also split their keys into pieces (flash-decoding).
#pragma once

#include <ATen/Parallel.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pagedllm::cpu {

constexpr int64_t kTile = 32;           // query tokens per task
constexpr int64_t kTransposeRows = 8;   // from this many rows per task, scores use transposed keys
constexpr int64_t kRowBlock = 4;        // rows scored together (independent accumulators)
constexpr int64_t kKeyVecs = kTileAccumulators / kRowBlock;  // key vectors scored together, for kRowBlock rows
constexpr int64_t kTokenTasks = 8;     // chunks of up to this many query tokens are attended token by token
constexpr int64_t kPieceKeys = 512;    // a token's keys in pieces of about this many (whole blocks)
constexpr int64_t kL2Blocks = 3;       // a decode's keys and values are prefetched into L2 this many blocks ahead
// Below this much work (query tokens x keys x KV heads) a step runs on one thread: measured here with 3 KV
// heads, a decode over 256 keys took 14 us on one thread and 19 us on two, over 1,024 keys 46 and 42 us.
constexpr int64_t kParallelWork = 2048;

// Query tokens [first, first + count) of `seq` against KV head `head`, over its keys [key0, key0 + keys);
// a piece of a split decode writes its unnormalised result and softmax statistics to partial slot `part`.
struct Task {
  int64_t seq, head, first, count, key0, keys, part;
};

// The output row (query token x query head, of `heads`) of a task's row r, for its tile's first token token0:
// row r is query token r / group of the tile, query head r % group of those sharing KV head `kv_head`.
inline int64_t head_row(int64_t token0, int64_t kv_head, int64_t group, int64_t heads, int64_t r) {
  return (token0 + r / group) * heads + kv_head * group + r % group;
}

// One task's view of the pool and its query rows (rows as head_row numbers them). The tile's first query
// sits at position pos0, so row r sees keys [0, visible(r)). Key j is the task's j-th (a piece of a split
// decode starts at a block edge: table and pos0 are relative to its first key).
template <typename T, int64_t D>
struct TaskView {
  const T* k_head;  // this KV head's slice of the key pool
  const T* v_head;
  const int64_t* table;
  int64_t block_size, group, pos0, rows, keys;

  int64_t visible(int64_t r) const { return std::min(keys, pos0 + r / group + 1); }
  int64_t first_row_seeing(int64_t j) const { return std::max<int64_t>(0, j - pos0) * group; }
  const T* row(const T* head, int64_t j) const {
    return head + (table[j / block_size] * block_size + j % block_size) * D;
  }
  // Block j's rows into L1 (kLocality 3) or L2 (2).
  template <int kLocality = 3>
  void prefetch_block(const T* head, int64_t j) const {
    const char* block = reinterpret_cast<const char*>(head + table[j / block_size] * block_size * D);
    for (int64_t b = 0; b < block_size * D * static_cast<int64_t>(sizeof(T)); b += 64)
      __builtin_prefetch(block + b, 0, kLocality);
  }
  // At key j (a block edge) of the pass over the keys, whose values are read after it: the next key block into L1,
  // this block's values, and the keys and values kL2Blocks blocks ahead into L2 (at the first block, every block up
  // to there). Blocks lie anywhere in the pool, and L1 keeps few misses in flight: with one block ahead alone a
  // decode's attention waited on memory (measured here over 600-token decodes: a quarter slower).
  void prefetch_for_keys(int64_t j) const {
    for (int64_t a = j == 0 ? 1 : kL2Blocks; a <= kL2Blocks; ++a) {
      if (j + a * block_size < keys) {
        prefetch_block<2>(k_head, j + a * block_size);
        prefetch_block<2>(v_head, j + a * block_size);
      }
    }
    if (j + block_size < keys) prefetch_block(k_head, j + block_size);
    prefetch_block(v_head, j);
  }
  // Calls body(j, row) for the keys' (or, with values, the values') rows block by block: a block's rows are
  // contiguous, the keys' pass prefetches as above, the values' the next block (unless `prefetch` is false: a
  // pass over rows an earlier pass brought in).
  template <typename F>
  void for_each_row(bool values, F&& body, bool prefetch = true) const {
    const T* head = values ? v_head : k_head;
    for (int64_t j0 = 0; j0 < keys; j0 += block_size) {
      const T* block = head + table[j0 / block_size] * block_size * D;
      if (!values) {
        prefetch_for_keys(j0);
      } else if (prefetch && j0 + block_size < keys) {
        prefetch_block(head, j0 + block_size);
      }
      for (int64_t i = 0; i < std::min(block_size, keys - j0); ++i) body(j0 + i, block + i * D);
    }
  }
};

// How many threads a step's attention takes: one for little work (kParallelWork), else all.
inline int64_t attention_threads(const int64_t* query_start, const int64_t* context_lens, int64_t num_seqs,
                                 int64_t kv_heads) {
  int64_t work = 0;
  for (int64_t b = 0; b < num_seqs; ++b) work += (query_start[b + 1] - query_start[b]) * context_lens[b] * kv_heads;
  return work < kParallelWork ? 1 : at::get_num_threads();
}

// The step's tasks, per sequence and KV head: a decode, and each token of a chunk of up to kTokenTasks tokens
// (a verifying step's proposals), is its own task, its keys in pieces of kPieceKeys when it has more; longer
// chunks go in tiles of kTile tokens. What a token's task computes depends on its own context only, never on
// the rest of the step, so a token verified in a chunk gets bitwise the attention it gets decoded alone (and
// speculative decoding's greedy tokens are those without it, in bf16 as in fp32). `pieces` counts the pieces.
inline std::vector<Task> make_tasks(const int64_t* query_start, const int64_t* context_lens, int64_t num_seqs,
                                    int64_t kv_heads, int64_t block_size, int64_t& pieces) {
  const int64_t piece = (kPieceKeys + block_size - 1) / block_size * block_size;
  std::vector<Task> tasks;
  pieces = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t len = query_start[b + 1] - query_start[b], ctx = context_lens[b];
    for (int64_t h = 0; h < kv_heads; ++h) {
      if (len > kTokenTasks) {
        for (int64_t i = 0; i < len; i += kTile) {
          const int64_t count = std::min(kTile, len - i);
          tasks.push_back({b, h, i, count, 0, ctx - len + i + count, -1});
        }
        continue;
      }
      for (int64_t i = 0; i < len; ++i) {
        const int64_t keys = ctx - len + i + 1;
        if (keys <= piece) {
          tasks.push_back({b, h, i, 1, 0, keys, -1});
          continue;
        }
        for (int64_t k0 = 0; k0 < keys; k0 += piece) tasks.push_back({b, h, i, 1, k0, std::min(piece, keys - k0), pieces++});
      }
    }
  }
  return tasks;
}

// Task boundaries for `threads` threads: each takes a contiguous run of tasks (so it streams through its own
// part of the pool) holding about an equal share of the work (query tokens x keys).
inline std::vector<int64_t> split_among_threads(const std::vector<Task>& tasks, int64_t threads) {
  std::vector<double> work;  // running total up to and including each task
  for (const Task& task : tasks) work.push_back((work.empty() ? 0. : work.back()) + task.count * task.keys);
  std::vector<int64_t> bounds(threads + 1, static_cast<int64_t>(tasks.size()));
  bounds[0] = 0;
  for (int64_t t = 1; t < threads; ++t)
    bounds[t] = std::upper_bound(work.begin(), work.end(), work.back() * t / threads) - work.begin();
  return bounds;
}

}  // namespace pagedllm::cpu
