// GEMVs over grouped quantized weights, y = x W^T for the few rows of a decode batch. A weight row is K values
// q in groups of G, each with an fp16 scale s and optionally an fp16 offset o: w = s * q + o. The values are int8
// (8-bit formats: GGUF Q8_0, and per-row int8 where G = K) or 4-bit, two per byte in blocks of 32 values as GGUF
// stores Q4_0 / Q4_1 (byte j holds value j in its low nibble and value j + 16 in its high one), so those files
// load by copying bytes. Per group, sum_i x_i w_i = s * sum_i x_i q_i + o * sum_i x_i: the offsets cost one dot
// product with the group sums of x per row, computed once per call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace pagedllm::cpu {

// Marks 4-bit storage: two values per byte, 32-value blocks as above.
struct Int4 {
  uint8_t bits;
};

constexpr int64_t kTileFeatures = 16;  // output features per tile of quant_gemv_tiled.h's layout

// 4-bit weights: up to this many rows take the GEMVs (measured at 6 and 8 rows: the GEMV took 0.35-0.75x the time of
// dequantizing for the matmul; for int8 and bf16 weights the matmul is as fast or faster from 5 rows)
constexpr int64_t kMaxQuantRows = 8;

// Calls f with the number of rows (1 to kMaxQuantRows) as a compile-time constant.
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int64_t, 1>{}); break;
    case 2: f(std::integral_constant<int64_t, 2>{}); break;
    case 3: f(std::integral_constant<int64_t, 3>{}); break;
    case 4: f(std::integral_constant<int64_t, 4>{}); break;
    case 5: f(std::integral_constant<int64_t, 5>{}); break;
    case 6: f(std::integral_constant<int64_t, 6>{}); break;
    case 7: f(std::integral_constant<int64_t, 7>{}); break;
    default: f(std::integral_constant<int64_t, 8>{}); break;
  }
}

// A quantized weight matrix as the kernels read it.
template <typename W>
struct QuantWeight {
  using value_type = W;
  const W* values;           // [N, K] (int8) or [N, K / 2] (Int4)
  const at::Half* scale;     // [N, groups]
  const at::Half* offset;    // [N, groups] or null
  int64_t groups;
  int64_t row_stride() const { return std::is_same_v<W, Int4> ? k / 2 : k; }
  int64_t k;
  bool tiled = false;        // in quant_gemv_tiled.h's layout (values, scale and offset)
};

inline void halves_to_float(const at::Half* p, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) load_float(p + i).store(out + i);
  for (; i < n; ++i) out[i] = static_cast<float>(p[i]);
}

// Values [i, i + 32) of a 4-bit row (i a multiple of 32) as floats.
inline void unpack_int4_block(const Int4* row, int64_t i, float* out) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(row) + i / 2;
  for (int j = 0; j < 16; ++j) out[j] = static_cast<float>(p[j] & 15);
  for (int j = 0; j < 16; ++j) out[16 + j] = static_cast<float>(p[j] >> 4);
}

// The same 32 values as 32 / kLanes fp32 vectors: on AVX2 widened in registers (one byte per lane), where the
// scalar unpacking above held a 4-bit decode at 4 % of the memory's bandwidth.
inline void int4_block_vectors(const Int4* row, int64_t i, Vec* wv) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(row) + i / 2));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, nibble), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
  wv[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  wv[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  wv[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  wv[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
#else
  alignas(64) float block[32];
  unpack_int4_block(row, i, block);
  for (int64_t j = 0; j < 32 / kLanes; ++j) wv[j] = Vec::loadu(block + j * kLanes);
#endif
}

// Per input row m and group g, the sum of x over the group (for the offsets).
template <typename T>
std::vector<float> group_sums(const T* x, int64_t rows, int64_t k, int64_t groups) {
  std::vector<float> sums(rows * groups);
  const int64_t g_size = k / groups;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const T* p = x + m * k + g * g_size;
      Vec acc(0.f);
      int64_t i = 0;
      for (; i + kLanes <= g_size; i += kLanes) acc = acc + load_float(p + i);
      float s = sum_of(acc);
      for (; i < g_size; ++i) s += static_cast<float>(p[i]);
      sums[m * groups + g] = s;
    }
  return sums;
}

// Output rows [begin, end) for any activation dtype T, in fp32 vectors (AVX-512, AVX2, or whatever at::vec has).
template <typename T, typename W, int64_t M>
void quant_gemv_rows(const float* xf, const float* xsum, const QuantWeight<W>& w, const T* bias, T* y, int64_t n_out,
                     int64_t begin, int64_t end) {
  const int64_t k = w.k, groups = w.groups, g_size = k / groups;
  std::vector<float> sf(groups), of(groups);
  for (int64_t n = begin; n < end; ++n) {
    const W* row = w.values + n * w.row_stride();
    halves_to_float(w.scale + n * groups, sf.data(), groups);
    if (w.offset != nullptr) halves_to_float(w.offset + n * groups, of.data(), groups);
    Vec out[M];
    float tail[M];
    for (int64_t m = 0; m < M; ++m) out[m] = Vec(0.f), tail[m] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      Vec acc[M], acc2[M];
      float part[M];
      for (int64_t m = 0; m < M; ++m) acc[m] = acc2[m] = Vec(0.f), part[m] = 0.f;
      int64_t i = g * g_size;
      const int64_t e = i + g_size;
      if constexpr (std::is_same_v<W, Int4>) {
        for (; i < e; i += 32) {
          Vec wv[32 / kLanes];
          int4_block_vectors(row, i, wv);
          for (int64_t j = 0; j < 32 / kLanes; ++j)
            for (int64_t m = 0; m < M; ++m)  // alternate accumulators: two chains of dependent FMAs
              (j % 2 ? acc2 : acc)[m] = at::vec::fmadd(Vec::loadu(xf + m * k + i + j * kLanes), wv[j], (j % 2 ? acc2 : acc)[m]);
        }
      } else {
        // two accumulators per input row: with one chain of dependent FMAs, int8 rows streamed at about 40 GB/s
        for (; i + 2 * kLanes <= e; i += 2 * kLanes) {
          const Vec wv = load_float(row + i), wv2 = load_float(row + i + kLanes);
          for (int64_t m = 0; m < M; ++m) {
            acc[m] = at::vec::fmadd(Vec::loadu(xf + m * k + i), wv, acc[m]);
            acc2[m] = at::vec::fmadd(Vec::loadu(xf + m * k + i + kLanes), wv2, acc2[m]);
          }
        }
        for (; i + kLanes <= e; i += kLanes) {
          const Vec wv = load_float(row + i);
          for (int64_t m = 0; m < M; ++m) acc[m] = at::vec::fmadd(Vec::loadu(xf + m * k + i), wv, acc[m]);
        }
        for (; i < e; ++i)
          for (int64_t m = 0; m < M; ++m) part[m] += xf[m * k + i] * static_cast<float>(row[i]);
      }
      const Vec s(sf[g]);
      for (int64_t m = 0; m < M; ++m) {
        out[m] = at::vec::fmadd(acc[m] + acc2[m], s, out[m]);
        tail[m] += part[m] * sf[g] + (w.offset != nullptr ? of[g] * xsum[m * groups + g] : 0.f);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const float b = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
      y[m * n_out + n] = static_cast<T>(sum_of(out[m]) + tail[m] + b);
    }
  }
}

// Packed values are prefetched this far ahead: on this VM's slow-memory minutes one request's decode ran 8-10 %
// faster with it (the hardware prefetcher alone kept fewer lines in flight than the 4-bit stream needs).
constexpr int64_t kPrefetchBytes = 4096;

#if defined(CPU_CAPABILITY_AVX512)
// The 4-bit GEMV on AVX512-BF16 for bf16 activations reads 64 bytes (four blocks, 128 values) at a time and
// splits them, viewed as 16-bit lanes, into four vectors of nibbles without a shuffle: the low and high nibbles
// of the even bytes and of the odd ones. A nibble n OR 0x4300 is the bf16 of 128 + n, exactly, so each
// vector multiplies x in pairs (vdpbf16ps) as 128 + q; the 128 * sum(x) this adds per group is taken off with
// the offsets (o - 128 s). x is rearranged once per call into that order (and padded to 128 with zeros).
constexpr int64_t kInt4Chunk = 128;

struct Int4Input {
  std::vector<at::BFloat16> x;  // [rows, k padded to whole chunks]
  std::vector<float> sums;      // [rows, groups]
};

// Each chunk of x in the kernel's order, from two permutes per output vector (value (l / 8) * 32 + (v & 1) * 16 +
// 2 * (l % 8) + (v >> 1) of the chunk in lane l of vector v, from its input vector l / 8), and the group sums
// from dot products with ones on the way: a scalar loop here cost more than the GEMV for small weights.
PAGEDLLM_BF16_DOT inline Int4Input prepare_int4_input(const at::BFloat16* x, int64_t rows, int64_t k, int64_t groups) {
  const int64_t padded = (k + kInt4Chunk - 1) / kInt4Chunk * kInt4Chunk, blocks_per_group = k / groups / 32;
  Int4Input in{std::vector<at::BFloat16>(rows * padded), std::vector<float>(rows * groups, 0.f)};
  __m512i idx[4];
  for (int v = 0; v < 4; ++v) {
    alignas(64) int16_t lanes[32];
    for (int l = 0; l < 32; ++l) lanes[l] = ((l / 8) & 1) * 32 + (v & 1) * 16 + 2 * (l % 8) + (v >> 1);
    idx[v] = _mm512_load_si512(lanes);
  }
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
  alignas(64) float part[16];
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < k; c += kInt4Chunk) {
      const int64_t blocks = std::min<int64_t>(4, (k - c) / 32);
      __m512i xv[4];
      for (int64_t j = 0; j < 4; ++j) xv[j] = j < blocks ? _mm512_loadu_si512(x + m * k + c + 32 * j) : _mm512_setzero_si512();
      __m512 sum = _mm512_setzero_ps();
      for (int v = 0; v < 4; ++v) {
        const __m512i o = _mm512_mask_blend_epi16(0xFFFF0000, _mm512_permutex2var_epi16(xv[0], idx[v], xv[1]),
                                                  _mm512_permutex2var_epi16(xv[2], idx[v], xv[3]));
        _mm512_storeu_si512(in.x.data() + m * padded + c + 32 * v, o);
        sum = _mm512_dpbf16_ps(sum, (__m512bh)o, ones);
      }
      _mm512_store_ps(part, sum);  // lane j: block j / 4 of the chunk
      for (int64_t b = 0; b < blocks; ++b)
        in.sums[m * groups + (c / 32 + b) / blocks_per_group] += part[4 * b] + part[4 * b + 1] + part[4 * b + 2] + part[4 * b + 3];
    }
  return in;
}

// 64 bytes as 32 16-bit lanes, split into four vectors of bf16 (128 + nibble): the low and high nibbles of the
// even bytes (a, b) and of the odd ones (c, d). A nibble n OR 0x4300 is the bf16 of 128 + n, exactly.
struct Nibbles {
  __m512bh a, b, c, d;
};

PAGEDLLM_BF16_DOT inline Nibbles split_nibbles(__m512i v) {
  const __m512i nibble = _mm512_set1_epi16(0x000F), bias128 = _mm512_set1_epi16(0x4300);
  return {(__m512bh)_mm512_ternarylogic_epi32(v, nibble, bias128, 0xEA),  // (v & nibble) | bias128
          (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nibble, bias128, 0xEA),
          (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), nibble, bias128, 0xEA),
          (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), bias128)};
}

// A row's accumulators start from (offset - bias * scale) . sum(x) per group, where bias is what the nibbles'
// 128s add per unit of sum(x); the row's scales are left in fp32 in sf.
template <int64_t M>
PAGEDLLM_BF16_DOT inline void start_row(__m512 (&acc)[M], const at::Half* scale, const at::Half* offset, int64_t groups,
                                        const float* xsum, float bias, float* sf) {
  for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scale + g));
    const __m512 o = offset != nullptr ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, offset + g)) : _mm512_setzero_ps();
    _mm512_storeu_ps(sf + g, s);
    const __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(-bias), s, o);
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(mask, xsum + m * groups + g), acc[m]);
  }
}

// acc[m] += s * (the four nibble vectors . four vectors of row m's x, at x + m * stride).
template <int64_t M>
PAGEDLLM_BF16_DOT inline void dot_chunk(__m512 (&acc)[M], const at::BFloat16* x, int64_t stride, const Nibbles& w,
                                        __m512 s) {
  for (int64_t m = 0; m < M; ++m) {
    const at::BFloat16* xr = x + m * stride;
    __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(xr), w.a);
    p = _mm512_dpbf16_ps(p, (__m512bh)_mm512_loadu_si512(xr + 32), w.b);
    p = _mm512_dpbf16_ps(p, (__m512bh)_mm512_loadu_si512(xr + 64), w.c);
    p = _mm512_dpbf16_ps(p, (__m512bh)_mm512_loadu_si512(xr + 96), w.d);
    acc[m] = _mm512_fmadd_ps(p, s, acc[m]);
  }
}

template <int64_t M>
PAGEDLLM_BF16_DOT inline void finish_row(const __m512 (&acc)[M], const at::BFloat16* bias, at::BFloat16* y,
                                         int64_t n_out, int64_t n) {
  for (int64_t m = 0; m < M; ++m) {
    float r = _mm512_reduce_add_ps(acc[m]);
    if (bias != nullptr) r += static_cast<float>(bias[n]);
    y[m * n_out + n] = static_cast<at::BFloat16>(r);
  }
}

// Output rows [begin, end); groups are a power-of-two multiple of 32.
template <int64_t M>
PAGEDLLM_BF16_DOT void quant_gemv_rows_int4_bf16(const at::BFloat16* xi, const float* xsum, const QuantWeight<Int4>& w,
                                                 const at::BFloat16* bias, at::BFloat16* y, int64_t n_out,
                                                 int64_t begin, int64_t end) {
  const int64_t k = w.k, groups = w.groups, padded = (k + kInt4Chunk - 1) / kInt4Chunk * kInt4Chunk;
  const int shift = __builtin_ctzll(k / groups / 32);  // blocks per group = 1 << shift
  // which of a chunk's four block scales each fp32 lane of the products takes
  const __m512i lane_block = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  std::vector<float> sf(groups + 16);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(w.values) + n * (k / 2);
    const at::Half* sr = w.scale + n * groups;
    const at::Half* orow = w.offset != nullptr ? w.offset + n * groups : nullptr;
    __m512 acc[M];
    start_row<M>(acc, sr, orow, groups, xsum, 128.f, sf.data());  // x (128 + q) = x q + 128 x
    // the scales and offsets (a byte per 8 values) as far ahead as the values
    _mm_prefetch(reinterpret_cast<const char*>(sr) + kPrefetchBytes / 8, _MM_HINT_T0);
    if (orow != nullptr) _mm_prefetch(reinterpret_cast<const char*>(orow) + kPrefetchBytes / 8, _MM_HINT_T0);
    for (int64_t i = 0; i < k; i += kInt4Chunk) {
      _mm_prefetch(reinterpret_cast<const char*>(row + i / 2) + kPrefetchBytes, _MM_HINT_T0);
      const int64_t blocks = std::min<int64_t>(4, (k - i) / 32);
      const __m512i v = blocks == 4 ? _mm512_loadu_si512(row + i / 2)
                                    : _mm512_maskz_loadu_epi8((__mmask64)((1ull << (16 * blocks)) - 1), row + i / 2);
      // the four blocks' scales, each over the four fp32 lanes of its products
      __m512 s;
      if (shift == 0) {
        s = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_loadu_ps(sf.data() + i / 32)));
      } else {
        const int64_t b0 = i / 32;
        s = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_setr_ps(
            sf[b0 >> shift], sf[(b0 + 1) >> shift], sf[(b0 + 2) >> shift], sf[(b0 + 3) >> shift])));
      }
      dot_chunk<M>(acc, xi + i, padded, split_nibbles(v), s);
    }
    finish_row<M>(acc, bias, y, n_out, n);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Values [i, i + 32) of a row (a 4-bit block's two nibbles, or 32 int8 values) as s * q + o in bf16: fp32 products
// rounded to nearest even (vcvtne2ps2bf16, as at::BFloat16 rounds).
template <typename W>
PAGEDLLM_BF16_DOT inline __m512i dequantize_block_bf16(const W* row, int64_t i, __m512 s, __m512 o) {
  __m512 lo, hi;
  if constexpr (std::is_same_v<W, Int4>) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i / 2)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  } else {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i + 16))));
  }
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s, o), _mm512_fmadd_ps(lo, s, o));
}

// Rows as bf16, 32 values per step; a group's last values short of 32 (int8 rows only) one by one.
template <typename W>
PAGEDLLM_BF16_DOT void dequantize_rows_bf16(const QuantWeight<W>& w, at::BFloat16* out, int64_t begin, int64_t end,
                                            float* sf, float* of) {
  const int64_t k = w.k, groups = w.groups, g_size = k / groups;
  for (int64_t n = begin; n < end; ++n) {
    const W* row = w.values + n * w.row_stride();
    halves_to_float(w.scale + n * groups, sf, groups);
    if (w.offset != nullptr) halves_to_float(w.offset + n * groups, of, groups);
    at::BFloat16* o_row = out + n * k;
    for (int64_t g = 0; g < groups; ++g) {
      const float sg = sf[g], og = w.offset != nullptr ? of[g] : 0.f;
      int64_t i = g * g_size;
      const int64_t e = i + g_size;
      for (; i + 32 <= e; i += 32)
        _mm512_storeu_si512(o_row + i, dequantize_block_bf16(row, i, _mm512_set1_ps(sg), _mm512_set1_ps(og)));
      if constexpr (std::is_same_v<W, int8_t>)
        for (; i < e; ++i) o_row[i] = static_cast<at::BFloat16>(static_cast<float>(row[i]) * sg + og);
    }
  }
}
#endif

// Row n of a weight in quant_gemv_tiled.h's layout (each row's 32-bit words interleaved with those of the 15 rows
// beside it) as an untiled row in `words`, and its group scales and offsets as fp32 in sf and of.
template <typename W>
const W* gather_tiled_row(const QuantWeight<W>& w, int64_t n, uint32_t* words, float* sf, float* of) {
  const int64_t count = w.row_stride() / 4, tile = n / kTileFeatures, lane = n % kTileFeatures;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(w.values) + tile * count * kTileFeatures + lane;
  for (int64_t i = 0; i < count; ++i) words[i] = src[i * kTileFeatures];
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t at = (tile * w.groups + g) * kTileFeatures + lane;
    sf[g] = static_cast<float>(w.scale[at]);
    if (w.offset != nullptr) of[g] = static_cast<float>(w.offset[at]);
  }
  return reinterpret_cast<const W*>(words);
}

// W as values of dtype T ([N, K], for the matrix products of large batches), from either layout.
template <typename T, typename W>
void dequantize_rows(const QuantWeight<W>& w, T* out, int64_t n_out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (cpu_has_bf16_dot() && !w.tiled) {
      at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> sf(w.groups), of(w.groups);
        dequantize_rows_bf16<W>(w, out, begin, end, sf.data(), of.data());
      });
      return;
    }
  }
#endif
  const int64_t k = w.k, groups = w.groups, g_size = k / groups;
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sf(groups), of(groups, 0.f);
    std::vector<uint32_t> words(w.tiled ? w.row_stride() / 4 : 0);
    alignas(64) float block[32];
    for (int64_t n = begin; n < end; ++n) {
      const W* row = w.tiled ? gather_tiled_row(w, n, words.data(), sf.data(), of.data()) : w.values + n * w.row_stride();
      if (!w.tiled) {
        halves_to_float(w.scale + n * groups, sf.data(), groups);
        if (w.offset != nullptr) halves_to_float(w.offset + n * groups, of.data(), groups);
      }
      T* o = out + n * k;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t e = (g + 1) * g_size;
        for (int64_t i = g * g_size; i < e; i += 32) {
          const int64_t len = std::min<int64_t>(32, e - i);
          if constexpr (std::is_same_v<W, Int4>) {
            Vec wv[32 / kLanes];
            int4_block_vectors(row, i, wv);
            for (int64_t j = 0; j < 32 / kLanes; ++j) wv[j].store(block + j * kLanes);
          } else {
            for (int64_t j = 0; j < len; ++j) block[j] = static_cast<float>(row[i + j]);
          }
          for (int64_t j = 0; j < len; ++j) o[i + j] = static_cast<T>(block[j] * sf[g] + of[g]);
        }
      }
    }
  });
}

}  // namespace pagedllm::cpu
