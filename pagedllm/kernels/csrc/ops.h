// The native CPU operators, callable from C++ too: the decoder-layer stack (decoder_layer_cpu.cpp) composes
// them without a round trip through Python and the dispatcher for each.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pagedllm {

// Whether this CPU has AVX512-BF16's pairwise dot products (the kernels built for AVX-512 use them for bf16
// where it does).
inline bool cpu_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
at::Tensor silu_and_mul(const at::Tensor& x);
void rotary_embedding(const at::Tensor& positions, at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_start, const at::Tensor& context_lens,
                           double scale);
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping);

}  // namespace pagedllm
