"""Owns one rank's model shard and its paged KV pool; turns a step's tensors into a forward pass."""

from __future__ import annotations

import torch

from pagedllm.config import EngineConfig
from pagedllm.forward_context import attention_metadata
from pagedllm.kernels import int8_activations, native_attention_supported, native_ops_enabled, triton_attention_enabled
from pagedllm.layers.attention import PagedAttention
from pagedllm.layers.custom_op import enable_native_ops
from pagedllm.layers.quantization import tile_for_int8_dot_
from pagedllm.model_loader.weights import build_model
from pagedllm.models.decoder import Stage
from pagedllm.platform import advise_huge_pages, move_to_huge_pages
from pagedllm.step import PromptLogprobs, StepInputs
from pagedllm.worker.cuda_graphs import CudaGraphs
from pagedllm.worker.input_builder import InputBuilder


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device, stage: Stage | None = None):
        self.config, self.device, self.dtype = config, device, config.dtype
        self.model = build_model(config, device, stage)
        native = native_ops_enabled(device, self.dtype)
        if native and self.dtype == torch.bfloat16 and int8_activations(config.load.quantization):
            tile_for_int8_dot_(self.model)
        move_to_huge_pages(self.model)  # its CPU parameters; a no-op on other devices
        if native:
            enable_native_ops(self.model)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.kv_cache: torch.Tensor | None = None
        self.inputs: InputBuilder | None = None
        self.graphs: CudaGraphs | None = None

    @property
    def weight_bytes(self) -> int:
        """What the parameters hold, less act-order layers' input permutations (int32 indices, a few KB the memory
        planner leaves out)."""
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters() if p.dtype != torch.int32}
        return sum(seen.values())

    @property
    def kv_cache_bytes(self) -> int:
        return 0 if self.kv_cache is None else self.kv_cache.numel() * self.kv_cache.element_size()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        attn, block_size = self.attn_layers[0], self.config.cache.block_size
        shape = (len(self.attn_layers), 2, attn.num_kv_heads, num_blocks, block_size, attn.head_dim)
        self.kv_cache = torch.empty(shape, dtype=self.config.cache.cache_dtype, device=self.device)
        advise_huge_pages(self.kv_cache)
        self.kv_cache.zero_()
        native = (triton_attention_enabled(self.device, block_size, attn.head_dim)
                  or native_attention_supported(self.device, self.dtype, attn.head_dim))
        self.inputs = InputBuilder(block_size, attn.num_kv_heads, num_blocks, self.device, native)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        if self.config.cuda_graph_sizes and native and self.device.type == "cuda":  # the graphs read this pool
            max_blocks = -(-self.config.max_model_len // block_size)
            with torch.inference_mode():
                self.graphs = CudaGraphs(self.model, self.config.cuda_graph_sizes, max_blocks, self.device)

    def free_kv_cache(self) -> None:
        self.kv_cache, self.inputs, self.graphs = None, None, None
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)

    def copy_blocks(self, copies: torch.Tensor) -> None:
        src, dst = copies[:, 0].to(self.device), copies[:, 1].to(self.device)
        self.kv_cache[:, :, :, dst] = self.kv_cache[:, :, :, src]

    @torch.inference_mode()
    def forward(self, step: StepInputs, hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """This stage's layers over every token of the step (their K/V are written into the pool): hidden states,
        or (hidden, residual) for the next pipeline stage."""
        if len(step.copies):
            self.copy_blocks(step.copies)
        input_ids, positions, meta = self.inputs.build(step)
        if self.graphs is not None and self.graphs.covers(step):
            return self.graphs.run(input_ids, positions, meta)
        with attention_metadata(meta):
            return self.model(input_ids, positions, hidden, residual)

    @torch.inference_mode()
    def run(self, step: StepInputs, hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """Run one step. The last stage returns (logits of the sampled rows or None, PromptLogprobs or None); every
        tensor-parallel rank computes them. A pipeline stage before the last returns (hidden, residual) to pass on."""
        hidden = self.forward(step, hidden, residual)
        if not self.model.stage.last:
            return hidden
        prompt = self._prompt_logprobs(step, hidden) if len(step.prompt_logprobs) else None
        if not len(step.sample_positions):
            return None, prompt
        if not (step.decodes_only and len(step.sample_positions) == len(hidden)):  # else every row, once, in order
            hidden = hidden[step.sample_positions.to(self.device)]
        return self.model.compute_logits(hidden), prompt

    def _prompt_logprobs(self, step: StepInputs, hidden: torch.Tensor, chunk: int = 256) -> PromptLogprobs:
        """Each requested row's prompt tokens after its chunk's first, scored by the positions before them (the last
        position scores the prompt token after the chunk, when there is one). Logits in pieces of `chunk` positions
        keep the fp32 [positions, vocab] tensors small."""
        first = torch.cumsum(step.lens, 0) - step.lens
        positions, targets, counts = [], [], []
        for row, _, following in step.prompt_logprobs.tolist():
            a, n = int(first[row]), int(step.lens[row])
            nxt = step.token_ids[a + 1:a + n]
            if following >= 0:
                nxt = torch.cat([nxt, torch.tensor([following])])
            positions.append(torch.arange(a, a + len(nxt)))
            targets.append(nxt)
            counts.append(len(nxt))
        positions, targets = torch.cat(positions).to(self.device), torch.cat(targets).to(self.device)
        k = max(1, int(step.prompt_logprobs[:, 1].max()))
        parts = []
        for i in range(0, len(positions), chunk):
            lp = self.model.compute_logits(hidden[positions[i:i + chunk]]).float().log_softmax(-1)
            chosen = lp.gather(1, targets[i:i + chunk, None])
            top = lp.topk(k, dim=-1)
            parts.append((chosen.squeeze(1), (lp > chosen).sum(-1) + 1, top.indices, top.values))
        return PromptLogprobs(counts, *(torch.cat(x) for x in zip(*parts)))

    @torch.inference_mode()
    def score(self, step: StepInputs) -> torch.Tensor:
        """Logits at every position of the step's tokens (teacher forcing), in fp32."""
        return self.model.compute_logits(self.forward(step)).float()
