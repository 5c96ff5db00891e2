"""The brief's memory model: weights per precision, KV cache per token (exact for GQA), what fits where."""

from pagedllm.memory.kv_sizing import brief_kv_bytes_per_token, kv_bytes_per_token
from pagedllm.memory.planner import make_plan
from pagedllm.memory.units import format_bytes, parse_bytes
from pagedllm.memory.weights import count_parameters, weights_per_stage

__all__ = ["make_plan", "kv_bytes_per_token", "brief_kv_bytes_per_token", "count_parameters",
           "weights_per_stage", "format_bytes", "parse_bytes"]
