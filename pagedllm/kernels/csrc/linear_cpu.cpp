// y = x W^T on the CPU (the native path's one linear layer). For the few rows of a decode batch, a matmul
// library tuned for large batches streams the weights well below the memory's bandwidth (measured here:
// about 24 GB/s of weights at one row, against 50 GB/s and more of read bandwidth); the GEMV below reads
// each weight row once, straight into fp32 dot products with every input row, splitting the output
// features over the threads. Weights are the activations' dtype, or quantized in groups (int8 or 4-bit
// with fp16 group scales and offsets: quant_gemv.h). On CPUs with AVX512-BF16, bf16 rows use its pairwise dot-product
// instruction (32 weights per instruction, no conversion to fp32): up to 20 % faster at one row when
// memory bandwidth is not the limit. Larger batches go to torch's matmul, or with quantized weights to
// quant_gemm.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"
#include "ops.h"
#include "quant_gemm.h"
#include "quant_gemv_int8.h"
#include "quant_gemv_tiled.h"

#include <sys/mman.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace pagedllm::cpu {
namespace {

constexpr int64_t kMaxRows = 4;         // up to this many input rows, one pass over the weights serves them all
constexpr int64_t kInt8KernelRows = 16;  // above, dequantizing per-row int8 weights for a matmul is faster

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

// T: the activations' and the weights' dtype.
template <typename T, int64_t M>
void gemv(const T* x, const T* w, const T* bias, T* y, int64_t n_out, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
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
      const T* wr = w + n * k;
      // two accumulators per input row, as in the bf16 kernel
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
        if (bias != nullptr) s += static_cast<float>(bias[n]);
        y[m * n_out + n] = static_cast<T>(s);
      }
    }
  });
}

// y [M, N] = x [M, K] W^T (+ bias) for a quantized W.
template <typename T, typename W, int64_t M>
void quant_gemv(const T* x, const QuantWeight<W>& w, const T* bias, T* y, int64_t n_out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<W, Int4>) {
    if (cpu_has_bf16_dot()) {
      const auto in = prepare_int4_input(x, M, w.k, w.groups);
      at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
        quant_gemv_rows_int4_bf16<M>(in.x.data(), in.sums.data(), w, bias, y, n_out, begin, end);
      });
      return;
    }
  }
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<W, int8_t>) {
    if (cpu_has_bf16_dot() && int8_kernel_applies(w.k, w.k / w.groups)) {
      const auto in = prepare_int8_input(x, M, w.k, w.groups);
      at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
        quant_gemv_rows_int8_bf16<M>(in.x.data(), in.sums.data(), w, bias, y, n_out, begin, end);
      });
      return;
    }
  }
#endif
  const int64_t k = w.k;
  std::vector<float> xf(M * k);
  for (int64_t i = 0; i < M * k; ++i) xf[i] = static_cast<float>(x[i]);
  const auto xsum = w.offset != nullptr ? group_sums(xf.data(), M, k, w.groups) : std::vector<float>();
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    quant_gemv_rows<T, W, M>(xf.data(), xsum.data(), w, bias, y, n_out, begin, end);
  });
}

template <typename W>
QuantWeight<W> quant_weight(const at::Tensor& weight, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
                            int64_t k) {
  return {static_cast<const W*>(weight.data_ptr()), scale.data_ptr<at::Half>(),
          offset ? offset->data_ptr<at::Half>() : nullptr, scale.size(1), k, weight.dim() == 3};
}

// Calls f with the quantized weight as the kernels read it: QuantWeight<Int4> for uint8 storage, else <int8_t>.
template <typename F>
void with_quant_weight(const at::Tensor& weight, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
                       int64_t k, F&& f) {
  if (weight.scalar_type() == at::kByte) {
    f(quant_weight<Int4>(weight, scale, offset, k));
  } else {
    f(quant_weight<int8_t>(weight, scale, offset, k));
  }
}

// A tiled weight's product (quant_gemv_tiled.h; arguments checked by linear): up to kMaxQuantRows rows, and on AVX2
// builds any number (tiled_batches_in_int8).
at::Tensor tiled_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& scale, const std::optional<at::Tensor>& offset) {
  const auto xc = x.contiguous();
  const int64_t n_out = weight.size(0) * kTileFeatures, k = x.size(1);
  auto y = at::empty({x.size(0), n_out}, x.options());
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "tiled_linear", [&] {
    with_quant_weight(weight, scale, offset, k, [&](const auto& w) {
      using W = typename std::decay_t<decltype(w)>::value_type;
      tiled_gemm<scalar_t, W>(xc.data_ptr<scalar_t>(), x.size(0), w, bias ? bias->data_ptr<scalar_t>() : nullptr,
                              y.data_ptr<scalar_t>(), n_out);
    });
  });
#endif
  return y;
}

// Whether tiled weights multiply batches of any size with int8 activations, as their decodes do (tiled_gemm), rather
// than dequantized for a bf16 matrix product (quant_gemm.h, AVX512-BF16): on AVX2 builds, which have none, as
// llama.cpp's AVX2 kernels multiply prompts.
bool tiled_batches_in_int8() {
#if defined(CPU_CAPABILITY_AVX512)
  return false;
#else
  return true;
#endif
}

// The GEMV for up to kMaxRows rows of x, kMaxQuantRows for 4-bit weights (arguments checked by linear).
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset) {
  const auto xc = x.contiguous();
  const int64_t n_out = weight.size(0), k = x.size(1);
  auto y = at::empty({x.size(0), n_out}, x.options());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "linear", [&] {
    const scalar_t* b = bias ? bias->data_ptr<scalar_t>() : nullptr;
    with_rows(x.size(0), [&](auto rows) {
      constexpr int64_t M = decltype(rows)::value;
      if (weight.scalar_type() == at::kByte) {
        quant_gemv<scalar_t, Int4, M>(xc.data_ptr<scalar_t>(), quant_weight<Int4>(weight, *scale, offset, k), b,
                                      y.data_ptr<scalar_t>(), n_out);
      } else if constexpr (M <= kMaxRows) {  // int8 and float weights come with at most kMaxRows rows
        if (weight.scalar_type() == at::kChar) {
          quant_gemv<scalar_t, int8_t, M>(xc.data_ptr<scalar_t>(), quant_weight<int8_t>(weight, *scale, offset, k), b,
                                          y.data_ptr<scalar_t>(), n_out);
        } else {
          gemv<scalar_t, M>(xc.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), n_out, k);
        }
      }
    });
  });
  return y;
}

// Quantized weights for more rows than the GEMVs take, on AVX512-BF16 (quant_gemm.h); elsewhere they are dequantized
// for torch's matmul.
bool quant_gemm_applies(const at::Tensor& x, const at::Tensor& scale, int64_t n, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
  return x.scalar_type() == at::kBFloat16 && cpu_has_bf16_dot() && n % 16 == 0 && (k / scale.size(1)) % 32 == 0;
#else
  return false;
#endif
}

// n: the weight's output features (N).
at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& scale, const std::optional<at::Tensor>& offset, int64_t n) {
  auto y = at::empty({x.size(0), n}, x.options());
#if defined(CPU_CAPABILITY_AVX512)
  const auto xc = x.contiguous();
  with_quant_weight(weight, scale, offset, x.size(1), [&](const auto& w) {
    quant_gemm_bf16(xc.data_ptr<at::BFloat16>(), x.size(0), w, bias ? bias->data_ptr<at::BFloat16>() : nullptr,
                    y.data_ptr<at::BFloat16>(), n);
  });
#endif
  return y;
}

// A [N, K] matrix of dtype in a buffer this thread reuses (valid until its next call), for the weights of a matrix
// product dequantized or converted: a matmul on freshly allocated pages ran at half speed (measured: 880 us against
// 470 us at 64 x 1536 x 576, the page faults and unmapping of a new buffer each call).
at::Tensor scratch_matrix(int64_t n, int64_t k, at::ScalarType dtype) {
  static thread_local at::Tensor scratch;
  constexpr int64_t kHugePage = 2 << 20;
  const int64_t nbytes = n * k * static_cast<int64_t>(c10::elementSize(dtype));
  const bool fresh = !scratch.defined() || scratch.numel() < nbytes + kHugePage;
  if (fresh) scratch = at::empty({nbytes + kHugePage}, at::TensorOptions().dtype(at::kByte));
  const auto base = reinterpret_cast<uintptr_t>(scratch.data_ptr());
  const int64_t aligned = static_cast<int64_t>(((base + kHugePage - 1) & ~(kHugePage - 1)) - base);
#if defined(MADV_HUGEPAGE)
  // on 2 MiB pages, as the weights it stands in for (platform.move_to_huge_pages): the LM head's 56 MB read with
  // 4 KiB pages costs a TLB miss every few rows
  if (fresh) madvise(scratch.data_ptr<uint8_t>() + aligned, nbytes, MADV_HUGEPAGE);
#endif
  return scratch.narrow(0, aligned, nbytes).view(dtype).view({n, k});
}

// A quantized weight (either layout) as a [N, K] matrix of dtype, in scratch_matrix's buffer.
at::Tensor dequantize(const at::Tensor& weight, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
                      int64_t n, int64_t k, at::ScalarType dtype) {
  auto out = scratch_matrix(n, k, dtype);
  PAGEDLLM_DISPATCH_FLOAT_TYPES(dtype, "dequantize", [&] {
    with_quant_weight(weight, scale, offset, k, [&](const auto& w) {
      dequantize_rows<scalar_t, typename std::decay_t<decltype(w)>::value_type>(w, out.data_ptr<scalar_t>(), n);
    });
  });
  return out;
}

// The dtype a matrix product multiplies in: x's, but fp32 for bf16 and fp16 activations on CPUs without
// AVX512-BF16, where torch's matmul for them ran at a seventh of fp32's speed (measured here on AVX2 at 128 x 576 x
// 1536: 16 against 112 GFLOP/s; converting the weights to fp32 costs less than that).
at::ScalarType matmul_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || cpu_has_bf16_dot() ? x.scalar_type() : at::kFloat;
}

// x [M, K] w^T (+ bias), w [N, K] in matmul_dtype(x) or (converted here) in x's dtype; the result in x's dtype.
at::Tensor matmul(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  const auto dtype = matmul_dtype(x);
  if (dtype == x.scalar_type()) return at::linear(x, w, bias);
  const auto wd = w.scalar_type() == dtype ? w : scratch_matrix(w.size(0), w.size(1), dtype).copy_(w);
  return at::linear(x.to(dtype), wd, bias ? std::optional<at::Tensor>(bias->to(dtype)) : std::nullopt)
      .to(x.scalar_type());
}

}  // namespace
}  // namespace pagedllm::cpu

namespace pagedllm {

// x: [M, K]; weight: [N, K] in x's dtype, or quantized: int8 [N, K] or 4-bit uint8 [N, K / 2] with fp16 scale
// [N, groups] and optionally offset [N, groups], or tiled for int8 dot products (quant_gemv_tiled.h: values
// [N / 16, K / 4 or K / 8, 64], scale and offset [N / 16, groups, 16]); bias: [N] or none. Returns [M, N]. Up to
// kMaxRows rows (kMaxQuantRows for 4-bit and tiled weights; tiled ones any number on AVX2 builds:
// tiled_batches_in_int8) stream the weights through the GEMVs above; more rows are a matrix product: float weights
// through torch's, quantized ones through quant_gemm.h (bf16 rows on AVX512-BF16),
// elsewhere torch's int8-weight kernel (per-row int8, up to kInt8KernelRows rows) or the weights dequantized once
// per call for torch's (which multiplies in fp32 where bf16 would be slow: matmul_dtype).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset) {
  const bool tiled = weight.dim() == 3, int8 = weight.scalar_type() == at::kChar, int4 = weight.scalar_type() == at::kByte;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (weight.dim() == 2 || tiled),
              "linear: x [M, K] and weight [N, *] (or tiled) on the CPU");
  const int64_t k = x.size(1), tile = tiled ? cpu::kTileFeatures : 1, n = weight.size(0) * tile;
  TORCH_CHECK(weight.is_contiguous() && (int8 || int4 || (!tiled && weight.scalar_type() == x.scalar_type())),
              "linear: weight dtype");
  TORCH_CHECK(tiled ? weight.size(2) == 64 && weight.size(1) * 64 / tile == (int4 ? k / 2 : k) && cpu::cpu_has_int8_dot()
                    : weight.size(1) == (int4 ? k / 2 : k),
              "linear: weight [N, K] (4-bit: [N, K / 2]), or tiled [N / 16, K / 4 or K / 8, 64] on a CPU with "
              "AVX512-VNNI or AVX2");
  TORCH_CHECK((int8 || int4) == scale.has_value() && (scale.has_value() || !offset.has_value()),
              "linear: quantized weights need a scale (and may have an offset), others neither");
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == n),
              "linear: bias is [N] in x's dtype");
  for (const auto* t : {&scale, &offset})
    TORCH_CHECK(!*t || ((*t)->scalar_type() == at::kHalf && (*t)->is_contiguous() && (*t)->dim() == weight.dim() &&
                        (*t)->size(0) == weight.size(0) && (*t)->size(1) == scale->size(1) && k % (*t)->size(1) == 0 &&
                        (!tiled || ((*t)->size(2) == tile && (k / (*t)->size(1)) % cpu::kQuantBlock == 0))),
                "linear: scale and offset are fp16 [N, groups] (tiled: [N / 16, groups, 16], groups of a multiple "
                "of 32), groups dividing K");
  if (int4) {
    const int64_t g_size = scale->size(1) > 0 ? k / scale->size(1) : 0;
    TORCH_CHECK(k % 32 == 0 && g_size % 32 == 0 && (g_size & (g_size - 1)) == 0,
                "linear: 4-bit weights need K a multiple of 32 and groups of 32 times a power of two");
  }
  if (x.size(0) == 0) return at::empty({0, n}, x.options());
  if (tiled && (x.size(0) <= cpu::kMaxQuantRows || cpu::tiled_batches_in_int8())) {
    return cpu::tiled_linear(x, weight, bias, *scale, offset);
  }
  if (!tiled && x.size(0) <= (int4 ? cpu::kMaxQuantRows : cpu::kMaxRows)) {
    return cpu::small_batch_linear(x, weight, bias, scale, offset);
  }
  if (!int8 && !int4) return cpu::matmul(x, weight, bias);
  if (cpu::quant_gemm_applies(x, *scale, n, k)) return cpu::quant_gemm(x, weight, bias, *scale, offset, n);
  // torch's int8 kernel: per-row scales, rows of a multiple of 16 values (it crashed on 72)
  if (int8 && !tiled && !offset && scale->size(1) == 1 && x.size(0) <= cpu::kInt8KernelRows && k % 16 == 0) {
    auto y = at::_weight_int8pack_mm(x.contiguous(), weight, scale->view({n}).to(x.scalar_type()));
    return bias ? y + *bias : y;
  }
  return cpu::matmul(x, cpu::dequantize(weight, *scale, offset, n, k, cpu::matmul_dtype(x)), bias);
}

}  // namespace pagedllm

namespace {
bool tiled_weights_supported() { return pagedllm::cpu::cpu_has_int8_dot(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(pagedllm, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? offset) -> Tensor");
  m.def("tiled_weights_supported() -> bool", &tiled_weights_supported);
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) { m.impl("linear", &pagedllm::linear); }
