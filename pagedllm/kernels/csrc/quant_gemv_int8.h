// The int8 GEMV on AVX512-BF16 for bf16 activations (GGUF Q8_0, Q6_K and Q5_K as pagedllm stores them, per-row
// int8): each byte's q + 128 is split into its two nibbles, and each nibble made the bf16 of 128 + nibble as the
// 4-bit kernel does (an OR, no conversion), so 64 bytes become four vectors of exact bf16 values multiplied with x
// and with 16 x in pairs (vdpbf16ps). Per group, sum x q = sum x (128 + lo) + 16 sum x (128 + hi) - 2304 sum x; the
// last term joins the offsets. The fp32 GEMV it replaces here (each value widened to fp32 for FMAs) took 1.36-1.38
// ms for the embedded model's Q8_0 LM head at one row, this one 0.93-1.08 ms (the GEMVs are compute-bound here).
#pragma once

#include "quant_gemv.h"

namespace pagedllm::cpu {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kInt8Chunk = 64;

// Whether this kernel takes rows of k values in groups of g_size (a chunk's 16 fp32 lanes each cover 4 values of
// one group).
inline bool int8_kernel_applies(int64_t k, int64_t g_size) {
  return k % kInt8Chunk == 0 && (g_size == 16 || g_size == 32 || g_size % kInt8Chunk == 0);
}

// x per chunk of 64 in the kernel's order: the even pairs (x[4l], x[4l + 2] in lane l), the odd pairs (x[4l + 1],
// x[4l + 3]), and both times 16 (exact in bf16); and the group sums.
struct Int8Input {
  std::vector<at::BFloat16> x;  // [rows, k / 64, 4 x 32]
  std::vector<float> sums;      // [rows, groups]
};

PAGEDLLM_BF16_DOT inline __m512i bf16_times_16(__m512i v) {
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
  const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
  const __m512 sixteen = _mm512_set1_ps(16.f);
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, sixteen), _mm512_mul_ps(lo, sixteen));
}

PAGEDLLM_BF16_DOT inline Int8Input prepare_int8_input(const at::BFloat16* x, int64_t rows, int64_t k, int64_t groups) {
  Int8Input in{std::vector<at::BFloat16>(rows * k * 2), group_sums(x, rows, k, groups)};
  alignas(64) int16_t even[32], odd[32];
  for (int w = 0; w < 32; ++w) {
    even[w] = static_cast<int16_t>(4 * (w / 2) + 2 * (w % 2));
    odd[w] = static_cast<int16_t>(even[w] + 1);
  }
  const __m512i ie = _mm512_load_si512(even), io = _mm512_load_si512(odd);
  for (int64_t m = 0; m < rows; ++m) {
    const at::BFloat16* xr = x + m * k;
    for (int64_t c = 0; c < k; c += kInt8Chunk) {
      const __m512i lo = _mm512_loadu_si512(xr + c), hi = _mm512_loadu_si512(xr + c + 32);
      const __m512i xe = _mm512_permutex2var_epi16(lo, ie, hi), xo = _mm512_permutex2var_epi16(lo, io, hi);
      at::BFloat16* out = in.x.data() + (m * k + c) * 2;
      _mm512_storeu_si512(out, xe);
      _mm512_storeu_si512(out + 32, xo);
      _mm512_storeu_si512(out + 64, bf16_times_16(xe));
      _mm512_storeu_si512(out + 96, bf16_times_16(xo));
    }
  }
  return in;
}

// Output rows [begin, end).
template <int64_t M>
PAGEDLLM_BF16_DOT void quant_gemv_rows_int8_bf16(const at::BFloat16* xi, const float* xsum,
                                                 const QuantWeight<int8_t>& w, const at::BFloat16* bias,
                                                 at::BFloat16* y, int64_t n_out, int64_t begin, int64_t end) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t k = w.k, groups = w.groups, g_size = k / groups;
  alignas(64) int32_t lanes[16];  // lane l of a chunk's products: values 4l .. 4l + 3, in this group of the chunk's
  for (int l = 0; l < 16; ++l) lanes[l] = static_cast<int32_t>(4 * l / g_size);
  const __m512i lane_group = _mm512_load_si512(lanes);
  std::vector<float> sf(groups + 16);
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* row = w.values + n * k;
    __m512 acc[M];
    // x (128 + lo) + 16 x (128 + hi) = x (q + 128) + 2176 x = x q + 2304 x
    start_row<M>(acc, w.scale + n * groups, w.offset != nullptr ? w.offset + n * groups : nullptr, groups, xsum,
                 2304.f, sf.data());
    for (int64_t i = 0; i < k; i += kInt8Chunk) {
      _mm_prefetch(reinterpret_cast<const char*>(row + i) + kPrefetchBytes, _MM_HINT_T0);
      const Nibbles q = split_nibbles(_mm512_xor_si512(_mm512_loadu_si512(row + i), flip));  // of q + 128, unsigned
      // the even pairs with the even bytes' low nibbles, the odd with the odd bytes', then 16 x with the high ones
      const __m512 s = _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(sf.data() + i / g_size));
      dot_chunk<M>(acc, xi + 2 * i, 2 * k, Nibbles{q.a, q.c, q.b, q.d}, s);
    }
    finish_row<M>(acc, bias, y, n_out, n);
  }
}
#endif

}  // namespace pagedllm::cpu
