// Quantized weights tiled for int8 dot products: the decode GEMV multiplies int8 activations, as llama.cpp's CPU
// kernels and vLLM's GGUF kernels do, with 4-bit or int8 weights, 64 products per instruction on AVX512-VNNI
// (vpdpbusd) where bf16 pairs give 32 (the 4-bit GEMV on bf16 pairs was compute-bound on this machine's cores), and
// on AVX2 from vpmaddubsw and vpmaddwd (quant_gemv_tiled_avx2.h; without it a 4-bit decode there converted every
// value to fp32 and ran at 5 % of the memory's bandwidth).
//
// Layout: the rows' 32-bit words interleaved over 16 output features. A tile of 16 features holds, for each word
// position w of a row (4 int8 values, or 8 nibbles of a 4-bit block: GGUF's byte j holds values j and j + 16), the
// 16 features' words in turn: values [N / 16, words, 16, 4 bytes], scales and offsets [N / 16, groups, 16]. So one
// 64-byte vector is one word position of 16 features, multiplied with one broadcast word of x, and the 16 fp32
// lanes of the products are the 16 features' sums: no horizontal sums, and a group's 16 scales are one load.
//
// x is quantized per 16 values (half a weight block; the low nibbles of a 4-bit block and the first four words of
// an int8 one are its first 16 values): d = max |x| / 127, q = x * (127 / max |x|) rounded to nearest even. Per
// 16 values and feature, sum x w = d s sum q_x q_w (+ o sum x per group, the offsets, with x's exact sums). int8
// weights are made unsigned (q + 128) for vpdpbusd, and 128 sum q_x taken off again, exactly, in the integers.
#pragma once

#include "ops.h"
#include "quant_gemv.h"

#include <vector>

namespace pagedllm::cpu {

constexpr int64_t kQuantBlock = 32;    // weight values per block (a group holds whole blocks)
constexpr int64_t kActBlock = 16;      // activation values per int8 scale

// Whether this CPU runs the tiled kernels: AVX512-VNNI (and AVX512-BF16 for the batches' matrix product) where the
// kernels are built for AVX-512, AVX2 where they are built for it.
inline bool cpu_has_int8_dot() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avx512vnni") && cpu_has_bf16_dot();
  return has;
#elif defined(CPU_CAPABILITY_AVX2)
  return true;
#else
  return false;
#endif
}

// x [rows, k] quantized per kActBlock values.
struct QuantizedInput {
  std::vector<int8_t> q;          // [rows, k]
  std::vector<float> scale;       // [rows, k / 16]
  std::vector<int32_t> unsigned_; // [rows, k / 16]: 128 * sum q, what unsigned int8 weights (q + 128) add
  std::vector<float> sums;        // [rows, groups]: the exact sums of x per group, for the offsets
};

// A QuantizedInput's rows from one on, as the tile kernels read them.
struct QuantizedRows {
  const int8_t* q;
  const float* scale;
  const int32_t* unsigned_;
  const float* sums;

  QuantizedRows(const QuantizedInput& in, int64_t row0, int64_t k, int64_t groups)
      : q(in.q.data() + row0 * k), scale(in.scale.data() + row0 * k / kActBlock),
        unsigned_(in.unsigned_.data() + row0 * k / kActBlock),
        sums(in.sums.empty() ? nullptr : in.sums.data() + row0 * groups) {}
};

#if defined(CPU_CAPABILITY_AVX512)
#define PAGEDLLM_INT8_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

// kActBlock values of x as int8 into q; returns their scale d, and 128 * sum q in unsigned_sum.
template <typename T>
PAGEDLLM_INT8_DOT inline float quantize_block(const T* x, int8_t* q, int32_t& unsigned_sum) {
  const __m512 v = __m512(load_float(x));
  const float amax = _mm512_reduce_max_ps(_mm512_andnot_ps(_mm512_set1_ps(-0.f), v));
  const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qi));
  unsigned_sum = 128 * _mm512_reduce_add_epi32(qi);
  return amax / 127.f;
}

// A block's 32 values of 16 features as eight vectors of unsigned bytes, vector j multiplying x's word j (values
// 4j .. 4j + 3 of the block): 4-bit: four loads, each split into its low nibbles (words 0-3) and high ones (4-7);
// int8: eight loads, q + 128.
template <typename W>
struct TileBlock {
  static constexpr int64_t kBytes = std::is_same_v<W, Int4> ? 256 : 512;
  __m512i v[8];

  PAGEDLLM_INT8_DOT TileBlock(const uint8_t* p) {
    for (int64_t off = 0; off < kBytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p + off) + kPrefetchBytes, _MM_HINT_T0);
    if constexpr (std::is_same_v<W, Int4>) {
      const __m512i nibble = _mm512_set1_epi8(0x0F);
      for (int j = 0; j < 4; ++j) {
        const __m512i raw = _mm512_loadu_si512(p + 64 * j);
        v[j] = _mm512_and_si512(raw, nibble);
        v[4 + j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      }
    } else {
      const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
      for (int j = 0; j < 8; ++j) v[j] = _mm512_xor_si512(_mm512_loadu_si512(p + 64 * j), flip);
    }
  }
};

// Tiles [t0, t1) of y [M, n_out] = x W^T (+ bias).
template <typename T, typename W, int64_t M>
PAGEDLLM_INT8_DOT void tiled_gemv_tiles(const QuantizedRows& in, const QuantWeight<W>& w, const T* bias, T* y,
                                        int64_t n_out, int64_t t0, int64_t t1) {
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  const int64_t k = w.k, groups = w.groups, blocks = k / kQuantBlock, per_group = blocks / groups;
  const int64_t halves = k / kActBlock;
  const int64_t tile_bytes = kTileFeatures * (kInt8 ? k : k / 2);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = reinterpret_cast<const uint8_t*>(w.values) + t * tile_bytes;
    __m512 acc[M];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t sg = (t * groups + g) * kTileFeatures;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scale + sg)));
      if (w.offset != nullptr) {
        const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.offset + sg)));
        for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(in.sums[m * groups + g]), acc[m]);
      }
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
        const TileBlock<W> block(wt + b * TileBlock<W>::kBytes);
        for (int64_t m = 0; m < M; ++m) {
          const int32_t* xw = reinterpret_cast<const int32_t*>(in.q + m * k + b * kQuantBlock);
          for (int h = 0; h < 2; ++h) {  // the block's two halves of 16 values, each with its activation scale
            const int64_t a = m * halves + 2 * b + h;
            __m512i dot = _mm512_setzero_si512();
            for (int j = 4 * h; j < 4 * h + 4; ++j)
              dot = _mm512_dpbusd_epi32(dot, block.v[j], _mm512_set1_epi32(xw[j]));
            if constexpr (kInt8) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(in.unsigned_[a]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(in.scale[a])), acc[m]);
          }
        }
      }
    }
    alignas(64) float out[kTileFeatures];
    for (int64_t m = 0; m < M; ++m) {
      _mm512_store_ps(out, acc[m]);
      T* yr = y + m * n_out + t * kTileFeatures;
      for (int64_t f = 0; f < kTileFeatures; ++f)
        yr[f] = static_cast<T>(bias != nullptr ? out[f] + static_cast<float>(bias[t * kTileFeatures + f]) : out[f]);
    }
  }
}

// For the batches' matrix product (quant_gemm.h): 16 features of a tiled W, K values [i, i + 32), dequantized as
// s * q + o in bf16 pairs: r[p] lane f holds values i + 2p and i + 2p + 1 of feature f.
template <typename W>
PAGEDLLM_BF16_DOT inline void dequantize_tile_pairs(const QuantWeight<W>& w, int64_t tile, int64_t i, __m512 (&r)[16]) {
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  const int64_t g = i / (w.k / w.groups), sg = (tile * w.groups + g) * kTileFeatures;
  const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scale + sg)));
  const __m512 o = w.offset != nullptr
                       ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.offset + sg)))
                       : _mm512_setzero_ps();
  const uint8_t* p = reinterpret_cast<const uint8_t*>(w.values) + tile * kTileFeatures * (kInt8 ? w.k : w.k / 2) +
                     (kInt8 ? i : i / 2) * kTileFeatures;
  // value v of the block: its byte's lane bits (word v / 4, byte v % 4; 4-bit: values 16.. in the high nibbles)
  const auto value = [&](int v) PAGEDLLM_BF16_DOT {
    __m512i q;
    if constexpr (kInt8) {
      q = _mm512_srai_epi32(_mm512_slli_epi32(_mm512_loadu_si512(p + 64 * (v / 4)), 24 - 8 * (v % 4)), 24);
    } else {
      const int u = v % 16;
      q = _mm512_and_si512(_mm512_srli_epi32(_mm512_loadu_si512(p + 64 * (u / 4)), 8 * (u % 4) + (v >= 16 ? 4 : 0)),
                           _mm512_set1_epi32(0x0F));
    }
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, o);
  };
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int pr = 0; pr < 16; ++pr)
    r[pr] = _mm512_castsi512_ps(_mm512_permutexvar_epi16(
        pairs, (__m512i)_mm512_cvtne2ps_pbh(value(2 * pr + 1), value(2 * pr))));
}
#endif

}  // namespace pagedllm::cpu

#include "quant_gemv_tiled_avx2.h"

namespace pagedllm::cpu {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <typename T>
PAGEDLLM_INT8_DOT QuantizedInput quantize_input(const T* x, int64_t rows, int64_t k, int64_t groups, bool offsets) {
  const int64_t blocks = rows * k / kActBlock;
  QuantizedInput in{std::vector<int8_t>(rows * k), std::vector<float>(blocks), std::vector<int32_t>(blocks),
                    offsets ? group_sums(x, rows, k, groups) : std::vector<float>()};
  for (int64_t b = 0; b < blocks; ++b)  // x's rows back to back: a row holds whole blocks
    in.scale[b] = quantize_block(x + b * kActBlock, in.q.data() + b * kActBlock, in.unsigned_[b]);
  return in;
}

// Tiles a thread multiplies with every chunk of rows before the next ones: their weights (48 KB of 4-bit values at
// K = 1,536) stay in the core's L2 meanwhile, so a batch streams them from memory once.
constexpr int64_t kTilesPerPass = 4;

// y [rows, n_out] = x W^T (+ bias) for a tiled W: x quantized once, then each few tiles times every chunk of up to
// kMaxQuantRows rows (each row's result computed alone, whatever the rows beside it).
template <typename T, typename W>
void tiled_gemm(const T* x, int64_t rows, const QuantWeight<W>& w, const T* bias, T* y, int64_t n_out) {
  const auto in = quantize_input(x, rows, w.k, w.groups, w.offset != nullptr);
  at::parallel_for(0, n_out / kTileFeatures, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t += kTilesPerPass)
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxQuantRows)
        with_rows(std::min(kMaxQuantRows, rows - r0), [&](auto m) {
          tiled_gemv_tiles<T, W, decltype(m)::value>(QuantizedRows(in, r0, w.k, w.groups), w, bias, y + r0 * n_out,
                                                     n_out, t, std::min(t + kTilesPerPass, end));
        });
  });
}
#endif

}  // namespace pagedllm::cpu
