// What every native CPU kernel shares: ATen's portable fp32 SIMD vector (AVX-512 / AVX2 / NEON / scalar, as
// the build flags select), loads of any weight or activation type into it, the target attribute of the
// functions that use AVX512-BF16's pairwise dot products, and the one dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
// Functions with this attribute are compiled for AVX512-BF16 and called only where cpu_has_bf16_dot().
#define PAGEDLLM_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

// Runs the lambda (which sees the element type as scalar_t) for the dtypes the kernels are built for.
#define PAGEDLLM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_V2(TYPE, NAME, AT_WRAP(__VA_ARGS__), at::kFloat, at::kBFloat16, at::kHalf)

namespace pagedllm::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// fp32 accumulators a register tile may hold: half the vector registers (AVX-512 has 32, AVX2 16), the rest for
// the operands
constexpr int64_t kTileAccumulators = kLanes >= 16 ? 16 : 8;

// kLanes values from p as fp32: fp32 as is, bf16 / fp16 converted, int8 (quantized weights) widened.
template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else if constexpr (std::is_same_v<T, int8_t>) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    float tmp[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) tmp[i] = p[i];
    return Vec::loadu(tmp);
#endif
  } else {
    Vec v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

inline float sum_of(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

}  // namespace pagedllm::cpu
