// The tiled GEMV (quant_gemv_tiled.h) on AVX2, for CPUs without AVX-512 (most desktops). A tile's 16 features are
// two halves of 8 (a 256-bit vector holds one word position of 8 features), and vpdpbusd's sum of four byte
// products per 32-bit lane is built from vpmaddubsw (unsigned x signed bytes, pairs summed into 16 bits) and
// vpmaddwd with ones (pairs of those into 32 bits), as llama.cpp's AVX2 kernels do. 4-bit values are at most 15, so
// a half block's four words add up in 16 bits before widening (4 x 2 x 15 x 127 < 2^15). int8 weights, signed as
// stored, take the sign trick: |w| (at most 128, unsigned) times x with w's sign, pairs under 2^15 as well; so no
// 128 * sum q is taken off, and the integer sums, and from them the fp32 results, are those of the AVX-512 kernel.
#pragma once

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#include <type_traits>

namespace pagedllm::cpu {

#define PAGEDLLM_INT8_DOT

// kActBlock values of x as int8 into q (as the AVX-512 build rounds them); returns their scale d, and 128 * sum q
// in unsigned_sum.
template <typename T>
inline float quantize_block(const T* x, int8_t* q, int32_t& unsigned_sum) {
  const __m256 v0 = __m256(load_float(x)), v1 = __m256(load_float(x + 8));
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
  const __m128i w0 = _mm_packs_epi32(_mm256_castsi256_si128(q0), _mm256_extracti128_si256(q0, 1));
  const __m128i w1 = _mm_packs_epi32(_mm256_castsi256_si128(q1), _mm256_extracti128_si256(q1, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(w0, w1));
  const __m256i s = _mm256_add_epi32(q0, q1);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  unsigned_sum = 128 * _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
  return amax / 127.f;
}

// One half h (16 values) of a weight block for one half fh of a tile's features: four vectors, each one word of the
// 8 features. dot() multiplies them with x's four words of that half: the 8 features' 32-bit sums.
template <typename W>
struct HalfBlock {
  __m256i v[4], w[4];  // 4-bit: the nibbles (w unused); int8: |w| and w (whose sign x takes)

  HalfBlock(const uint8_t* block, int64_t fh, int h) {
    for (int j = 0; j < 4; ++j) {
      if constexpr (std::is_same_v<W, Int4>) {  // word j holds values 4j.. in its low nibbles, 16 + 4j.. in its high
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * j + 32 * fh));
        v[j] = _mm256_and_si256(h == 0 ? raw : _mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0F));
      } else {  // word 4h + j holds values 16h + 4j ..
        w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * (4 * h + j) + 32 * fh));
        v[j] = _mm256_abs_epi8(w[j]);
      }
    }
  }

  __m256i dot(const int32_t* xw) const {
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (std::is_same_v<W, Int4>) {
      __m256i sum = _mm256_maddubs_epi16(v[0], _mm256_set1_epi32(xw[0]));
      for (int j = 1; j < 4; ++j) sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(v[j], _mm256_set1_epi32(xw[j])));
      return _mm256_madd_epi16(sum, ones);
    } else {
      __m256i sum = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j)
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(
                                        _mm256_maddubs_epi16(v[j], _mm256_sign_epi8(_mm256_set1_epi32(xw[j]), w[j])), ones));
      return sum;
    }
  }
};

// Tiles [t0, t1) of y [M, n_out] = x W^T (+ bias). Up to 2 rows, both halves of a tile's features go through each
// block together (independent chains, x's words loaded once); more rows take them one after the other, so that
// the M accumulators stay in registers (the second pass reads the tile from L1).
template <typename T, typename W, int64_t M>
void tiled_gemv_tiles(const QuantizedRows& in, const QuantWeight<W>& w, const T* bias, T* y, int64_t n_out,
                      int64_t t0, int64_t t1) {
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  constexpr int64_t kBlockBytes = kTileFeatures * (kInt8 ? kQuantBlock : kQuantBlock / 2);
  constexpr int64_t F = M <= 2 ? 2 : 1;  // halves of 8 features per pass
  const int64_t k = w.k, groups = w.groups, per_group = k / kQuantBlock / groups, halves = k / kActBlock;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = reinterpret_cast<const uint8_t*>(w.values) + t * (k / kQuantBlock) * kBlockBytes;
    for (int64_t f0 = 0; f0 < 2; f0 += F) {
      __m256 acc[M][F];
      for (int64_t m = 0; m < M; ++m)
        for (int64_t f = 0; f < F; ++f) acc[m][f] = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m256 s[F];
        for (int64_t f = 0; f < F; ++f) {
          const int64_t sg = (t * groups + g) * kTileFeatures + 8 * (f0 + f);
          s[f] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scale + sg)));
          if (w.offset != nullptr) {
            const __m256 o = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.offset + sg)));
            for (int64_t m = 0; m < M; ++m)
              acc[m][f] = _mm256_fmadd_ps(o, _mm256_set1_ps(in.sums[m * groups + g]), acc[m][f]);
          }
        }
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
          const uint8_t* block = wt + b * kBlockBytes;
          if (f0 == 0)
            for (int64_t off = 0; off < kBlockBytes; off += 64)
              _mm_prefetch(reinterpret_cast<const char*>(block + off) + kPrefetchBytes, _MM_HINT_T0);
          for (int h = 0; h < 2; ++h) {  // the block's two halves of 16 values, each with its activation scale
            for (int64_t f = 0; f < F; ++f) {
              const HalfBlock<W> half(block, f0 + f, h);
              for (int64_t m = 0; m < M; ++m) {
                const int64_t a = m * halves + 2 * b + h;
                const __m256i dot = half.dot(reinterpret_cast<const int32_t*>(in.q + a * kActBlock));
                acc[m][f] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s[f], _mm256_set1_ps(in.scale[a])),
                                            acc[m][f]);
              }
            }
          }
        }
      }
      alignas(32) float out[8];
      for (int64_t m = 0; m < M; ++m)
        for (int64_t f = 0; f < F; ++f) {
          _mm256_store_ps(out, acc[m][f]);
          const int64_t first = t * kTileFeatures + 8 * (f0 + f);
          T* yr = y + m * n_out + first;
          for (int64_t i = 0; i < 8; ++i)
            yr[i] = static_cast<T>(bias != nullptr ? out[i] + static_cast<float>(bias[first + i]) : out[i]);
        }
    }
  }
}

}  // namespace pagedllm::cpu
#endif
