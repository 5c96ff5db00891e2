// y = x W^T on the CPU (the native path's one linear layer). For the few rows of a decode batch, a matmul
// library tuned for large batches streams the weights well below the memory's bandwidth (measured here:
// about 24 GB/s of weights at one row, against 50 GB/s and more of read bandwidth); the GEMV below reads
// each weight row once, straight into fp32 dot products with every input row, splitting the output
// features over the threads. Weights are the activations' dtype, or int8 with one scale per output row
// (weight-only quantization). On CPUs with AVX512-BF16, bf16 rows use its pairwise dot-product
// instruction (32 weights per instruction, no conversion to fp32): up to 20 % faster at one row when
// memory bandwidth is not the limit. Larger batches go to torch's matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"
#include "ops.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace pagedllm::cpu {
namespace {

constexpr int64_t kMaxRows = 4;         // up to this many input rows, one pass over the weights serves them all
constexpr int64_t kInt8KernelRows = 16;  // above, dequantizing int8 weights for a bf16 matmul is faster

#if defined(CPU_CAPABILITY_AVX512)
// Output rows [begin, end) of a bf16 GEMV with vdpbf16ps; a separate function so that only it is compiled
// for AVX512-BF16, and called only where the CPU has it.
template <int64_t M>
PAGEDLLM_BF16_DOT void gemv_rows_bf16_dot(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* bias,
                                          at::BFloat16* y, int64_t n_out, int64_t k, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const at::BFloat16* wr = w + n * k;
    // two accumulators per input row: with one chain of dependent dot products per row a core streamed
    // 36 GB/s of weights, with two 38.5 (a plain read: 41 GB/s)
    __m512 acc[M], acc2[M];
    for (int64_t m = 0; m < M; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + i), wv2 = (__m512bh)_mm512_loadu_si512(wr + i + 32);
      for (int64_t m = 0; m < M; ++m) {
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * k + i), wv);
        acc2[m] = _mm512_dpbf16_ps(acc2[m], (__m512bh)_mm512_loadu_si512(x + m * k + i + 32), wv2);
      }
    }
    for (; i + 32 <= k; i += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + i);
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * k + i), wv);
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], acc2[m]));
      for (int64_t j = i; j < k; ++j) s += static_cast<float>(x[m * k + j]) * static_cast<float>(wr[j]);
      if (bias != nullptr) s += static_cast<float>(bias[n]);
      y[m * n_out + n] = static_cast<at::BFloat16>(s);
    }
  }
}
#endif

// T: the activations' dtype; W: the weights' (T, or int8 with `scale`).
template <typename T, typename W, int64_t M>
void gemv(const T* x, const W* w, const T* scale, const T* bias, T* y, int64_t n_out, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<W, at::BFloat16>) {
    if (cpu_has_bf16_dot()) {
      at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
        gemv_rows_bf16_dot<M>(x, w, bias, y, n_out, k, begin, end);
      });
      return;
    }
  }
#endif
  std::vector<float> xf(M * k);  // the inputs in fp32, read from cache for every weight row
  for (int64_t i = 0; i < M * k; ++i) xf[i] = static_cast<float>(x[i]);
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const W* wr = w + n * k;
      // two accumulators per input row, as in the bf16 kernel: with one chain of dependent FMAs, int8 rows
      // (converted before each FMA) streamed at about 40 GB/s
      Vec acc[M], acc2[M];
      for (int64_t m = 0; m < M; ++m) acc[m] = acc2[m] = Vec(0.f);
      int64_t i = 0;
      for (; i + 2 * kLanes <= k; i += 2 * kLanes) {
        const Vec wv = load_float(wr + i), wv2 = load_float(wr + i + kLanes);
        for (int64_t m = 0; m < M; ++m) {
          acc[m] = at::vec::fmadd(Vec::loadu(xf.data() + m * k + i), wv, acc[m]);
          acc2[m] = at::vec::fmadd(Vec::loadu(xf.data() + m * k + i + kLanes), wv2, acc2[m]);
        }
      }
      for (; i + kLanes <= k; i += kLanes) {
        const Vec wv = load_float(wr + i);
        for (int64_t m = 0; m < M; ++m) acc[m] = at::vec::fmadd(Vec::loadu(xf.data() + m * k + i), wv, acc[m]);
      }
      for (int64_t m = 0; m < M; ++m) {
        float s = sum_of(acc[m] + acc2[m]);
        for (int64_t j = i; j < k; ++j) s += xf[m * k + j] * static_cast<float>(wr[j]);
        if (scale != nullptr) s *= static_cast<float>(scale[n]);
        if (bias != nullptr) s += static_cast<float>(bias[n]);
        y[m * n_out + n] = static_cast<T>(s);
      }
    }
  });
}

// The GEMV for up to kMaxRows rows of x (arguments checked by linear).
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& scale) {
  const auto xc = x.contiguous();
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  auto run = [&](auto act, auto wgt) {
    using T = decltype(act);
    using W = decltype(wgt);
    const T* b = bias ? bias->data_ptr<T>() : nullptr;
    const T* sc = scale ? scale->data_ptr<T>() : nullptr;
    auto call = [&](auto rows) {
      gemv<T, W, decltype(rows)::value>(xc.data_ptr<T>(), static_cast<const W*>(weight.data_ptr()), sc, b,
                                        y.data_ptr<T>(), weight.size(0), weight.size(1));
    };
    switch (x.size(0)) {
      case 1: call(std::integral_constant<int64_t, 1>{}); break;
      case 2: call(std::integral_constant<int64_t, 2>{}); break;
      case 3: call(std::integral_constant<int64_t, 3>{}); break;
      default: call(std::integral_constant<int64_t, 4>{}); break;
    }
  };
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "linear", [&] {
    if (weight.scalar_type() == at::kChar) {
      run(scalar_t{}, int8_t{});
    } else {
      run(scalar_t{}, scalar_t{});
    }
  });
  return y;
}

}  // namespace
}  // namespace pagedllm::cpu

namespace pagedllm {

// x: [M, K]; weight: [N, K], x's dtype or int8 with scale [N]; bias: [N] or none. Returns [M, N]. Up to
// kMaxRows rows stream the weights through the GEMV above; more rows are a matrix product (oneDNN), for int8
// weights torch's int8-weight kernel up to kInt8KernelRows rows, else on the weight dequantized once.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear: x [M, K] and weight [N, K] on the CPU");
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(weight.is_contiguous() && (int8 || weight.scalar_type() == x.scalar_type()), "linear: weight dtype");
  TORCH_CHECK(int8 == scale.has_value(), "linear: int8 weights need a scale, others none");
  for (const auto* t : {&bias, &scale})
    TORCH_CHECK(!*t || ((*t)->scalar_type() == x.scalar_type() && (*t)->is_contiguous() && (*t)->numel() == weight.size(0)),
                "linear: bias and scale are [N] in x's dtype");
  if (x.size(0) == 0) return at::empty({0, weight.size(0)}, x.options());
  if (x.size(0) <= cpu::kMaxRows) return cpu::small_batch_linear(x, weight, bias, scale);
  if (!int8) return at::linear(x, weight, bias);
  // torch's int8 kernel needs rows of a multiple of 16 values (it crashed on 72)
  const bool int8_kernel = x.size(0) <= cpu::kInt8KernelRows && x.size(1) % 16 == 0;
  auto y = int8_kernel ? at::_weight_int8pack_mm(x.contiguous(), weight, *scale)
                       : at::linear(x, weight.to(x.scalar_type()) * scale->unsqueeze(1));
  return bias ? y + *bias : y;
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor? scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) { m.impl("linear", &pagedllm::linear); }
