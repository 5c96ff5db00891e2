// A stack of decoder layers (Llama / Qwen2 / Qwen3) as one operator, composed of the other native kernels.
// At decode batch sizes a layer's dozen small operators cost more in Python and dispatcher overhead than
// in memory traffic: measured here, about 90 us of a 250 us layer (the weights streaming through evict
// the interpreter's own data from the caches), and still about 20 us per layer with one call per layer.
// In one call the same kernels run back to back in C++. It computes exactly what models/decoder.py's
// layers compute with those kernels one by one (tested against them); tensor-parallel layers, which
// all-reduce inside, keep the module path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace pagedllm {

namespace {

constexpr size_t kLayerParams = 19;  // per layer, in models/decoder.py's DecoderLayer.native_params order

// residual += x (the previous layer's output; none before the first layer), then this layer on the normed
// residual. Updates x and residual in place and returns the layer's output.
at::Tensor decoder_layer(const std::optional<at::Tensor>& x, at::Tensor& residual, const at::Tensor& positions,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                         const at::Tensor& block_tables, const at::Tensor& query_start, const at::Tensor& context_lens,
                         const at::Tensor& input_norm, const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias,
                         const std::optional<at::Tensor>& qkv_scale, const std::optional<at::Tensor>& qkv_offset,
                         const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                         const at::Tensor& o, const std::optional<at::Tensor>& o_scale,
                         const std::optional<at::Tensor>& o_offset, const at::Tensor& post_norm,
                         const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_scale,
                         const std::optional<at::Tensor>& gate_up_offset, const at::Tensor& down,
                         const std::optional<at::Tensor>& down_scale, const std::optional<at::Tensor>& down_offset,
                         const at::Tensor& cos,
                         const at::Tensor& sin, int64_t num_heads, double eps, double scale) {
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "decoder_layer: q_norm and k_norm come together");
  at::Tensor h;
  if (x) {
    h = *x;
    fused_add_rms_norm(h, residual, input_norm, eps);
  } else {
    h = rms_norm(residual, input_norm, eps);
  }
  const int64_t tokens = residual.size(0), kv_heads = k_cache.size(0), head_dim = k_cache.size(3);
  const auto proj = linear(h, qkv, qkv_bias, qkv_scale, qkv_offset);
  auto q = proj.narrow(1, 0, num_heads * head_dim).view({tokens, num_heads, head_dim});
  auto k = proj.narrow(1, num_heads * head_dim, kv_heads * head_dim).view({tokens, kv_heads, head_dim});
  const auto v = proj.narrow(1, (num_heads + kv_heads) * head_dim, kv_heads * head_dim).view({tokens, kv_heads, head_dim});
  if (q_norm) {
    q = rms_norm(q.contiguous(), *q_norm, eps);
    k = rms_norm(k.contiguous(), *k_norm, eps);
  }
  rotary_embedding(positions, q, cos, sin);
  rotary_embedding(positions, k, cos, sin);
  reshape_and_cache(k, v, k_cache, v_cache, slot_mapping);
  const auto attn = paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale);
  auto out = linear(attn.view({tokens, num_heads * head_dim}), o, std::nullopt, o_scale, o_offset);
  fused_add_rms_norm(out, residual, post_norm, eps);
  const auto act = silu_and_mul(linear(out, gate_up, std::nullopt, gate_up_scale, gate_up_offset));
  return linear(act, down, std::nullopt, down_scale, down_offset);
}

}  // namespace

// The layers in order: kv_caches holds each layer's key and value pool, weights its kLayerParams tensors.
// residual += x, then the first layer, and so on; returns the last layer's output (residual updated in place).
at::Tensor decoder_layers(const std::optional<at::Tensor>& x, at::Tensor& residual, const at::Tensor& positions,
                          const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& query_start,
                          const at::Tensor& context_lens, at::TensorList kv_caches,
                          const c10::List<std::optional<at::Tensor>>& weights, int64_t num_heads, double eps,
                          double scale) {
  const size_t layers = kv_caches.size() / 2;
  TORCH_CHECK(kv_caches.size() == 2 * layers && weights.size() == kLayerParams * layers,
              "decoder_layers: two KV pools and ", kLayerParams, " weights per layer");
  std::optional<at::Tensor> h = x;
  for (size_t i = 0; i < layers; ++i) {
    auto w = [&](size_t j) -> std::optional<at::Tensor> { return weights.get(i * kLayerParams + j); };
    at::Tensor k_cache = kv_caches[2 * i], v_cache = kv_caches[2 * i + 1];
    h = decoder_layer(h, residual, positions, k_cache, v_cache, slot_mapping, block_tables, query_start, context_lens,
                      *w(0), *w(1), w(2), w(3), w(4), w(5), w(6), *w(7), w(8), w(9), *w(10), *w(11), w(12), w(13),
                      *w(14), w(15), w(16), *w(17), *w(18), num_heads, eps, scale);
  }
  TORCH_CHECK(h.has_value(), "decoder_layers: no layers and no input");
  return *h;
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm, m) {
  m.def(
      "decoder_layers(Tensor(a!)? x, Tensor(b!) residual, Tensor positions, Tensor slot_mapping, Tensor block_tables, "
      "Tensor query_start, Tensor context_lens, Tensor(c!)[] kv_caches, Tensor?[] weights, int num_heads, float eps, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) { m.impl("decoder_layers", &pagedllm::decoder_layers); }
