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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#if defined(CPU_CAPABILITY_AVX512)
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
#elif defined(CPU_CAPABILITY_AVX2)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
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

#if defined(CPU_CAPABILITY_AVX512)
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
#endif

inline float sum_of(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
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

#endif

// Lane i of the result is the sum of v[i]'s lanes, for kLanes vectors v.
inline Vec sum_each(const Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 w[16];
  for (int i = 0; i < 16; ++i) w[i] = v[i];
  return sum_lanes(w);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 t[4];
  for (int i = 0; i < 4; ++i) t[i] = _mm256_hadd_ps(v[2 * i], v[2 * i + 1]);  // pair sums of v[2i], v[2i + 1] per half
  const __m256 u0 = _mm256_hadd_ps(t[0], t[1]), u1 = _mm256_hadd_ps(t[2], t[3]);  // quarter sums of v[0..3], v[4..7]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  float out[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) out[i] = sum_of(v[i]);
  return Vec::loadu(out);
#endif
}

}  // namespace pagedllm::cpu
