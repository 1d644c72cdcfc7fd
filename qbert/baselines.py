"""The in-process peer qbert's int8 layers are compared with: torch.ao dynamic int8 (``qbert demo``, the
benchmarks)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


def ao_engines() -> list[str]:
    """The torch.ao quantized engines this CPU build offers, among those worth comparing against."""
    wanted = ("onednn", "x86", "fbgemm")
    return [e for e in wanted if e in torch.backends.quantized.supported_engines]


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Run torch.ao quantized modules on ``engine`` inside the block (it must be set when they are built
    and when they run)."""
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"torch.ao engine {engine!r} is not available; this build has "
                         f"{torch.backends.quantized.supported_engines}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def ao_dynamic_int8(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    """A copy of ``model`` with every nn.Linear replaced by torch.ao's dynamic int8 linear: per-channel
    int8 weights (like qbert's), activations quantized per tensor at run time. Run it under
    ``quantized_engine(engine)``."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with quantized_engine(engine), warnings.catch_warnings():
        # torch.ao.quantization announces its deprecation on every call; it is the baseline on purpose.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
