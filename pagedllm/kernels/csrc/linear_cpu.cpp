// y = x W^T for the few rows of a small decode batch. A matmul library tuned for large batches streams
// the weights well below the memory's bandwidth at one row (measured here: about 22 GB/s of weights
// against 35-40 GB/s copy bandwidth); this kernel reads each weight row once, straight into fp32
// dot products with every input row, splitting the output features over the threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kMaxRows = 4;  // the input rows one pass over the weights serves

template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

template <typename T, int64_t M>
void gemv(const T* x, const T* w, const T* bias, T* y, int64_t n_out, int64_t k) {
  std::vector<float> xf(M * k);  // the inputs in fp32, read from cache for every weight row
  for (int64_t i = 0; i < M * k; ++i) xf[i] = static_cast<float>(x[i]);
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* wr = w + n * k;
      Vec acc[M];
      for (int64_t m = 0; m < M; ++m) acc[m] = Vec(0.f);
      int64_t i = 0;
      for (; i + kLanes <= k; i += kLanes) {
        const Vec wv = load_float(wr + i);
        for (int64_t m = 0; m < M; ++m) acc[m] = at::vec::fmadd(Vec::loadu(xf.data() + m * k + i), wv, acc[m]);
      }
      for (int64_t m = 0; m < M; ++m) {
        float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[m]);
        for (int64_t j = i; j < k; ++j) s += xf[m * k + j] * static_cast<float>(wr[j]);
        if (bias != nullptr) s += static_cast<float>(bias[n]);
        y[m * n_out + n] = static_cast<T>(s);
      }
    }
  });
}

// x: [M, K] with M <= 4; weight: [N, K]; bias: [N] or none. Returns [M, N].
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "small_batch_linear: x [M, K] and weight [N, K] on the CPU");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "small_batch_linear: 1 to ", kMaxRows, " rows");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous(), "small_batch_linear: weight dtype");
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == weight.size(0)),
              "small_batch_linear: bias");
  const auto xc = x.contiguous();
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* b = bias ? bias->data_ptr<T>() : nullptr;
    auto call = [&](auto rows) {
      gemv<T, decltype(rows)::value>(xc.data_ptr<T>(), weight.data_ptr<T>(), b, y.data_ptr<T>(), weight.size(0),
                                     weight.size(1));
    };
    switch (x.size(0)) {
      case 1: call(std::integral_constant<int64_t, 1>{}); break;
      case 2: call(std::integral_constant<int64_t, 2>{}); break;
      case 3: call(std::integral_constant<int64_t, 3>{}); break;
      default: call(std::integral_constant<int64_t, 4>{}); break;
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "small_batch_linear: unsupported dtype ", x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagedllm, m) { m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) { m.impl("small_batch_linear", &small_batch_linear); }
