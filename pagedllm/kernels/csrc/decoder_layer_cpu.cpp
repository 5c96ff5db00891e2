// A stack of decoder layers (Llama / Qwen2 / Qwen3) as one operator, composed of the other native kernels.
// At decode batch sizes a layer's dozen small operators cost more in Python and dispatcher overhead than
// in memory traffic: measured here, about 90 us of a 250 us layer (the weights streaming through evict
// the interpreter's own data from the caches), and still about 20 us per layer with one call per layer.
// In one call the same kernels run back to back in C++. It computes exactly what models/decoder.py's
// layers compute with those kernels one by one (tested against them); tensor-parallel layers, which
// all-reduce inside, keep the module path. The weights travel once, in a DecoderStack object: as an argument
// list of 26 per layer their conversion from Python cost about 100 us a call (260 us with cold caches).
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "ops.h"

namespace pagedllm {

namespace {

// A linear layer's tensors: weight, bias, scale, offset, and the input permutation of a GPTQ act-order layer.
constexpr size_t kLinearParams = 5;
// Per layer, in models/decoder.py's DecoderLayer.native_params order: input_norm, q_norm, k_norm, post_norm, cos,
// sin, then qkv, o, gate_up and down with kLinearParams each.
constexpr size_t kLayerParams = 6 + 4 * kLinearParams;

using Weights = c10::List<std::optional<at::Tensor>>;

struct Linear {
  at::Tensor weight;
  std::optional<at::Tensor> bias, scale, offset, perm;

  at::Tensor operator()(const at::Tensor& x) const {
    return linear(perm ? x.index_select(1, *perm) : x, weight, bias, scale, offset);
  }
};

// One layer's view of the weights list.
struct LayerWeights {
  const Weights& all;
  size_t first;

  std::optional<at::Tensor> get(size_t j) const { return all.get(first + j); }
  Linear linear_at(size_t j) const {
    const size_t at = 6 + j * kLinearParams;
    return {*get(at), get(at + 1), get(at + 2), get(at + 3), get(at + 4)};
  }
};

// The step's attention inputs, shared by every layer.
struct StepMeta {
  const at::Tensor &positions, &slot_mapping, &block_tables, &query_start, &context_lens;
};

// residual += x (the previous layer's output; none before the first layer), then this layer on the normed
// residual. Updates x and residual in place and returns the layer's output.
at::Tensor decoder_layer(const std::optional<at::Tensor>& x, at::Tensor& residual, const StepMeta& meta,
                         at::Tensor& k_cache, at::Tensor& v_cache, const LayerWeights& w, int64_t num_heads,
                         double eps, double scale) {
  const auto input_norm = *w.get(0), post_norm = *w.get(3), cos = *w.get(4), sin = *w.get(5);
  const auto q_norm = w.get(1), k_norm = w.get(2);
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "decoder_layer: q_norm and k_norm come together");
  at::Tensor h;
  if (x) {
    h = *x;
    fused_add_rms_norm(h, residual, input_norm, eps);
  } else {
    h = rms_norm(residual, input_norm, eps);
  }
  const int64_t tokens = residual.size(0), kv_heads = k_cache.size(0), head_dim = k_cache.size(3);
  const auto proj = w.linear_at(0)(h);
  auto q = proj.narrow(1, 0, num_heads * head_dim).view({tokens, num_heads, head_dim});
  auto k = proj.narrow(1, num_heads * head_dim, kv_heads * head_dim).view({tokens, kv_heads, head_dim});
  const auto v = proj.narrow(1, (num_heads + kv_heads) * head_dim, kv_heads * head_dim).view({tokens, kv_heads, head_dim});
  if (q_norm) {
    q = rms_norm(q.contiguous(), *q_norm, eps);
    k = rms_norm(k.contiguous(), *k_norm, eps);
  }
  rotary_embedding(meta.positions, q, cos, sin);
  rotary_embedding(meta.positions, k, cos, sin);
  reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping);
  const auto attn = paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start, meta.context_lens, scale);
  auto out = w.linear_at(1)(attn.view({tokens, num_heads * head_dim}));
  fused_add_rms_norm(out, residual, post_norm, eps);
  const auto act = silu_and_mul(w.linear_at(2)(out));
  return w.linear_at(3)(act);
}

}  // namespace

// A stack's weights (kLayerParams per layer) and shapes, handed over once.
struct DecoderStack : torch::CustomClassHolder {
  Weights weights;
  int64_t num_heads;
  double eps, scale;

  DecoderStack(Weights weights, int64_t num_heads, double eps, double scale)
      : weights(std::move(weights)), num_heads(num_heads), eps(eps), scale(scale) {}
};

// The layers in order: kv_caches holds each layer's key and value pool. residual += x, then the first layer, and so
// on; returns the last layer's output (residual updated in place).
at::Tensor decoder_layers(const std::optional<at::Tensor>& x, at::Tensor& residual, const at::Tensor& positions,
                          const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& query_start,
                          const at::Tensor& context_lens, at::TensorList kv_caches,
                          const c10::intrusive_ptr<DecoderStack>& stack) {
  const size_t layers = kv_caches.size() / 2;
  TORCH_CHECK(kv_caches.size() == 2 * layers && stack->weights.size() == kLayerParams * layers,
              "decoder_layers: two KV pools and ", kLayerParams, " weights per layer");
  std::optional<at::Tensor> h = x;
  const StepMeta meta{positions, slot_mapping, block_tables, query_start, context_lens};
  for (size_t i = 0; i < layers; ++i) {
    at::Tensor k_cache = kv_caches[2 * i], v_cache = kv_caches[2 * i + 1];
    h = decoder_layer(h, residual, meta, k_cache, v_cache, LayerWeights{stack->weights, i * kLayerParams},
                      stack->num_heads, stack->eps, stack->scale);
  }
  TORCH_CHECK(h.has_value(), "decoder_layers: no layers and no input");
  return *h;
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm, m) {
  m.class_<pagedllm::DecoderStack>("DecoderStack")
      .def(torch::init<pagedllm::Weights, int64_t, double, double>());
  m.def(
      "decoder_layers(Tensor(a!)? x, Tensor(b!) residual, Tensor positions, Tensor slot_mapping, Tensor block_tables, "
      "Tensor query_start, Tensor context_lens, Tensor(c!)[] kv_caches, "
      "__torch__.torch.classes.pagedllm.DecoderStack stack) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) { m.impl("decoder_layers", &pagedllm::decoder_layers); }
