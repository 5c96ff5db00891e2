// Paged attention on the CPU for every kind of query a step holds: decodes (one query per sequence),
// fresh prompt chunks, and chunks after a cached prefix or an earlier chunk. Each query token attends
// causally over its sequence's keys, read block by block straight from the KV pool through the block
// table (no gathered copy of the history, no padding, no mask tensors).
//
// Work is split into tasks of (sequence, KV head, tile of up to kTile query tokens). A task's rows are
// its tokens times the query heads sharing that KV head (grouped-query attention), so each key row is
// loaded from memory once per tile. When a step has too few tasks to keep every thread busy (one long
// decode: 3 KV heads on 2 threads), each decode's keys are also split into pieces, whose softmax
// statistics merge their results afterwards (flash-decoding, as vLLM's paged attention v2).
//
// This file holds the step: its tasks' softmax, the merge of split pieces, the operators. The tasks are in
// attention_tasks.h, their scores in attention_scores.h, their value sums in attention_values.h. Scores
// are kept for the whole visible context (two-pass softmax). Math in fp32; in bf16 on CPUs with
// AVX512-BF16, scores and value sums use its pairwise dot products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_scores.h"
#include "attention_tasks.h"
#include "attention_values.h"
#include "cpu_vec.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace pagedllm::cpu {
namespace {

// Each row's scores over its visible keys become exp(score - max) in one pass that also sums them (the value
// sums' "probabilities", normalised only at the end); zero past them. Row r's maximum and sum go to stats[2r],
// stats[2r + 1]: the value sums are divided by the sum at the end (a pass less over the scores than
// normalising them here), or pieces of split keys merged by both.
template <typename T, int64_t D>
void softmax_rows(const TaskView<T, D>& t, float* scores, float* stats) {
  for (int64_t r = 0; r < t.rows; ++r) {
    float* sr = scores + r * t.keys;
    const int64_t n = t.visible(r);
    const float m = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, sr, n);
    Vec acc(0.f);
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const Vec e = (Vec::loadu(sr + j) - Vec(m)).exp_u20();
      e.store(sr + j);
      acc = acc + e;
    }
    float sum = sum_of(acc);
    if (j < n) {
      (Vec::loadu(sr + j, n - j) - Vec(m)).exp_u20().store(sr + j, n - j);
      for (; j < n; ++j) sum += sr[j];
    }
    stats[2 * r] = m;
    stats[2 * r + 1] = sum;
    std::fill(sr + n, sr + t.keys, 0.f);
  }
}

// Each split token's pieces (consecutive tasks of one token and KV head, key0 = 0 first) merged into its
// output rows: their value sums, each relative to its own maximum, rescaled by exp(max_p - max) and divided by
// the rescaled sums' total.
template <typename T, int64_t D>
void merge_pieces(const std::vector<Task>& tasks, const std::vector<float>& partial, const std::vector<float>& stats,
                  const int64_t* query_start, T* out, int64_t heads, int64_t group) {
  std::vector<int64_t> firsts;
  for (size_t n = 0; n < tasks.size(); ++n)
    if (tasks[n].part >= 0 && tasks[n].key0 == 0) firsts.push_back(n);
  at::parallel_for(0, static_cast<int64_t>(firsts.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      const Task& first = tasks[firsts[f]];
      int64_t count = 1;
      while (firsts[f] + count < static_cast<int64_t>(tasks.size()) && tasks[firsts[f] + count].key0 > 0) ++count;
      for (int64_t r = 0; r < group; ++r) {
        auto stat = [&](int64_t p, int64_t i) { return stats[((first.part + p) * group + r) * 2 + i]; };
        float m = stat(0, 0);
        for (int64_t p = 1; p < count; ++p) m = std::max(m, stat(p, 0));
        float acc[D] = {}, total = 0.f;
        for (int64_t p = 0; p < count; ++p) {
          const float w = std::exp(stat(p, 0) - m);
          const float* row = partial.data() + ((first.part + p) * group + r) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * row[d];
          total += w * stat(p, 1);
        }
        T* dst = out + head_row(query_start[first.seq] + first.first, first.head, group, heads, r) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d] / total);
      }
    }
  });
}

template <typename T, int64_t D>
void attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* query_start,
               const int64_t* context_lens, T* out, int64_t num_seqs, int64_t heads, int64_t kv_heads,
               int64_t num_blocks, int64_t block_size, int64_t width, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t head_stride = num_blocks * block_size * D;  // one KV head's slice of the pool
  int64_t pieces = 0;
  const std::vector<Task> tasks = make_tasks(query_start, context_lens, num_seqs, kv_heads, block_size, pieces);
  const int64_t threads = std::min<int64_t>(attention_threads(query_start, context_lens, num_seqs, kv_heads),
                                            static_cast<int64_t>(tasks.size()));
  const std::vector<int64_t> bounds = split_among_threads(tasks, threads);
  std::vector<float> partial(pieces * group * D), stats(pieces * group * 2);  // the pieces' rows and statistics

  at::parallel_for(0, threads, 1, [&](int64_t thread_begin, int64_t thread_end) {
    // per task: scaled queries, probabilities, value sums, softmax statistics (a split piece's go to `stats`)
    std::vector<float> qf, scores, sums, own_stats;
    for (int64_t n = bounds[thread_begin]; n < bounds[thread_end]; ++n) {
      const Task task = tasks[n];
      const int64_t len = query_start[task.seq + 1] - query_start[task.seq];
      const int64_t pos0 = context_lens[task.seq] - len + task.first;
      const TaskView<T, D> t{k_cache + task.head * head_stride, v_cache + task.head * head_stride,
                             tables + task.seq * width + task.key0 / block_size, block_size, group,
                             pos0 - task.key0, task.count * group, task.keys};
      const int64_t token0 = query_start[task.seq] + task.first;  // the tile's first token in the step
      auto out_row = [&](int64_t r) { return head_row(token0, task.head, group, heads, r); };
      own_stats.resize(t.rows * 2);
      float* row_stats = task.part >= 0 ? stats.data() + task.part * group * 2 : own_stats.data();
      auto dest = [&](int64_t r, const float* row) {  // row r's value sums, not yet divided by its softmax sum
        if (task.part >= 0) {
          std::copy(row, row + D, partial.data() + (task.part * group + r) * D);
          return;
        }
        T* dst = out + out_row(r) * D;
        const float inv = 1.f / row_stats[2 * r + 1];
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(row[d] * inv);
      };

      qf.resize((t.rows + kRowBlock) * D);
      std::fill(qf.begin() + t.rows * D, qf.end(), 0.f);
      for (int64_t r = 0; r < t.rows; ++r)
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(q[out_row(r) * D + d]) * scale;
      scores.resize(t.rows * t.keys);
      score_rows(t, q, out_row, qf.data(), scale, scores.data());
      softmax_rows(t, scores.data(), row_stats);
      if (t.rows < kTransposeRows) {
        values_of_few_rows(t, scores.data(), dest);
      } else {
        values_of_many_rows(t, scores.data(), sums, dest);
      }
    }
  });
  if (pieces > 0) merge_pieces<T, D>(tasks, partial, stats, query_start, out, heads, group);
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
            const at::Tensor& query_start, const at::Tensor& lens, at::Tensor& out, double scale) {
  auto run = [&](auto head_dim) {
    attention<T, decltype(head_dim)::value>(
        q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), tables.data_ptr<int64_t>(),
        query_start.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<T>(), lens.size(0), q.size(1),
        k_cache.size(0), k_cache.size(1), k_cache.size(2), tables.size(1), static_cast<float>(scale));
  };
  switch (q.size(2)) {
    case 16: run(std::integral_constant<int64_t, 16>{}); break;  // the test suite's tiny models
    case 32: run(std::integral_constant<int64_t, 32>{}); break;
    case 64: run(std::integral_constant<int64_t, 64>{}); break;
    case 128: run(std::integral_constant<int64_t, 128>{}); break;
    default: TORCH_CHECK(false, "paged_attention: head_dim ", q.size(2), " not built (16, 32, 64 and 128 are)");
  }
}

}  // namespace
}  // namespace pagedllm::cpu

namespace pagedllm {

// q: [T, heads, D], the step's query tokens sequence after sequence; k_cache/v_cache: [kv_heads, num_blocks,
// block_size, D] with this step's keys and values already written; block_tables: [B, W]; query_start: [B + 1]
// offsets of each sequence's tokens in q; context_lens: [B] tokens each sequence has after this step.
// All index tensors int64. Returns [T, heads, D].
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_start, const at::Tensor& context_lens,
                           double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention runs on the CPU");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV pool must be contiguous");
  for (const auto* t : {&block_tables, &query_start, &context_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong, "int64 block tables, query starts and context lengths");
  TORCH_CHECK(query_start.numel() == context_lens.numel() + 1 && block_tables.size(0) == context_lens.numel(),
              "one block table and context length per sequence, one more query start");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0 && q.size(2) == k_cache.size(3), "heads do not match the pool");
  const auto qc = q.contiguous(), tables = block_tables.contiguous(), starts = query_start.contiguous(),
             lens = context_lens.contiguous();
  auto out = at::empty_like(qc);
  PAGEDLLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_attention",
                                [&] { cpu::launch<scalar_t>(qc, k_cache, v_cache, tables, starts, lens, out, scale); });
  return out;
}

// Writes this step's keys and values ([T, kv_heads, D], rows may be strided as slices of the QKV output)
// into the pool at each token's slot (slot = block * block_size + offset).
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.stride(2) == 1 && value.stride(2) == 1 &&
                  key.stride(1) == key.size(2) && value.stride(1) == value.size(2),
              "reshape_and_cache: key and value [tokens, kv_heads, head_dim] with contiguous heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(0) == key.size(1) &&
                  k_cache.size(3) == key.size(2) && key.scalar_type() == k_cache.scalar_type(),
              "reshape_and_cache: pool [kv_heads, blocks, block_size, head_dim] in the keys' dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == key.size(0), "reshape_and_cache: slots");
  const int64_t tokens = key.size(0), kv_heads = key.size(1), row = key.size(2) * key.element_size();
  const int64_t num_slots = k_cache.size(1) * k_cache.size(2), head_stride = num_slots * row;  // bytes per KV head
  const auto slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const char *pk = static_cast<const char*>(key.data_ptr()), *pv = static_cast<const char*>(value.data_ptr());
  char *ck = static_cast<char*>(k_cache.data_ptr()), *cv = static_cast<char*>(v_cache.data_ptr());
  const int64_t ks = key.stride(0) * key.element_size(), vs = value.stride(0) * value.element_size();
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "reshape_and_cache: slot ", slot[t], " outside the pool");
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::memcpy(ck + h * head_stride + slot[t] * row, pk + t * ks + h * row, row);
        std::memcpy(cv + h * head_stride + slot[t] * row, pv + t * vs + h * row, row);
      }
    }
  });
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_start, "
        "Tensor context_lens, float scale) -> Tensor");
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) {
  m.impl("paged_attention", &pagedllm::paged_attention);
  m.impl("reshape_and_cache", &pagedllm::reshape_and_cache);
}
