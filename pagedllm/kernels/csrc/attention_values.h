// Paged attention's value sums out_r = sum_j p[r][j] v_j for one task (attention_tasks.h): few rows with all
// sums in registers, many rows in chunks of keys converted once for all rows. In bf16 on CPUs with AVX512-BF16
// by its pairwise dot products over pairs of keys, else in fp32. Each finished row goes to dest(r, row).
#pragma once

#include "attention_tasks.h"
#include "cpu_vec.h"
#include "ops.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace pagedllm::cpu {

// Few rows: out_r = sum_j p[r][j] v_j for all R rows at once, each value row converted to fp32 once per pass and
// the sums in registers (probabilities past a row's visible keys are zero). A pass covers the dimensions whose R
// rows of sums fit the registers beside their value vectors: with all of them at once, R = 3 rows of D = 64 on AVX2
// (16 registers of 8 lanes) kept 24 sums and spilled them on every key.
template <typename T, int64_t D, int64_t R, typename Dest>
void values_of_rows(const TaskView<T, D>& t, const float* probs, Dest&& dest) {
  constexpr int64_t C = D / kLanes;
  constexpr int64_t kRegisters = kLanes >= 16 ? 30 : 14;  // of 32 (AVX-512) or 16, less the probability and a spare
  constexpr int64_t CC = [] {  // vectors per pass: a power of two (so dividing C), with R + 1 of each in registers
    int64_t cc = 1;
    while (2 * cc <= C && 2 * cc * (R + 1) <= kRegisters) cc *= 2;
    return cc;
  }();
  float rows[R][D];
  for (int64_t c0 = 0; c0 < C; c0 += CC) {
    Vec acc[R][CC];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < CC; ++c) acc[r][c] = Vec(0.f);
    t.for_each_row(true, [&](int64_t j, const T* v) {
      Vec vf[CC];
      for (int64_t c = 0; c < CC; ++c) vf[c] = load_float(v + (c0 + c) * kLanes);
      for (int64_t r = 0; r < R; ++r) {
        const Vec p(probs[r * t.keys + j]);
        for (int64_t c = 0; c < CC; ++c) acc[r][c] = at::vec::fmadd(p, vf[c], acc[r][c]);
      }
    }, c0 == 0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < CC; ++c) acc[r][c].store(rows[r] + (c0 + c) * kLanes);
  }
  for (int64_t r = 0; r < R; ++r) dest(r, rows[r]);
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
// (in the unpacks' order) kept in `sums` between chunks. A block of R rows goes through the chunk together
// (R x kSums accumulators, at most kTileAccumulators), so each interleaved value vector is loaded once for all of them:
// row by row, the loads (five per four dot products) held the dot products back.
template <int64_t D, typename Dest>
PAGEDLLM_BF16_DOT void values_by_bf16_pair_chunks(const TaskView<at::BFloat16, D>& t, const float* probs,
                                                  std::vector<float>& sums, Dest&& dest) {
  using P = Bf16Pairs<D>;
  constexpr int64_t W = P::kSums * 16;  // floats of sums per row
  constexpr int64_t R = std::max<int64_t>(1, kTileAccumulators / P::kSums);
  __m512i vt[16][P::kSums];
  sums.assign((t.rows + R) * W, 0.f);  // R rows of slack: a block past the last row computes on zero pairs
  for (int64_t j0 = 0; j0 < t.keys; j0 += 32) {
    const int64_t n = std::min<int64_t>(32, t.keys - j0);
    for (int64_t i = 0; i < n; i += 2) {
      const at::BFloat16* v0 = t.row(t.v_head, j0 + i);
      P::interleave(v0, i + 1 < n ? v0 + D : v0, vt[i / 2]);
    }
    for (int64_t r0 = t.first_row_seeing(j0); r0 < t.rows; r0 += R) {  // probabilities past a row's end are zero
      uint32_t pairs[R][16] = {};
      __m512 acc[R][P::kSums];
      for (int64_t i = 0; i < R; ++i) {
        if (r0 + i < t.rows) P::pairs(probs + (r0 + i) * t.keys + j0, n, pairs[i]);
        for (int64_t c = 0; c < P::kSums; ++c) acc[i][c] = _mm512_loadu_ps(sums.data() + (r0 + i) * W + c * 16);
      }
      for (int64_t k = 0; k < (n + 1) / 2; ++k)
        for (int64_t i = 0; i < R; ++i) P::add(acc[i], vt[k], pairs[i][k]);
      for (int64_t i = 0; i < R; ++i)
        for (int64_t c = 0; c < P::kSums; ++c) _mm512_storeu_ps(sums.data() + (r0 + i) * W + c * 16, acc[i][c]);
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
      if (cpu_has_bf16_dot() && t.block_size % 2 == 0) return values_by_bf16_pairs<D, R>(t, probs, dest);
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

// Many rows: kLanes value rows at a time, converted to fp32 once for all rows, added into fp32 sums. A block of
// R rows goes through them together (R x C accumulators), so each value vector is loaded once for all R.
template <typename T, int64_t D, typename Dest>
void values_by_chunks(const TaskView<T, D>& t, const float* probs, std::vector<float>& sums, Dest&& dest) {
  constexpr int64_t C = D / kLanes;
  constexpr int64_t R = std::max<int64_t>(1, kTileAccumulators / C);
  float vt[kLanes * D];
  sums.assign((t.rows + R) * D, 0.f);  // R rows of slack: a block past the last row adds zero probabilities
  float* sum = sums.data();
  const int64_t rows = t.rows, keys = t.keys;
  for (int64_t j0 = 0; j0 < keys; j0 += kLanes) {
    const int64_t nk = std::min(kLanes, keys - j0);
    for (int64_t jj = 0; jj < nk; ++jj) {
      const T* v = t.row(t.v_head, j0 + jj);
      for (int64_t c = 0; c < C; ++c) load_float(v + c * kLanes).store(vt + jj * D + c * kLanes);
    }
    for (int64_t r0 = t.first_row_seeing(j0); r0 < rows; r0 += R) {  // probabilities past a row's end are zero
      const int64_t nr = std::min(R, rows - r0);
      Vec acc[R][C];
      for (int64_t i = 0; i < R; ++i)
        for (int64_t c = 0; c < C; ++c) acc[i][c] = Vec::loadu(sum + (r0 + i) * D + c * kLanes);
      for (int64_t jj = 0; jj < nk; ++jj) {
        Vec vv[C];
        for (int64_t c = 0; c < C; ++c) vv[c] = Vec::loadu(vt + jj * D + c * kLanes);
        for (int64_t i = 0; i < R; ++i) {
          const Vec p(i < nr ? probs[(r0 + i) * keys + j0 + jj] : 0.f);
          for (int64_t c = 0; c < C; ++c) acc[i][c] = at::vec::fmadd(p, vv[c], acc[i][c]);
        }
      }
      for (int64_t i = 0; i < R; ++i)
        for (int64_t c = 0; c < C; ++c) acc[i][c].store(sum + (r0 + i) * D + c * kLanes);
    }
  }
  for (int64_t r = 0; r < rows; ++r) dest(r, sum + r * D);
}

// values_by_chunks, in bf16 by pairs of keys where the CPU has AVX512-BF16.
template <typename T, int64_t D, typename Dest>
void values_of_many_rows(const TaskView<T, D>& t, const float* probs, std::vector<float>& sums, Dest&& dest) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (cpu_has_bf16_dot() && t.block_size % 2 == 0) return values_by_bf16_pair_chunks(t, probs, sums, dest);
  }
#endif
  values_by_chunks(t, probs, sums, dest);
}

}  // namespace pagedllm::cpu
