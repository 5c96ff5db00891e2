"""Owns the model and the paged KV pool; turns a scheduled batch into tensors, runs it, samples."""

from __future__ import annotations

import torch

from pagedllm.config import EngineArgs, ModelConfig
from pagedllm.engine.scheduler import ScheduledSeq
from pagedllm.engine.sequence import Sequence
from pagedllm.kernels import native_attention_supported, native_ops_enabled
from pagedllm.layers.attention import PagedAttention
from pagedllm.layers.custom_op import enable_native_ops
from pagedllm.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from pagedllm.model_executor.context import attention_metadata
from pagedllm.model_executor.input_builder import InputBuilder, StepInputs
from pagedllm.model_loader.weights import build_model
from pagedllm.models.decoder import Stage
from pagedllm.platform import advise_huge_pages, move_to_huge_pages


class ModelRunner:
    def __init__(self, cfg: ModelConfig, folder: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 quantization: str | None = None, stage: Stage | None = None, load_format: str = "auto"):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.model = build_model(cfg, folder, dtype, device, quantization, stage, load_format, seed)
        move_to_huge_pages(self.model)  # its CPU parameters; a no-op on other devices
        if native_ops_enabled(device, dtype):
            enable_native_ops(self.model)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.sampler = Sampler(seed)
        self.kv_cache: torch.Tensor | None = None
        self.block_size = 0

    @classmethod
    def for_engine(cls, args: EngineArgs, cfg: ModelConfig, folder: str, dtype: torch.dtype, device: torch.device,
                   stage: Stage | None = None) -> ModelRunner:
        """The runner every executor builds for its rank or stage from the engine arguments."""
        return cls(cfg, folder, dtype, device, args.seed, args.quantization, stage, args.load_format)

    @property
    def weight_bytes(self) -> int:
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(seen.values())

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        attn = self.attn_layers[0]
        shape = (len(self.attn_layers), 2, attn.num_kv_heads, num_blocks, block_size, attn.head_dim)
        self.kv_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        advise_huge_pages(self.kv_cache)
        self.kv_cache.zero_()
        self.block_size = block_size
        native = native_attention_supported(self.device, self.dtype, attn.head_dim)
        self.inputs = InputBuilder(block_size, attn.num_kv_heads, num_blocks, self.device, native)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]

    def copy_blocks(self, copies: torch.Tensor) -> None:
        src, dst = copies[:, 0].to(self.device), copies[:, 1].to(self.device)
        self.kv_cache[:, :, :, dst] = self.kv_cache[:, :, :, src]

    @torch.inference_mode()
    def profile_peak_activations(self, num_tokens: int, max_model_len: int, block_size: int) -> int:
        """Run one forward pass over `num_tokens` dummy prompt tokens (in sequences of at most max_model_len)
        and return the peak memory it took beyond weights and its scratch KV (CUDA memory statistics)."""
        from pagedllm.engine.sequence import Request
        from pagedllm.sampling_params import SamplingParams

        sizes = [min(max_model_len, num_tokens - i) for i in range(0, num_tokens, max_model_len)]
        blocks = [-(-n // block_size) for n in sizes]
        self.allocate_kv_cache(sum(blocks), block_size)
        batch, first = [], 0
        for n, nb in zip(sizes, blocks):
            seq = Request("profile", None, [0] * n, SamplingParams(max_tokens=1)).seqs[0]
            seq.block_table = list(range(first, first + nb))
            first += nb
            batch.append(ScheduledSeq(seq, n))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.run(StepInputs.from_batch(batch, [], list(range(len(batch)))))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.kv_cache = None
        torch.cuda.empty_cache()
        return peak

    # ---- step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, step: StepInputs, hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """This stage's layers over every token of the step (their K/V are written into the pool): hidden states,
        or (hidden, residual) for the next pipeline stage."""
        input_ids, positions, meta = self.inputs.build(step)
        with attention_metadata(meta):
            return self.model(input_ids, positions, hidden, residual)

    @torch.inference_mode()
    def run(self, step: StepInputs, hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """Run one step: logits of the sampled rows (every tensor-parallel rank computes them), or, on a pipeline
        stage before the last, the (hidden, residual) to pass on."""
        if len(step.copies):
            self.copy_blocks(step.copies)
        hidden = self.forward(step, hidden, residual)
        if not self.model.stage.last:
            return hidden
        if not len(step.sample_rows):
            return None
        last = torch.cumsum(step.lens, 0) - 1
        return self.model.compute_logits(hidden[last[step.sample_rows].to(self.device)])

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        sm = SamplingMetadata.from_seqs(seqs, self.cfg.vocab_size, self.cfg.eos_token_ids, self.device)
        return self.sampler(logits, sm)
