// Fused elementwise layers on the CPU, each one pass over memory instead of a chain of torch ops with
// their temporaries (at decode batch sizes, those op launches cost more than the math). Math in fp32,
// rounded to the model's dtype where HF's modules round, vectorised with ATen's portable SIMD types.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace pagedllm::cpu {
namespace {

// Rows are processed kStep values at a time, as two fp32 vectors (one full vector of a 16-bit type);
// a row's tail may be shorter.
constexpr int64_t kStep = 2 * kLanes;
struct Pair {
  Vec lo, hi;
};

template <typename T>
inline Pair load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return {Vec::loadu(p, std::min(n, kLanes)), Vec::loadu(p + kLanes, std::max<int64_t>(0, n - kLanes))};
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n));
    return {lo, hi};
  }
}

template <typename T>
inline void store(T* p, const Pair& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.lo.store(p, std::min(n, kLanes));
    if (n > kLanes) v.hi.store(p + kLanes, n - kLanes);
  } else {
    at::vec::convert_from_float<T>(v.lo, v.hi).store(p, n);
  }
}

// Rounds to T and back, where HF's modules hold an intermediate in the model's dtype: in bf16 a greedy
// choice can hinge on that last bit (measured on the embedded model's first answer token).
template <typename T>
inline Pair round_to(const Pair& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v.lo, v.hi));
    return {lo, hi};
  }
}

// Rows of `n` values each; small batches stay on one thread (a parallel region costs microseconds).
template <typename F>
void for_rows(int64_t rows, int64_t n, F&& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

// out = weight * round(x * rsqrt(mean(x^2) + eps)), the mean in fp32 (HF's RMSNorm).
template <typename T>
void rms_norm_row(const T* x, const T* weight, T* out, int64_t n, float eps) {
  Vec acc(0.f);
  for (int64_t i = 0; i < n; i += kStep) {
    const Pair v = load(x + i, std::min(kStep, n - i));  // a short load fills the rest with zeros
    acc = at::vec::fmadd(v.lo, v.lo, at::vec::fmadd(v.hi, v.hi, acc));
  }
  const Vec rstd(1.f / std::sqrt(sum_of(acc) / n + eps));
  for (int64_t i = 0; i < n; i += kStep) {
    const int64_t m = std::min(kStep, n - i);
    const Pair v = load(x + i, m), w = load(weight + i, m);
    const Pair normed = round_to<T>({v.lo * rstd, v.hi * rstd});
    store(out + i, {normed.lo * w.lo, normed.hi * w.hi}, m);
  }
}

template <typename T>
void rms_norm_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const T *px = x.data_ptr<T>(), *pw = weight.data_ptr<T>();
  T* po = out.data_ptr<T>();
  for_rows(rows, n, [&](int64_t r) { rms_norm_row(px + r * n, pw, po + r * n, n, static_cast<float>(eps)); });
}

// residual = x + residual (rounded to T, as the stream is kept); x = rms_norm(residual): in place.
template <typename T>
void fused_add_rms_norm_impl(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  T *px = x.data_ptr<T>(), *pr = residual.data_ptr<T>();
  const T* pw = weight.data_ptr<T>();
  for_rows(rows, n, [&](int64_t r) {
    T* xr = px + r * n;
    T* rr = pr + r * n;
    for (int64_t i = 0; i < n; i += kStep) {
      const int64_t m = std::min(kStep, n - i);
      const Pair a = load(xr + i, m), b = load(rr + i, m);
      store(rr + i, {a.lo + b.lo, a.hi + b.hi}, m);
    }
    rms_norm_row(rr, pw, xr, n, static_cast<float>(eps));
  });
}

// out = round(silu(gate)) * up, for x = [gate | up] along the last dimension (HF's SwiGLU).
template <typename T>
void silu_and_mul_impl(at::Tensor& out, const at::Tensor& x) {
  const int64_t n = out.size(-1), rows = out.numel() / n;
  const T* px = x.data_ptr<T>();
  T* po = out.data_ptr<T>();
  auto silu = [](const Vec& g) { return g / (Vec(1.f) + g.neg().exp()); };
  for_rows(rows, 2 * n, [&](int64_t r) {
    const T* gate = px + r * 2 * n;
    const T* up = gate + n;
    T* o = po + r * n;
    for (int64_t i = 0; i < n; i += kStep) {
      const int64_t m = std::min(kStep, n - i);
      const Pair g = load(gate + i, m), u = load(up + i, m);
      const Pair act = round_to<T>({silu(g.lo), silu(g.hi)});
      store(o + i, {act.lo * u.lo, act.hi * u.hi}, m);
    }
  });
}

// Rotate-half rotary embedding in place on x [T, heads, D] (token stride may exceed heads * D, as for
// q and k sliced from a fused QKV output): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in fp32.
template <typename T>
void rotary_impl(const at::Tensor& positions, at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2, stride = x.stride(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
  T* px = x.data_ptr<T>();
  const int64_t max_position = cos.size(0);
  for_rows(tokens, heads * half * 2, [&](int64_t t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, "rotary_embedding: position ", pos[t], " outside the table");
    const float* c = pc + pos[t] * half;
    const float* s = ps + pos[t] * half;
    for (int64_t h = 0; h < heads; ++h) {
      T* x1 = px + t * stride + h * 2 * half;
      T* x2 = x1 + half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = static_cast<float>(x1[i]), b = static_cast<float>(x2[i]);
        x1[i] = static_cast<T>(a * c[i] - b * s[i]);
        x2[i] = static_cast<T>(b * c[i] + a * s[i]);
      }
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && weight.is_contiguous(), name, ": contiguous CPU tensors");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(-1), name, ": weight does not match");
}

}  // namespace
}  // namespace pagedllm::cpu

namespace pagedllm {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  cpu::check_rows(x, weight, "rms_norm");
  auto out = at::empty_like(x);
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm", [&] { cpu::rms_norm_impl<scalar_t>(out, x, weight, eps); });
  return out;
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  cpu::check_rows(x, weight, "fused_add_rms_norm");
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm: residual does not match");
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fused_add_rms_norm",
                                [&] { cpu::fused_add_rms_norm_impl<scalar_t>(x, residual, weight, eps); });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.size(-1) % 2 == 0, "silu_and_mul: contiguous [.., 2 * n]");
  auto sizes = x.sizes().vec();
  sizes.back() /= 2;
  auto out = at::empty(sizes, x.options());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "silu_and_mul", [&] { cpu::silu_and_mul_impl<scalar_t>(out, x); });
  return out;
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "rotary_embedding: x must be [tokens, heads, head_dim] with contiguous heads");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == x.size(0),
              "rotary_embedding: one int64 position per token");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.size(1) * 2 == x.size(2),
              "rotary_embedding: fp32 cos/sin tables of head_dim / 2 columns");
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rotary_embedding",
                                [&] { cpu::rotary_impl<scalar_t>(positions, x, cos, sin); });
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) {
  m.impl("rms_norm", &pagedllm::rms_norm);
  m.impl("fused_add_rms_norm", &pagedllm::fused_add_rms_norm);
  m.impl("silu_and_mul", &pagedllm::silu_and_mul);
  m.impl("rotary_embedding", &pagedllm::rotary_embedding);
}
