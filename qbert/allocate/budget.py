"""Allocation budgets: a weight size (average bits per weight or megabytes), optionally a latency.

Sizes are exact bytes of the allocated layers' weight buffers (``LinearFormat.nbytes``: packed codes,
float32 scales, uint8 zero points; biases, embeddings and float layers are not counted). A megabyte is
10**6 bytes (SI, as ``40MB`` reads); average bits per weight is 8 * bytes / weights, so scales and zero
points count against it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MB = 10**6  # bytes per megabyte
BITS_PER_BYTE = 8
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(bits|MB)\s*$")
# A budget computed from an exact size (uniform_size(...) / MB) may land a float rounding below it.
_WHOLE_BYTES_REL_TOL = 1e-12


def whole_bytes(nbytes: float) -> int:
    """The largest whole number of bytes within ``nbytes``, reading a value that is a whole number up to
    float rounding (relative 1e-12) as that number."""
    nearest = round(nbytes)
    return nearest if math.isclose(nbytes, nearest, rel_tol=_WHOLE_BYTES_REL_TOL) else math.floor(nbytes)


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``bits_per_weight`` (average over the allocated weights) or ``megabytes`` (10**6
    bytes) bounds the size; ``latency_us`` optionally bounds the summed per-layer latency (microseconds,
    from ``allocate``'s ``latency`` table)."""

    bits_per_weight: float | None = None
    megabytes: float | None = None
    latency_us: float | None = None

    def __post_init__(self) -> None:
        if (self.bits_per_weight is None) == (self.megabytes is None):
            raise ValueError(f"Budget: give exactly one of bits_per_weight or megabytes, got "
                             f"bits_per_weight={self.bits_per_weight}, megabytes={self.megabytes}")
        for name in ("bits_per_weight", "megabytes", "latency_us"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Budget: {name} must be a positive number, got {value!r}")

    def max_bytes(self, weights: int) -> int:
        """The size limit in bytes for ``weights`` allocated weights."""
        if self.megabytes is not None:
            return whole_bytes(self.megabytes * MB)
        return whole_bytes(self.bits_per_weight * weights / BITS_PER_BYTE)

    def describe(self) -> str:
        """``"3 bits/weight"``, ``"40 MB"``, with ``", 1500 us"`` for a latency bound."""
        size = f"{self.bits_per_weight:g} bits/weight" if self.megabytes is None else f"{self.megabytes:g} MB"
        return size if self.latency_us is None else f"{size}, {self.latency_us:g} us"

    def to_dict(self) -> dict:
        return {"bits_per_weight": self.bits_per_weight, "megabytes": self.megabytes,
                "latency_us": self.latency_us}


def parse_budget(text: str) -> Budget:
    """``"3bits"``, ``"2.5bits"`` (average bits per weight) or ``"40MB"`` (10**6 bytes) -> Budget."""
    match = _BUDGET_RE.match(text) if isinstance(text, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"bad budget {text!r}: expected a positive number followed by 'bits' (average bits "
                         f"per weight, e.g. 3bits, 2.5bits) or 'MB' (10^6 bytes of weights, e.g. 40MB)")
    value = float(match.group(1))
    return Budget(bits_per_weight=value) if match.group(2) == "bits" else Budget(megabytes=value)
