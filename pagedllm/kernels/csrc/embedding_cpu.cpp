// Rows of a quantized embedding table, dequantized. layers/quantization.py's `embed` gathers them with a dozen
// torch ops (a decode step's one row took about 90 us there, the weights streaming through each step having
// evicted the interpreter's data); here one pass over the rows asked for, either layout (quant_gemv_tiled.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <cstring>
#include <vector>

namespace pagedllm::cpu {
namespace {

// A quantized [N, K] weight's rows as 32-bit words (int8: 4 values; 4-bit: 8 nibbles of a 32-value block, byte j
// holding values j and j + 16) and its group scales and offsets, untiled or tiled (rows interleaved by 16).
struct Rows {
  const uint32_t* words;
  const at::Half *scale, *offset;
  int64_t words_per_row, groups;
  bool tiled;

  int64_t word(int64_t r, int64_t w) const {
    return tiled ? ((r / 16) * words_per_row + w) * 16 + r % 16 : r * words_per_row + w;
  }
  int64_t group(int64_t r, int64_t g) const { return tiled ? ((r / 16) * groups + g) * 16 + r % 16 : r * groups + g; }
};

// s * q (+ o) in fp32, multiplied and added apart as the torch path computes it (no fused multiply-add), then cast.
template <typename T>
__attribute__((optimize("fp-contract=off"))) void dequantize_row(const Rows& w, int64_t r, int64_t k, bool int4,
                                                                  float* q, T* out) {
  for (int64_t i = 0; i < w.words_per_row; ++i) {
    uint32_t word = w.words[w.word(r, i)];
    for (int64_t b = 0; b < 4; ++b, word >>= 8) {
      const int64_t j = 4 * i + b;  // the byte's place in the row
      if (int4) {
        const int64_t v = j / 16 * 32 + j % 16;
        q[v] = static_cast<float>(word & 15);
        q[v + 16] = static_cast<float>((word >> 4) & 15);
      } else {
        q[j] = static_cast<float>(static_cast<int8_t>(word & 255));
      }
    }
  }
  const int64_t g_size = k / w.groups;
  for (int64_t g = 0; g < w.groups; ++g) {
    const float s = static_cast<float>(w.scale[w.group(r, g)]);
    const float o = w.offset != nullptr ? static_cast<float>(w.offset[w.group(r, g)]) : 0.f;
    for (int64_t i = g * g_size; i < (g + 1) * g_size; ++i) {
      float x = q[i] * s;
      if (w.offset != nullptr) x += o;
      out[i] = static_cast<T>(x);
    }
  }
}

}  // namespace
}  // namespace pagedllm::cpu

namespace pagedllm {

// ids: int64 [T]; weight: int8 [N, K] or 4-bit uint8 [N, K / 2], or either tiled ([N / 16, words, 64]); scale and
// offset: fp16 [N, groups] (tiled: [N / 16, groups, 16]). Returns [T, K] in dtype.
at::Tensor quantized_embedding(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& scale,
                               const std::optional<at::Tensor>& offset, at::ScalarType dtype) {
  const bool tiled = weight.dim() == 3, int4 = weight.scalar_type() == at::kByte;
  TORCH_CHECK(ids.device().is_cpu() && ids.dim() == 1 && ids.scalar_type() == at::kLong,
              "quantized_embedding: ids are a 1-D int64 CPU tensor");
  TORCH_CHECK((int4 || weight.scalar_type() == at::kChar) && weight.is_contiguous() && (weight.dim() == 2 || tiled),
              "quantized_embedding: weight int8 or 4-bit uint8, [N, *] or tiled");
  const int64_t n = weight.size(0) * (tiled ? 16 : 1), row_bytes = tiled ? weight.size(1) * 4 : weight.size(1);
  const int64_t k = int4 ? 2 * row_bytes : row_bytes, groups = scale.size(1);
  TORCH_CHECK(row_bytes % 4 == 0 && (!int4 || k % 32 == 0), "quantized_embedding: rows of whole words and blocks");
  for (const auto* t : {&scale, offset ? &*offset : nullptr})
    TORCH_CHECK(t == nullptr || (t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == weight.dim() &&
                                 t->size(0) == weight.size(0) && t->size(1) == groups && groups > 0 && k % groups == 0),
                "quantized_embedding: scale and offset fp16 [N, groups] (tiled [N / 16, groups, 16])");
  const auto idc = ids.contiguous();
  const int64_t* pid = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < idc.numel(); ++t)
    TORCH_CHECK(pid[t] >= 0 && pid[t] < n, "quantized_embedding: id ", pid[t], " outside the table's ", n, " rows");
  const cpu::Rows rows{static_cast<const uint32_t*>(weight.data_ptr()), scale.data_ptr<at::Half>(),
                       offset ? offset->data_ptr<at::Half>() : nullptr, row_bytes / 4, groups, tiled};
  auto out = at::empty({idc.numel(), k}, weight.options().dtype(dtype));
  PAGEDLLM_DISPATCH_FLOAT_TYPES(dtype, "quantized_embedding", [&] {
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, idc.numel(), 64, [&](int64_t begin, int64_t end) {
      std::vector<float> q(k);
      for (int64_t t = begin; t < end; ++t) cpu::dequantize_row(rows, pid[t], k, int4, q.data(), po + t * k);
    });
  });
  return out;
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm, m) {
  m.def("quantized_embedding(Tensor ids, Tensor weight, Tensor scale, Tensor? offset, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) { m.impl("quantized_embedding", &pagedllm::quantized_embedding); }
