// Greedy sampling's argmax on the CPU. torch's max-with-indices over a row does not vectorise there: 44 us for one
// 49k-vocabulary row of bf16 logits (its argmax 160 us), about a hundredth of a small model's decode step. Here
// each lane keeps its best value and that value's first index; the lanes' winners are then compared, the first
// index winning ties, so the result is torch.argmax's (NaNs aside: they never win here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <limits>

namespace pagedllm::cpu {
namespace {

constexpr int64_t kChains = 4;  // independent (best, index) vectors: one alone waits on its compare and blend

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  constexpr float kLow = -std::numeric_limits<float>::infinity();
  Vec best[kChains], where[kChains];  // indices as floats: exact below 2^24, far above any vocabulary
  for (int64_t c = 0; c < kChains; ++c) best[c] = Vec(kLow), where[c] = Vec(-1.f);
  const Vec step(static_cast<float>(kLanes));
  Vec index = Vec::arange(0.f, 1.f);
  int64_t i = 0;
  for (; i + kChains * kLanes <= n; i += kChains * kLanes) {
    for (int64_t c = 0; c < kChains; ++c, index = index + step) {
      const Vec v = load_float(x + i + c * kLanes);
      const Vec better = v > best[c];
      best[c] = Vec::blendv(best[c], v, better);
      where[c] = Vec::blendv(where[c], index, better);
    }
  }
  int64_t arg = 0;  // from x[0]: a lane's winner replaces the current one if larger, or equal at a smaller index
  float top = static_cast<float>(x[0]);
  for (int64_t c = 0; c < kChains; ++c) {
    float values[kLanes], indices[kLanes];
    best[c].store(values);
    where[c].store(indices);
    for (int64_t l = 0; l < kLanes; ++l)
      if (indices[l] >= 0 && (values[l] > top || (values[l] == top && indices[l] < arg))) {
        top = values[l];
        arg = static_cast<int64_t>(indices[l]);
      }
  }
  for (; i < n; ++i)
    if (static_cast<float>(x[i]) > top) {
      top = static_cast<float>(x[i]);
      arg = i;
    }
  return arg;
}

}  // namespace
}  // namespace pagedllm::cpu

namespace pagedllm {

// Index of each row's maximum of x [rows, n] (the first on ties), int64 [rows].
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) > 0, "argmax: a 2-D CPU tensor with columns");
  const auto xc = x.contiguous();
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  int64_t* po = out.data_ptr<int64_t>();
  const int64_t n = x.size(1);
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "argmax", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) po[r] = cpu::argmax_row(px + r * n, n);
    });
  });
  return out;
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm, m) { m.def("argmax(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) { m.impl("argmax", &pagedllm::argmax); }
