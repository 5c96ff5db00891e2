// Paged attention's scores q . k for one task (attention_tasks.h), by the shape of its work: few rows (decodes)
// by a dot product per row and key, many rows (prompt tiles) by transposing the keys so that each row's scores
// are a small matrix product. In bf16 on CPUs with AVX512-BF16 by its pairwise dot products, else in fp32.
#pragma once

#include "attention_tasks.h"
#include "cpu_vec.h"
#include "ops.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace pagedllm::cpu {

// Few rows (decodes): scores[r][j] = q_r . k_j as a dot product per row and key, each key converted once for all
// rows; a row's products of kLanes keys are summed across their lanes together (sum_each: about one instruction a
// score, where a horizontal sum of its own took about eight).
template <typename T, int64_t D>
void scores_by_dot_products(const TaskView<T, D>& t, const float* qf, float* scores) {
  constexpr int64_t C = D / kLanes;
  Vec part[kTransposeRows][kLanes];  // row r's products of the current kLanes keys, not yet summed
  for (auto& row : part)
    for (Vec& v : row) v = Vec(0.f);
  t.for_each_row(false, [&](int64_t j, const T* k) {
    Vec kv[C];
    for (int64_t c = 0; c < C; ++c) kv[c] = load_float(k + c * kLanes);
    const int64_t i = j % kLanes, first = t.first_row_seeing(j);
    for (int64_t r = 0; r < t.rows; ++r) {
      const float* qr = qf + r * D;
      Vec s[2] = {Vec::loadu(qr) * kv[0], Vec(0.f)};  // two chains of dependent FMAs, half as long
      for (int64_t c = 1; c < C; ++c) s[c % 2] = at::vec::fmadd(Vec::loadu(qr + c * kLanes), kv[c], s[c % 2]);
      part[r][i] = r < first ? Vec(0.f) : s[0] + s[1];  // rows before `first` do not see key j
    }
    if (i == kLanes - 1 || j == t.keys - 1)
      for (int64_t r = 0; r < t.rows; ++r) sum_each(part[r]).store(scores + r * t.keys + j - i, i + 1);
  });
}

#if defined(CPU_CAPABILITY_AVX512)
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
    if (j0 % t.block_size == 0) t.prefetch_for_keys(j0);
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

// Many rows in bf16, on CPUs with AVX512-BF16: as scores_by_transposed_keys, but keys are transposed as pairs
// of dimensions (32-bit elements kt[p][j] = key j's dimensions 2p, 2p + 1), so each row's scores for them are
// D / 2 pairwise bf16 dot products with its broadcast query pair: half the instructions of fp32 FMAs and no
// conversion of the keys. A register tile of kRowBlock rows x kKeyTile keys (kTileAccumulators) loads each
// transposed key vector once for all its rows and each query pair once for all its keys: with one vector of
// 16 keys per tile, the loads (five per four dot products) held the dot products back. q[r] is row r's query
// in bf16, unscaled; q has kRowBlock zero rows past its end.
template <int64_t D>
PAGEDLLM_BF16_DOT void scores_by_transposed_bf16_keys(
    const TaskView<at::BFloat16, D>& t, const at::BFloat16* const* q, float scale, float* scores) {
  constexpr int64_t P = D / 2;  // dimension pairs per key
  constexpr int64_t kKeyTile = 16 * kKeyVecs;
  alignas(64) uint32_t kt[P * kKeyTile];  // kt[p * kKeyTile + j]
  const int64_t rows = t.rows, keys = t.keys;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < keys; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, keys - j0);
    for (int64_t v = 0; v < kKeyVecs; ++v) {
      const uint32_t* k[16];
      for (int64_t i = 0; i < 16; ++i)  // past the end: repeat the last key (its score is not stored)
        k[i] = reinterpret_cast<const uint32_t*>(t.row(t.k_head, j0 + std::min(16 * v + i, nk - 1)));
      for (int64_t c = 0; c < P; c += 16) {  // 16 x 16 32-bit transposes
        const __mmask16 cols = P - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (P - c)) - 1);
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(cols, k[i] + c));
        transpose16(r);
        for (int64_t i = 0; i < std::min<int64_t>(16, P - c); ++i) _mm512_store_ps(kt + (c + i) * kKeyTile + 16 * v, r[i]);
      }
    }
    for (int64_t r0 = t.first_row_seeing(j0); r0 < rows; r0 += kRowBlock) {
      __m512 acc[kRowBlock][kKeyVecs];
      const uint32_t* qp[kRowBlock];
      for (int64_t i = 0; i < kRowBlock; ++i) {
        qp[i] = reinterpret_cast<const uint32_t*>(q[r0 + i]);
        for (int64_t v = 0; v < kKeyVecs; ++v) acc[i][v] = _mm512_setzero_ps();
      }
      for (int64_t p = 0; p < P; ++p) {
        __m512bh kd[kKeyVecs];
        for (int64_t v = 0; v < kKeyVecs; ++v) kd[v] = (__m512bh)_mm512_load_si512(kt + p * kKeyTile + 16 * v);
        for (int64_t i = 0; i < kRowBlock; ++i) {
          const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[i][p]));
          for (int64_t v = 0; v < kKeyVecs; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], kd[v], qb);
        }
      }
      for (int64_t i = 0; i < std::min(kRowBlock, rows - r0); ++i)
        for (int64_t v = 0; v < kKeyVecs && 16 * v < nk; ++v) {
          const int64_t left = nk - 16 * v;
          _mm512_mask_storeu_ps(scores + (r0 + i) * keys + j0 + 16 * v,
                                left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1),
                                _mm512_mul_ps(acc[i][v], vscale));
        }
    }
  }
}
#endif

// Many rows (prompt tiles): a tile of keys transposed once into kt[d][j], so each row's scores for them are D
// broadcast FMAs (a small matrix product) with no horizontal sums. kRowBlock rows x kKeyVecs key vectors are
// in registers at once, so each loaded key vector serves all the rows and each broadcast query value all the
// keys (as the bf16 kernel above). qf has kRowBlock zero rows past its end.
template <typename T, int64_t D>
void scores_by_transposed_keys(const TaskView<T, D>& t, const float* qf, float* scores) {
  constexpr int64_t kKeyTile = kKeyVecs * kLanes;
  float kt[D * kKeyTile];
  const int64_t rows = t.rows, keys = t.keys;
  for (int64_t j0 = 0; j0 < keys; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, keys - j0);
    for (int64_t jj = 0; jj < kKeyTile; ++jj) {
      const T* k = t.row(t.k_head, j0 + std::min(jj, nk - 1));  // past the end: repeat the last key (unused)
      for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile + jj] = static_cast<float>(k[d]);
    }
    for (int64_t r0 = t.first_row_seeing(j0); r0 < rows; r0 += kRowBlock) {
      Vec acc[kRowBlock][kKeyVecs];
      for (int64_t i = 0; i < kRowBlock; ++i)
        for (int64_t v = 0; v < kKeyVecs; ++v) acc[i][v] = Vec(0.f);
      for (int64_t d = 0; d < D; ++d) {
        Vec kd[kKeyVecs];
        for (int64_t v = 0; v < kKeyVecs; ++v) kd[v] = Vec::loadu(kt + d * kKeyTile + v * kLanes);
        for (int64_t i = 0; i < kRowBlock; ++i) {
          const Vec qd(qf[(r0 + i) * D + d]);
          for (int64_t v = 0; v < kKeyVecs; ++v) acc[i][v] = at::vec::fmadd(qd, kd[v], acc[i][v]);
        }
      }
      for (int64_t i = 0; i < std::min(kRowBlock, rows - r0); ++i)
        for (int64_t v = 0; v < kKeyVecs && v * kLanes < nk; ++v)
          acc[i][v].store(scores + (r0 + i) * keys + j0 + v * kLanes, std::min(kLanes, nk - v * kLanes));
    }
  }
}

// A task's scores: few rows by dot products, many by transposed keys; in bf16 with AVX512-BF16's dot products
// where the CPU has them (on the bf16 queries q), else in fp32 (on the scaled queries qf).
template <typename T, int64_t D, typename HeadRow>
void score_rows(const TaskView<T, D>& t, const T* q, HeadRow&& head_row, const float* qf, float scale,
                float* scores) {
  const bool few = t.rows < kTransposeRows;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (cpu_has_bf16_dot()) {
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

}  // namespace pagedllm::cpu
