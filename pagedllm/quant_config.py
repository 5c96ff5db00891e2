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
# GGUF file's own formats (the default for GGUF files)
QUANTIZATION_METHODS = (None, "int8", "int4", "gguf")
INT8_PER_ROW = QuantFormat(bits=8)
# the round-to-nearest schemes as (linear layers, embedding / LM head); int4 has the layout and accuracy of
# llama.cpp's Q4_1, and keeps the vocabulary tables in int8 as llama.cpp's 4-bit files keep them in 6 or 8 bits
RTN_SCHEMES = {"int8": (INT8_PER_ROW, INT8_PER_ROW), "int4": (QuantFormat(4, 32, True), INT8_PER_ROW)}
