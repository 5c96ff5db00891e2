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
// With many rows, kLanes keys at a time are transposed so that each row's scores for them are plain FMAs
// (a small matrix product) instead of dot products. Scores are kept for the whole visible context
// (two-pass softmax); with few rows, each value row is converted once and added into every row's sum in
// registers. Math in fp32, vectorised with ATen's portable SIMD types (AVX-512 / AVX2 / NEON / scalar, as
// the build flags select); in bf16 on CPUs with AVX512-BF16, scores and value sums use its pairwise dot
// products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "ops.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
// the bf16 functions below are compiled for AVX512-BF16 and called only where the CPU has it
#define PAGEDLLM_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512bf16")))
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kTile = 32;          // query tokens per task
constexpr int64_t kTransposeRows = 8;  // from this many rows per task, scores use transposed keys
constexpr int64_t kRowBlock = 4;       // rows scored together (independent accumulators)
constexpr int64_t kTasksPerThread = 4;  // fewer tasks than this per thread: split decodes into pieces of keys
constexpr int64_t kMinPieceKeys = 128;  // ... of at least this many keys

inline Vec load_float(const float* p) { return Vec::loadu(p); }
template <typename T>
inline Vec load_float(const T* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}

// Query tokens [first, first + count) of `seq` against KV head `head`, over its keys [key0, key0 + keys);
// a piece of a split decode writes its unnormalised result and softmax statistics to partial slot `part`.
struct Task {
  int64_t seq, head, first, count, key0, keys, part;
};

// One task's view of the pool and its query rows. Row r is query token r / group (of the tile), query
// head r % group (of those sharing this KV head); the tile's first query sits at position pos0, so row r
// sees keys [0, visible(r)). Key j is the task's j-th (a piece of a split decode starts at a block edge:
// table and pos0 are relative to its first key).
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
  void prefetch_block(const T* head, int64_t j) const {
    const char* block = reinterpret_cast<const char*>(head + table[j / block_size] * block_size * D);
    for (int64_t b = 0; b < block_size * D * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(block + b);
  }
  // Calls body(j, row) for keys [0, n) block by block: a block's rows are contiguous, but blocks lie anywhere
  // in the pool, so the next block is prefetched while one is read (and, with `also`, the same block of the
  // other pool, which is read next).
  template <typename F>
  void for_each_row(const T* head, int64_t n, F&& body, const T* also = nullptr) const {
    for (int64_t j0 = 0; j0 < n; j0 += block_size) {
      const T* block = head + table[j0 / block_size] * block_size * D;
      if (j0 + block_size < n) prefetch_block(head, j0 + block_size);
      if (also != nullptr) prefetch_block(also, j0);
      for (int64_t i = 0; i < std::min(block_size, n - j0); ++i) body(j0 + i, block + i * D);
    }
  }
};

// Few rows (decodes): scores[r][j] = q_r . k_j as a dot product per row and key.
template <typename T, int64_t D>
void scores_by_dot_products(const TaskView<T, D>& t, const float* qf, float* scores) {
  constexpr int64_t C = D / kLanes;
  t.for_each_row(t.k_head, t.keys, [&](int64_t j, const T* k) {
    Vec kv[C];
    for (int64_t c = 0; c < C; ++c) kv[c] = load_float(k + c * kLanes);
    for (int64_t r = t.first_row_seeing(j); r < t.rows; ++r) {
      const float* qr = qf + r * D;
      Vec s = Vec::loadu(qr) * kv[0];
      for (int64_t c = 1; c < C; ++c) s = at::vec::fmadd(Vec::loadu(qr + c * kLanes), kv[c], s);
      scores[r * t.keys + j] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s);
    }
  }, t.v_head);
}

#if defined(CPU_CAPABILITY_AVX512)
// Lane j of the result is the sum of v[j]'s 16 lanes: 16 horizontal sums in 45 instructions instead of 16 x 8.
inline __m512 sum_lanes(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)  // lane L: [v2i, v2i+1, v2i, v2i+1] partial sums
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // lane L: [v4i, v4i+1, v4i+2, v4i+3], each summed over lane L
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // out lane i = the sum over lanes L of x[i]'s lane L (a 4 x 4 transpose of 128-bit lanes, added up)
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x44), _mm512_shuffle_f32x4(x[0], x[1], 0xEE));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x44), _mm512_shuffle_f32x4(x[2], x[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

// r[i] lane j <- r[j] lane i for 16 vectors of 16 32-bit lanes: unpacks within 128-bit lanes, then a 4 x 4
// transpose of the lanes.
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4) {  // r[4g + m], lane L: element 4L + m of rows 4g .. 4g + 3
    const __m512d a = _mm512_castps_pd(t[j]), b = _mm512_castps_pd(t[j + 2]);
    const __m512d c = _mm512_castps_pd(t[j + 1]), d = _mm512_castps_pd(t[j + 3]);
    r[j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int m = 0; m < 4; ++m) {  // element 4L + m of all rows: lane g of the output from lane L of r[4g + m]
    const __m512 p0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), p1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xEE);
    const __m512 p2 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44), p3 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_f32x4(p0, p2, 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(p0, p2, 0xDD);
    t[8 + m] = _mm512_shuffle_f32x4(p1, p3, 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(p1, p3, 0xDD);
  }
  for (int j = 0; j < 16; ++j) r[j] = t[j];
}

// Few rows in bf16, on CPUs with AVX512-BF16: 16 keys at a time, each q . k by pairwise bf16 dot products
// straight into fp32 (the products are exact; no conversion of the keys), then 16 horizontal sums at once.
// q[r] is row r's query in bf16, unscaled.
template <int64_t D>
PAGEDLLM_BF16_DOT void scores_by_bf16_dot_products(
    const TaskView<at::BFloat16, D>& t, const at::BFloat16* const* q, float scale, float* scores) {
  constexpr int64_t kChunks = (D + 31) / 32;  // 32 bf16 per instruction; D = 16 is one masked chunk
  constexpr __mmask32 kLast = D % 32 == 0 ? ~0u : (1u << (D % 32)) - 1;
  const bool in_one_block = t.block_size % 16 == 0;  // then 16 keys from j0 are consecutive rows
  for (int64_t j0 = 0; j0 < t.keys; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, t.keys - j0);
    const at::BFloat16* k[16];
    const at::BFloat16* first = t.row(t.k_head, j0);
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t j = j0 + std::min(i, nk - 1);  // past the end: repeat the last key (its score is not stored)
      k[i] = in_one_block ? first + (j - j0) * D : t.row(t.k_head, j);
    }
    if (j0 % t.block_size == 0) {
      if (j0 + t.block_size < t.keys) t.prefetch_block(t.k_head, j0 + t.block_size);
      t.prefetch_block(t.v_head, j0);
    }
    for (int64_t r = 0; r < t.rows; ++r) {
      __m512bh qv[kChunks];
      for (int64_t c = 0; c < kChunks; ++c)
        qv[c] = (__m512bh)_mm512_maskz_loadu_epi16(c + 1 == kChunks ? kLast : ~0u, q[r] + c * 32);
      __m512 s[16];
      for (int64_t i = 0; i < 16; ++i) {
        s[i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < kChunks; ++c)
          s[i] = _mm512_dpbf16_ps(s[i], qv[c], (__m512bh)_mm512_maskz_loadu_epi16(c + 1 == kChunks ? kLast : ~0u, k[i] + c * 32));
      }
      _mm512_mask_storeu_ps(scores + r * t.keys + j0, static_cast<__mmask16>((1u << nk) - 1),
                            _mm512_mul_ps(sum_lanes(s), _mm512_set1_ps(scale)));
    }
  }
}
// Many rows in bf16, on CPUs with AVX512-BF16: as scores_by_transposed_keys, but 16 keys are transposed as
// pairs of dimensions (32-bit elements kt[p][j] = key j's dimensions 2p, 2p + 1), so each row's scores for
// them are D / 2 pairwise bf16 dot products with its broadcast query pair, half the instructions of fp32
// FMAs and no conversion of the keys. q[r] is row r's query in bf16, unscaled; q has kRowBlock zero rows
// past its end.
template <int64_t D>
PAGEDLLM_BF16_DOT void scores_by_transposed_bf16_keys(
    const TaskView<at::BFloat16, D>& t, const at::BFloat16* const* q, float scale, float* scores) {
  constexpr int64_t P = D / 2;  // dimension pairs per key
  alignas(64) uint32_t kt[P * 16];
  const int64_t rows = t.rows, keys = t.keys;
  for (int64_t j0 = 0; j0 < keys; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, keys - j0);
    const uint32_t* k[16];
    for (int64_t i = 0; i < 16; ++i)  // past the end: repeat the last key (its score is not stored)
      k[i] = reinterpret_cast<const uint32_t*>(t.row(t.k_head, j0 + std::min(i, nk - 1)));
    for (int64_t c = 0; c < P; c += 16) {  // 16 x 16 32-bit transposes
      const __mmask16 cols = P - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (P - c)) - 1);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(cols, k[i] + c));
      transpose16(r);
      for (int64_t i = 0; i < std::min<int64_t>(16, P - c); ++i) _mm512_store_ps(kt + (c + i) * 16, r[i]);
    }
    for (int64_t r0 = t.first_row_seeing(j0); r0 < rows; r0 += kRowBlock) {
      __m512 acc[kRowBlock];
      const uint32_t* qp[kRowBlock];
      for (int64_t i = 0; i < kRowBlock; ++i) {
        acc[i] = _mm512_setzero_ps();
        qp[i] = reinterpret_cast<const uint32_t*>(q[r0 + i]);
      }
      for (int64_t p = 0; p < P; ++p) {
        const __m512bh kd = (__m512bh)_mm512_load_si512(kt + p * 16);
        for (int64_t i = 0; i < kRowBlock; ++i)
          acc[i] = _mm512_dpbf16_ps(acc[i], kd, (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[i][p])));
      }
      for (int64_t i = 0; i < std::min(kRowBlock, rows - r0); ++i)
        _mm512_mask_storeu_ps(scores + (r0 + i) * keys + j0, static_cast<__mmask16>((1u << nk) - 1),
                              _mm512_mul_ps(acc[i], _mm512_set1_ps(scale)));
    }
  }
}
#endif

// Many rows (prompt tiles): kLanes keys at a time, transposed once into kt[d][j], so each row's scores for
// them are D broadcast FMAs (a small matrix product, kRowBlock rows in flight) with no horizontal sums.
// qf has kRowBlock zero rows past its end.
template <typename T, int64_t D>
void scores_by_transposed_keys(const TaskView<T, D>& t, const float* qf, float* scores) {
  float kt[D * kLanes];
  const int64_t rows = t.rows, keys = t.keys;
  for (int64_t j0 = 0; j0 < keys; j0 += kLanes) {
    const int64_t nk = std::min(kLanes, keys - j0);
    for (int64_t jj = 0; jj < kLanes; ++jj) {
      const T* k = t.row(t.k_head, j0 + std::min(jj, nk - 1));  // past the end: repeat the last key (unused)
      for (int64_t d = 0; d < D; ++d) kt[d * kLanes + jj] = static_cast<float>(k[d]);
    }
    for (int64_t r0 = t.first_row_seeing(j0); r0 < rows; r0 += kRowBlock) {
      Vec acc[kRowBlock];
      for (int64_t i = 0; i < kRowBlock; ++i) acc[i] = Vec(0.f);
      for (int64_t d = 0; d < D; ++d) {
        const Vec kd = Vec::loadu(kt + d * kLanes);
        for (int64_t i = 0; i < kRowBlock; ++i) acc[i] = at::vec::fmadd(Vec(qf[(r0 + i) * D + d]), kd, acc[i]);
      }
      for (int64_t i = 0; i < std::min(kRowBlock, rows - r0); ++i) acc[i].store(scores + (r0 + i) * keys + j0, nk);
    }
  }
}

// Each row's scores over its visible keys become exp(score - max) in one pass that also sums them (the value
// sums' "probabilities", normalised only at the end); zero past them. Row r's maximum and sum go to stats[2r], stats[2r + 1]: the value sums are divided by the sum at the
// end (a pass less over the scores than normalising them here), or pieces of split keys merged by both.
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
    float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
    if (j < n) {
      (Vec::loadu(sr + j, n - j) - Vec(m)).exp_u20().store(sr + j, n - j);
      for (; j < n; ++j) sum += sr[j];
    }
    stats[2 * r] = m;
    stats[2 * r + 1] = sum;
    std::fill(sr + n, sr + t.keys, 0.f);
  }
}

// Few rows: out_r = sum_j p[r][j] v_j for all R rows at once, each value row converted to fp32 once and
// the sums in registers (probabilities past a row's visible keys are zero).
template <typename T, int64_t D, int64_t R, typename Dest>
void values_of_rows(const TaskView<T, D>& t, const float* probs, Dest&& dest) {
  constexpr int64_t C = D / kLanes;
  Vec acc[R][C];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) acc[r][c] = Vec(0.f);
  t.for_each_row(t.v_head, t.keys, [&](int64_t j, const T* v) {
    Vec vf[C];
    for (int64_t c = 0; c < C; ++c) vf[c] = load_float(v + c * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const Vec p(probs[r * t.keys + j]);
      for (int64_t c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(p, vf[c], acc[r][c]);
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    float row[D];
    for (int64_t c = 0; c < C; ++c) acc[r][c].store(row + c * kLanes);
    dest(r, row);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Value sums in bf16, on CPUs with AVX512-BF16: two keys at a time by pairwise dot products, value rows j and
// j + 1 interleaved (16-bit unpacks) against a row's probabilities for them as one broadcast bf16 pair: 32
// products per instruction and no conversion of the values. The probabilities are rounded to bf16 first, as
// in a bf16 attention matmul. The unpacks work within 128-bit lanes: lane 4L + i of sum vector 2c holds
// dimension 32c + 8L + i (i < 4), of vector 2c + 1 dimension 32c + 8L + 4 + i; store_in_order undoes that.
template <int64_t D>
struct Bf16Pairs {
  static constexpr int64_t kChunks = (D + 31) / 32;  // 32 dimensions per vector; D = 16 is one masked chunk
  static constexpr int64_t kSums = 2 * kChunks;      // sum vectors per row
  static_assert(D % 16 == 0, "whole 16-dimension halves per chunk");

  // Value rows v0, v1 (the same row where there is no second key: its probability is zero) as kSums vectors.
  PAGEDLLM_BF16_DOT static void interleave(const at::BFloat16* v0, const at::BFloat16* v1, __m512i* vv) {
    constexpr __mmask32 kLast = D % 32 == 0 ? ~0u : (1u << (D % 32)) - 1;
    for (int64_t c = 0; c < kChunks; ++c) {
      const __mmask32 m = c + 1 == kChunks ? kLast : ~0u;
      const __m512i a = _mm512_maskz_loadu_epi16(m, v0 + c * 32), b = _mm512_maskz_loadu_epi16(m, v1 + c * 32);
      vv[2 * c] = _mm512_unpacklo_epi16(a, b);
      vv[2 * c + 1] = _mm512_unpackhi_epi16(a, b);
    }
  }
  // The n (up to 32) probabilities from p as 16 bf16 pairs, zero past n.
  PAGEDLLM_BF16_DOT static void pairs(const float* p, int64_t n, uint32_t* out) {
    const __mmask16 lo = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    const __mmask16 hi = n >= 32 ? 0xFFFF : n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : 0;
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, p + 16), _mm512_maskz_loadu_ps(lo, p)));
  }
  PAGEDLLM_BF16_DOT static void add(__m512* acc, const __m512i* vv, uint32_t pair) {
    const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
    for (int64_t c = 0; c < kSums; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)vv[c], p);
  }
  PAGEDLLM_BF16_DOT static void store_in_order(const __m512* acc, float* row) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t c = 0; c < kChunks; ++c) {
      _mm512_storeu_ps(row + c * 32, _mm512_permutex2var_ps(acc[2 * c], first, acc[2 * c + 1]));
      _mm512_storeu_ps(row + c * 32 + 16, _mm512_permutex2var_ps(acc[2 * c], second, acc[2 * c + 1]));
    }
  }
};

// Few rows (values_of_rows in bf16): all R rows' sums in registers.
template <int64_t D, int64_t R, typename Dest>
PAGEDLLM_BF16_DOT void values_by_bf16_pairs(const TaskView<at::BFloat16, D>& t, const float* probs, Dest&& dest) {
  using P = Bf16Pairs<D>;
  __m512 acc[R][P::kSums];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < P::kSums; ++c) acc[r][c] = _mm512_setzero_ps();
  uint32_t pairs[R][16];  // row r's probabilities of keys j0 + 2i, j0 + 2i + 1
  for (int64_t j0 = 0; j0 < t.keys; j0 += 32) {
    const int64_t n = std::min<int64_t>(32, t.keys - j0);
    for (int64_t r = 0; r < R; ++r) P::pairs(probs + r * t.keys + j0, n, pairs[r]);
    for (int64_t i = 0; i < n; i += 2) {
      const int64_t j = j0 + i;  // even, so with even block sizes keys j and j + 1 share a block
      if (j % t.block_size == 0 && j + t.block_size < t.keys) t.prefetch_block(t.v_head, j + t.block_size);
      const at::BFloat16* v0 = t.row(t.v_head, j);
      __m512i vv[P::kSums];
      P::interleave(v0, i + 1 < n ? v0 + D : v0, vv);
      for (int64_t r = 0; r < R; ++r) P::add(acc[r], vv, pairs[r][i / 2]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float row[P::kChunks * 32];
    P::store_in_order(acc[r], row);
    dest(r, row);
  }
}

// Many rows (values_by_chunks in bf16): 32 keys' value rows interleaved once for all rows, each row's sums
// (in the unpacks' order) kept in `sums` between chunks.
template <int64_t D, typename Dest>
PAGEDLLM_BF16_DOT void values_by_bf16_pair_chunks(const TaskView<at::BFloat16, D>& t, const float* probs,
                                                  std::vector<float>& sums, Dest&& dest) {
  using P = Bf16Pairs<D>;
  constexpr int64_t W = P::kSums * 16;  // floats of sums per row
  __m512i vt[16][P::kSums];
  sums.assign(t.rows * W, 0.f);
  for (int64_t j0 = 0; j0 < t.keys; j0 += 32) {
    const int64_t n = std::min<int64_t>(32, t.keys - j0);
    for (int64_t i = 0; i < n; i += 2) {
      const at::BFloat16* v0 = t.row(t.v_head, j0 + i);
      P::interleave(v0, i + 1 < n ? v0 + D : v0, vt[i / 2]);
    }
    for (int64_t r = t.first_row_seeing(j0); r < t.rows; ++r) {  // probabilities past a row's end are zero
      uint32_t pairs[16];
      P::pairs(probs + r * t.keys + j0, n, pairs);
      __m512 acc[P::kSums];
      for (int64_t c = 0; c < P::kSums; ++c) acc[c] = _mm512_loadu_ps(sums.data() + r * W + c * 16);
      for (int64_t i = 0; i < n; i += 2) P::add(acc, vt[i / 2], pairs[i / 2]);
      for (int64_t c = 0; c < P::kSums; ++c) _mm512_storeu_ps(sums.data() + r * W + c * 16, acc[c]);
    }
  }
  for (int64_t r = 0; r < t.rows; ++r) {
    float row[P::kChunks * 32];
    __m512 acc[P::kSums];
    for (int64_t c = 0; c < P::kSums; ++c) acc[c] = _mm512_loadu_ps(sums.data() + r * W + c * 16);
    P::store_in_order(acc, row);
    dest(r, row);
  }
}
#endif

// values_of_rows for the task's row count (below kTransposeRows); in bf16 by pairs of keys where the CPU has
// AVX512-BF16.
template <typename T, int64_t D, typename Dest>
void values_of_few_rows(const TaskView<T, D>& t, const float* probs, Dest&& dest) {
  static_assert(kTransposeRows == 8, "one case per row count below kTransposeRows");
  auto run = [&](auto rows) {
    constexpr int64_t R = decltype(rows)::value;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (pagedllm::cpu_has_bf16_dot() && t.block_size % 2 == 0) return values_by_bf16_pairs<D, R>(t, probs, dest);
    }
#endif
    values_of_rows<T, D, R>(t, probs, dest);
  };
  switch (t.rows) {
    case 1: return run(std::integral_constant<int64_t, 1>{});
    case 2: return run(std::integral_constant<int64_t, 2>{});
    case 3: return run(std::integral_constant<int64_t, 3>{});
    case 4: return run(std::integral_constant<int64_t, 4>{});
    case 5: return run(std::integral_constant<int64_t, 5>{});
    case 6: return run(std::integral_constant<int64_t, 6>{});
    default: return run(std::integral_constant<int64_t, 7>{});
  }
}

// Many rows: kLanes value rows at a time, converted to fp32 once for all rows, added into fp32 sums.
template <typename T, int64_t D, typename Dest>
void values_by_chunks(const TaskView<T, D>& t, const float* probs, std::vector<float>& sums, Dest&& dest) {
  constexpr int64_t C = D / kLanes;
  float vt[kLanes * D];
  sums.assign(t.rows * D, 0.f);
  float* sum = sums.data();
  const int64_t rows = t.rows, keys = t.keys;
  for (int64_t j0 = 0; j0 < keys; j0 += kLanes) {
    const int64_t nk = std::min(kLanes, keys - j0);
    for (int64_t jj = 0; jj < nk; ++jj) {
      const T* v = t.row(t.v_head, j0 + jj);
      for (int64_t c = 0; c < C; ++c) load_float(v + c * kLanes).store(vt + jj * D + c * kLanes);
    }
    for (int64_t r = t.first_row_seeing(j0); r < rows; ++r) {  // probabilities past a row's end are zero
      float* sr = sum + r * D;
      const float* pr = probs + r * keys + j0;
      Vec acc[C];
      for (int64_t c = 0; c < C; ++c) acc[c] = Vec::loadu(sr + c * kLanes);
      for (int64_t jj = 0; jj < nk; ++jj) {
        const Vec p(pr[jj]);
        for (int64_t c = 0; c < C; ++c) acc[c] = at::vec::fmadd(p, Vec::loadu(vt + jj * D + c * kLanes), acc[c]);
      }
      for (int64_t c = 0; c < C; ++c) acc[c].store(sr + c * kLanes);
    }
  }
  for (int64_t r = 0; r < rows; ++r) dest(r, sum + r * D);
}

// values_by_chunks, in bf16 by pairs of keys where the CPU has AVX512-BF16.
template <typename T, int64_t D, typename Dest>
void values_of_many_rows(const TaskView<T, D>& t, const float* probs, std::vector<float>& sums, Dest&& dest) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (pagedllm::cpu_has_bf16_dot() && t.block_size % 2 == 0) return values_by_bf16_pair_chunks(t, probs, sums, dest);
  }
#endif
  values_by_chunks(t, probs, sums, dest);
}

// A task's scores: few rows by dot products, many by transposed keys; in bf16 with AVX512-BF16's dot products
// where the CPU has them (on the bf16 queries q), else in fp32 (on the scaled queries qf).
template <typename T, int64_t D, typename HeadRow>
void score_rows(const TaskView<T, D>& t, const T* q, HeadRow&& head_row, const float* qf, float scale,
                float* scores) {
  const bool few = t.rows < kTransposeRows;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (pagedllm::cpu_has_bf16_dot()) {
      alignas(64) static const T zeros[D] = {};
      std::vector<const T*> rows(t.rows + kRowBlock, zeros);  // kRowBlock zero rows past the end
      for (int64_t r = 0; r < t.rows; ++r) rows[r] = q + head_row(r) * D;
      return few ? scores_by_bf16_dot_products(t, rows.data(), scale, scores)
                 : scores_by_transposed_bf16_keys(t, rows.data(), scale, scores);
    }
  }
#endif
  return few ? scores_by_dot_products(t, qf, scores) : scores_by_transposed_keys(t, qf, scores);
}

// The step's tasks: each sequence's tiles of query tokens for each KV head; with fewer than kTasksPerThread
// tasks per thread, each decode's keys in pieces of whole blocks (at least kMinPieceKeys keys), about as many
// as make up the shortfall. `pieces` counts the split tasks' pieces.
std::vector<Task> make_tasks(const int64_t* query_start, const int64_t* context_lens, int64_t num_seqs,
                             int64_t kv_heads, int64_t block_size, int64_t& pieces) {
  int64_t plain = 0;
  for (int64_t b = 0; b < num_seqs; ++b) plain += kv_heads * ((query_start[b + 1] - query_start[b] + kTile - 1) / kTile);
  const int64_t wanted = kTasksPerThread * at::get_num_threads();
  const int64_t split = plain > 0 && plain < wanted ? (wanted + plain - 1) / plain : 1;  // pieces per decode
  std::vector<Task> tasks;
  pieces = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t len = query_start[b + 1] - query_start[b], ctx = context_lens[b];
    int64_t piece = ctx;
    if (len == 1 && split > 1) {
      const int64_t keys = std::max(kMinPieceKeys, (ctx + split - 1) / split);
      piece = (keys + block_size - 1) / block_size * block_size;
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      if (piece < ctx) {
        for (int64_t k0 = 0; k0 < ctx; k0 += piece) tasks.push_back({b, h, 0, 1, k0, std::min(piece, ctx - k0), pieces++});
        continue;
      }
      for (int64_t i = 0; i < len; i += kTile) {
        const int64_t count = std::min(kTile, len - i);
        tasks.push_back({b, h, i, count, 0, ctx - len + i + count, -1});
      }
    }
  }
  return tasks;
}

template <typename T, int64_t D>
void attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* query_start,
               const int64_t* context_lens, T* out, int64_t num_seqs, int64_t heads, int64_t kv_heads,
               int64_t num_blocks, int64_t block_size, int64_t width, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t head_stride = num_blocks * block_size * D;  // one KV head's slice of the pool

  int64_t pieces = 0;
  const std::vector<Task> tasks = make_tasks(query_start, context_lens, num_seqs, kv_heads, block_size, pieces);
  std::vector<double> work;  // running total of query tokens x keys, up to and including each task
  for (const Task& task : tasks) work.push_back((work.empty() ? 0. : work.back()) + task.count * task.keys);
  // Each thread takes a contiguous run of tasks (so it streams through its own part of the pool) holding
  // about an equal share of the work.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  std::vector<int64_t> bounds(threads + 1, static_cast<int64_t>(tasks.size()));
  bounds[0] = 0;
  for (int64_t t = 1; t < threads; ++t)
    bounds[t] = std::upper_bound(work.begin(), work.end(), work.back() * t / threads) - work.begin();
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
      auto head_row = [&](int64_t r) { return (token0 + r / group) * heads + task.head * group + r % group; };
      own_stats.resize(t.rows * 2);
      float* row_stats = task.part >= 0 ? stats.data() + task.part * group * 2 : own_stats.data();
      auto dest = [&](int64_t r, const float* row) {  // row r's value sums, not yet divided by its softmax sum
        if (task.part >= 0) {
          std::copy(row, row + D, partial.data() + (task.part * group + r) * D);
          return;
        }
        T* dst = out + head_row(r) * D;
        const float inv = 1.f / row_stats[2 * r + 1];
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(row[d] * inv);
      };

      qf.resize((t.rows + kRowBlock) * D);
      std::fill(qf.begin() + t.rows * D, qf.end(), 0.f);
      for (int64_t r = 0; r < t.rows; ++r)
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(q[head_row(r) * D + d]) * scale;
      scores.resize(t.rows * t.keys);
      score_rows(t, q, head_row, qf.data(), scale, scores.data());
      softmax_rows(t, scores.data(), row_stats);
      if (t.rows < kTransposeRows) {
        values_of_few_rows(t, scores.data(), dest);
      } else {
        values_of_many_rows(t, scores.data(), sums, dest);
      }
    }
  });
  if (pieces == 0) return;
  // Merge each split decode's pieces (consecutive tasks of one sequence and KV head): their value sums, each
  // relative to its own maximum, rescaled by exp(max_p - max) and divided by the rescaled sums' total.
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
        T* dst = out + (query_start[first.seq] * heads + first.head * group + r) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d] / total);
      }
    }
  });
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
  switch (q.scalar_type()) {
    case at::kFloat: launch<float>(qc, k_cache, v_cache, tables, starts, lens, out, scale); break;
    case at::kBFloat16: launch<at::BFloat16>(qc, k_cache, v_cache, tables, starts, lens, out, scale); break;
    case at::kHalf: launch<at::Half>(qc, k_cache, v_cache, tables, starts, lens, out, scale); break;
    default: TORCH_CHECK(false, "paged_attention: unsupported dtype ", q.scalar_type());
  }
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
