// Paged decode attention on the CPU: one query token per sequence attends over its context, read
// block by block straight from the KV pool through its block table. Each (sequence, KV head) task
// reads its keys once and its values once (no gathered copy of the history) and serves all the
// query heads that share that KV head (grouped-query attention). Math in fp32, vectorised with
// ATen's portable SIMD types (AVX-512 / AVX2 / NEON / scalar, as the build flags select).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline Vec load_float(const float* p) { return Vec::loadu(p); }
template <typename T>
inline Vec load_float(const T* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}

template <typename T, int64_t D>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* context_lens,
                      T* out, int64_t batch, int64_t heads, int64_t kv_heads, int64_t num_blocks, int64_t block_size,
                      int64_t width, float scale) {
  constexpr int64_t C = D / kLanes;  // SIMD chunks per head row, kept in registers
  const int64_t group = heads / kv_heads;
  const int64_t head_stride = num_blocks * block_size * D;  // one KV head's slice of the pool
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads, len = context_lens[b];
      const int64_t* table = tables + b * width;
      const T* qb = q + (b * heads + h * group) * D;
      for (int64_t i = 0; i < group * D; ++i) qf[i] = static_cast<float>(qb[i]) * scale;
      scores.resize(group * len);
      // Walk the context block by block: a block's rows are contiguous in the pool.
      auto for_each_row = [&](const T* pool, auto&& body) {
        for (int64_t t0 = 0; t0 < len; t0 += block_size) {
          const T* rows = pool + h * head_stride + table[t0 / block_size] * block_size * D;
          const int64_t n = std::min(block_size, len - t0);
          for (int64_t i = 0; i < n; ++i) body(t0 + i, rows + i * D);
        }
      };

      for_each_row(k_cache, [&](int64_t t, const T* k) {  // scores = q . k, each key row converted once
        Vec kv[C];
        for (int64_t c = 0; c < C; ++c) kv[c] = load_float(k + c * kLanes);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * D;
          Vec s(0.f);
          for (int64_t c = 0; c < C; ++c) s = at::vec::fmadd(Vec::loadu(qg + c * kLanes), kv[c], s);
          scores[g * len + t] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s);
        }
      });
      for (int64_t g = 0; g < group; ++g) {  // softmax
        float* sg = scores.data() + g * len;
        const float m = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, sg, len);
        at::vec::map([m](Vec x) { return (x - Vec(m)).exp_u20(); }, sg, sg, len);
        const float inv = 1.f / at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sg, len);
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, sg, sg, len);
      }
      for (int64_t g = 0; g < group; ++g) {  // out = probs . v; after the first head the rows come from cache
        Vec acc[C];
        for (int64_t c = 0; c < C; ++c) acc[c] = Vec(0.f);
        const float* pg = scores.data() + g * len;
        for_each_row(v_cache, [&](int64_t t, const T* v) {
          const Vec p(pg[t]);
          for (int64_t c = 0; c < C; ++c) acc[c] = at::vec::fmadd(p, load_float(v + c * kLanes), acc[c]);
        });
        float row[D];
        for (int64_t c = 0; c < C; ++c) acc[c].store(row + c * kLanes);
        T* og = out + (b * heads + h * group + g) * D;
        for (int64_t i = 0; i < D; ++i) og[i] = static_cast<T>(row[i]);
      }
    }
  });
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
            const at::Tensor& lens, at::Tensor& out, double scale) {
  auto run = [&](auto head_dim) {
    decode_attention<T, decltype(head_dim)::value>(
        q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
        out.data_ptr<T>(), q.size(0), q.size(1), k_cache.size(0), k_cache.size(1), k_cache.size(2), tables.size(1),
        static_cast<float>(scale));
  };
  switch (q.size(2)) {
    case 16: run(std::integral_constant<int64_t, 16>{}); break;  // the test suite's tiny models
    case 32: run(std::integral_constant<int64_t, 32>{}); break;
    case 64: run(std::integral_constant<int64_t, 64>{}); break;
    case 128: run(std::integral_constant<int64_t, 128>{}); break;
    default: TORCH_CHECK(false, "paged_decode_attention: head_dim ", q.size(2), " not built (16, 32, 64 and 128 are)");
  }
}

// q: [B, heads, D]; k_cache/v_cache: [kv_heads, num_blocks, block_size, D]; block_tables: [B, W] (int64);
// context_lens: [B] (int64, each >= 1). Returns [B, heads, D].
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_decode_attention runs on the CPU");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV pool must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 tables and lengths");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0 && q.size(2) == k_cache.size(3), "heads do not match the pool");
  const auto qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  auto out = at::empty_like(qc);
  switch (q.scalar_type()) {
    case at::kFloat: launch<float>(qc, k_cache, v_cache, tables, lens, out, scale); break;
    case at::kBFloat16: launch<at::BFloat16>(qc, k_cache, v_cache, tables, lens, out, scale); break;
    case at::kHalf: launch<at::Half>(qc, k_cache, v_cache, tables, lens, out, scale); break;
    default: TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(pagedllm, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
