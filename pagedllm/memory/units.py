"""Byte sizes for people: '4GiB' in, '3.20 GiB' out."""

from __future__ import annotations

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """'4GiB' and '4G' are binary; '80GB' is decimal, as drive and GPU vendors write it; '1e9' is bytes."""
    t = text.strip().lower()
    binary = {"kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}
    decimal = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    mult = 1
    for suffix, size in sorted({**binary, **decimal}.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(suffix):
            mult, t = size, t[: -len(suffix)]
            break
    try:
        value = float(t) * mult
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4GiB, 512MiB, 80GB)") from None
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(value)
