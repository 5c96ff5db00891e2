"""Weight-only quantization formats: what the engine's arguments, the model loader, the layers and the memory
planner agree on (layers/quantization.py does the work)."""

from __future__ import annotations

from dataclasses import dataclass

INT4_BLOCK = 32  # 4-bit values per packed block (layers/quantization.py)


@dataclass(frozen=True)
class QuantFormat:
    """How one layer's weight is stored under weight-only quantization (layers/quantization.py)."""

    bits: int  # 4 or 8
    group_size: int | None = None  # values per scale; None: the whole row
    offset: bool = False  # asymmetric (scale * q + offset) rather than scale * q
    # GPTQ act-order: the input features were grouped in another order; the columns are stored sorted by group and
    # a layer permutes its input to match (weight_perm)
    act_order: bool = False

    def groups(self, k: int) -> int:
        return 1 if self.group_size is None else k // self.group_size

    def nbytes(self, rows: int, cols: int) -> int:
        """Values plus fp16 scales (and offsets)."""
        return rows * cols * self.bits // 8 + rows * self.groups(cols) * 2 * (1 + self.offset)

    def check(self, k: int, what: str) -> None:
        """Raise unless rows of k values (a tensor-parallel shard's) split into this format's groups and blocks."""
        g = self.group_size or k
        ok = k % g == 0 and (self.bits == 8 or (g % INT4_BLOCK == 0 and (g // INT4_BLOCK) & (g // INT4_BLOCK - 1) == 0))
        if not ok:
            raise ValueError(f"{what}: rows of {k} values do not split into {self.bits}-bit groups of {g}"
                             f"{' (4-bit groups are 32 times a power of two)' if self.bits == 4 else ''}")


# weight-only quantization: per-row int8, int4 in groups of 32 (round-to-nearest from a float checkpoint), or a
# quantized checkpoint's own formats (the default for those checkpoints): GGUF files, AWQ and GPTQ
CHECKPOINT_METHODS = ("gguf", "awq", "gptq")
QUANTIZATION_METHODS = (None, "int8", "int4", *CHECKPOINT_METHODS)
INT8_PER_ROW = QuantFormat(bits=8)
# the round-to-nearest schemes as (linear layers, embedding / LM head); int4 has the layout and accuracy of
# llama.cpp's Q4_1, and keeps the vocabulary tables in int8 as llama.cpp's 4-bit files keep them in 6 or 8 bits
RTN_SCHEMES = {"int8": (INT8_PER_ROW, INT8_PER_ROW), "int4": (QuantFormat(4, 32, True), INT8_PER_ROW)}

# the linear layers AWQ and GPTQ quantize in each decoder layer (their checkpoint module names)
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LAYER_LINEARS = (*ATTENTION_LINEARS, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MOE_EXPERTS = "mlp.experts"  # a MoE layer's routed experts (mlp.experts.<e>.gate_proj ... in checkpoints)
# formats list the experts' projections by their checkpoint names without the expert's index: every expert's gate and
# up in one format (they stack into one weight), down in the same or another (a Q4_K_M file's Q6_K beside Q4_K)
MOE_EXPERT_LINEARS = tuple(f"{MOE_EXPERTS}.{part}" for part in ("gate_proj", "up_proj", "down_proj"))


def awq_gptq_format(quant: dict) -> QuantFormat:
    """The grouped format an AWQ or GPTQ checkpoint's layers load into (model_loader/awq_gptq.py): its integer values
    and fp16 scales as they are, zero points as offsets; groups over the whole row become groups of 32 (4-bit
    groups are 32 times a power of two). Raises for the variants pagedllm cannot run."""
    method = quant["quant_method"]
    bits = quant.get("bits", quant.get("w_bit"))
    group = quant.get("group_size", quant.get("q_group_size", -1))
    refuse = None
    if method == "awq" and (bits != 4 or str(quant.get("version", "gemm")).lower() != "gemm"
                              or not quant.get("zero_point", True)):
        refuse = f"AWQ other than 4-bit GEMM layout with zero points (bits {bits}, version {quant.get('version')})"
    elif method == "gptq" and bits not in (4, 8):
        refuse = f"{bits}-bit GPTQ (4 and 8 bits run)"
    elif method == "gptq" and quant.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        refuse = f"GPTQ checkpoint_format {quant.get('checkpoint_format')!r}"
    if refuse:
        raise ValueError(f"pagedllm cannot run {refuse} yet")
    if group in (None, -1, 0):  # one group per row: the order of its features does not matter
        return QuantFormat(bits, INT4_BLOCK if bits == 4 else None, offset=True)
    return QuantFormat(bits, int(group), offset=True, act_order=method == "gptq" and bool(quant.get("desc_act")))


def checkpoint_formats(quant: dict, num_layers: int, tied: bool, moe_layers: frozenset[int]) -> dict[str, QuantFormat]:
    """A quantized checkpoint's format per layer, by checkpoint module name, from its quantization_config (GGUF
    conversions list theirs; AWQ / GPTQ quantize every layer's linear layers alike, a MoE layer's routed experts
    (MOE_EXPERT_LINEARS) but not its router, and their LM head if lm_head)."""
    if not quant:
        return {}
    if quant["quant_method"] == "gguf":
        return {name: QuantFormat(**fmt) for name, fmt in quant["formats"].items()}
    fmt = awq_gptq_format(quant)
    skip = quant.get("modules_to_not_convert") or []
    names = [f"model.layers.{i}.{m}" for i in range(num_layers)
             for m in ((*ATTENTION_LINEARS, *MOE_EXPERT_LINEARS) if i in moe_layers else LAYER_LINEARS)]
    names += ["lm_head"] if quant.get("lm_head") and not tied else []
    return {name: fmt for name in names if not any(s in name for s in skip)}


def check_checkpoint_quant(quant: dict) -> None:
    """Raise unless pagedllm runs this quantization_config."""
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"this checkpoint's weights are quantized with {method!r}, which pagedllm cannot run yet; "
                         "it runs unquantized checkpoints (fp32 / bf16 / fp16, optionally --quantization int8 or "
                         "int4), GGUF files, and AWQ / GPTQ checkpoints")
    if method != "gguf":
        awq_gptq_format(quant)
