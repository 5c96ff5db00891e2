// y = x W^T for bf16 rows and a quantized W, for more rows than the GEMVs take (decode batches, prefill), on
// AVX512-BF16. W is dequantized one panel of 64 output features at a time into a buffer the core's L2 holds, in the
// layout vdpbf16ps multiplies (each vector: a pair of K values for 16 features), and every row of x is multiplied
// with the panel before the next one is dequantized. Dequantizing the whole matrix for torch's matmul instead
// wrote it out beyond L2 and read it back: measured on the embedded model's 30 layers at 9-64 rows, 4-bit took
// 0.93-1.02x bf16's time that way and 0.80-0.90x this way. The values multiplied are the dequantized matrix's (bf16
// of s * q + o), summed in fp32.
#pragma once

#include "quant_gemv_tiled.h"

#include <vector>

namespace pagedllm::cpu {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kPanel = 64;     // output features per panel: four vectors of 16
constexpr int64_t kTileRows = 6;   // rows of x per register tile (6 x 4 fp32 accumulators)

// Features [n0, n0 + 16 * vectors) of W as bf16 pairs: panel[p * kPanel + f] holds K values 2p and 2p + 1 of
// feature n0 + f. sf, of: room for the panel's scales and offsets in fp32 (converted a row at a time).
template <typename W>
PAGEDLLM_BF16_DOT void dequantize_panel(const QuantWeight<W>& w, int64_t n0, int64_t vectors, uint32_t* panel,
                                        float* sf, float* of) {
  __m512 r[16];  // 16 features' 32 values as bf16 pairs (16 32-bit lanes each)
  const auto store = [&](int64_t v, int64_t i) PAGEDLLM_BF16_DOT {
    for (int64_t j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (i / 2 + j) * kPanel + 16 * v, _mm512_castps_si512(r[j]));
  };
  if (w.tiled) {
    for (int64_t v = 0; v < vectors; ++v)
      for (int64_t i = 0; i < w.k; i += 32) dequantize_tile_pairs(w, n0 / kTileFeatures + v, i, r), store(v, i);
    return;
  }
  const int64_t groups = w.groups, g_size = w.k / groups;
  for (int64_t f = 0; f < 16 * vectors; ++f) {
    halves_to_float(w.scale + (n0 + f) * groups, sf + f * groups, groups);
    if (w.offset != nullptr) halves_to_float(w.offset + (n0 + f) * groups, of + f * groups, groups);
  }
  for (int64_t v = 0; v < vectors; ++v)
    for (int64_t i = 0; i < w.k; i += 32) {
      const int64_t g = i / g_size;
      for (int64_t f = 0; f < 16; ++f) {
        const int64_t at = (16 * v + f) * groups + g;
        const __m512 o = w.offset != nullptr ? _mm512_set1_ps(of[at]) : _mm512_setzero_ps();
        r[f] = _mm512_castsi512_ps(
            dequantize_block_bf16(w.values + (n0 + 16 * v + f) * w.row_stride(), i, _mm512_set1_ps(sf[at]), o));
      }
      transpose16(r);  // r[j]: values i + 2j, i + 2j + 1 of the 16 features
      store(v, i);
    }
}

// y rows [0, R), features [0, 16 V) (y and bias at the panel's first feature) from R rows of x and the panel.
template <int64_t R, int64_t V>
PAGEDLLM_BF16_DOT void panel_tile(const at::BFloat16* x, int64_t k, const uint32_t* panel, const at::BFloat16* bias,
                                  at::BFloat16* y, int64_t n_out) {
  __m512 acc[R][V];
  for (int64_t m = 0; m < R; ++m)
    for (int64_t v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_ps();
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);  // pairs of x values
  for (int64_t p = 0; p < k / 2; ++p) {
    __m512bh b[V];
    for (int64_t v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(panel + p * kPanel + 16 * v);
    for (int64_t m = 0; m < R; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(xp[m * (k / 2) + p]);
      for (int64_t v = 0; v < V; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, b[v]);
    }
  }
  for (int64_t v = 0; v < V; ++v) {
    const __m512 bv = bias != nullptr ? __m512(load_float(bias + 16 * v)) : _mm512_setzero_ps();
    for (int64_t m = 0; m < R; ++m)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * n_out + 16 * v),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][v], bv)));
  }
}

// Calls f with (R, V) as compile-time constants, R in 1 .. kTileRows and V in 1 .. 4.
template <int64_t R = 1, typename F>
void with_tile(int64_t rows, int64_t vectors, F&& f) {
  if constexpr (R < kTileRows) {
    if (rows > R) return with_tile<R + 1>(rows, vectors, f);
  }
  switch (vectors) {
    case 1: f(std::integral_constant<int64_t, R>{}, std::integral_constant<int64_t, 1>{}); break;
    case 2: f(std::integral_constant<int64_t, R>{}, std::integral_constant<int64_t, 2>{}); break;
    case 3: f(std::integral_constant<int64_t, R>{}, std::integral_constant<int64_t, 3>{}); break;
    default: f(std::integral_constant<int64_t, R>{}, std::integral_constant<int64_t, 4>{}); break;
  }
}

// x [rows, K] bf16; groups of a multiple of 32 values; n_out a multiple of 16. The panels are split over the threads.
template <typename W>
PAGEDLLM_BF16_DOT void quant_gemm_bf16(const at::BFloat16* x, int64_t rows, const QuantWeight<W>& w,
                                       const at::BFloat16* bias, at::BFloat16* y, int64_t n_out) {
  const int64_t k = w.k, panels = (n_out + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> panel(k / 2 * kPanel);
    std::vector<float> sf(kPanel * w.groups), of(kPanel * w.groups);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, vectors = std::min<int64_t>(4, (n_out - n0) / 16);
      dequantize_panel(w, n0, vectors, panel.data(), sf.data(), of.data());
      for (int64_t m0 = 0; m0 < rows; m0 += kTileRows)
        with_tile(std::min(kTileRows, rows - m0), vectors, [&](auto r, auto v) {
          panel_tile<decltype(r)::value, decltype(v)::value>(x + m0 * k, k, panel.data(),
                                                             bias != nullptr ? bias + n0 : nullptr,
                                                             y + m0 * n_out + n0, n_out);
        });
    }
  });
}
#endif

}  // namespace pagedllm::cpu
