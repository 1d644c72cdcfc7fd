"""Parametrization over (device, backend) pairs found through the registry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from qbert.ops._registry import BACKENDS, OPS, backend_unavailable, triton_interpreter

_DEVICE_BACKENDS = {"cpu": ("reference", "cpu", "triton"), "cuda": ("reference", "triton", "cuda")}


def _skip_reason(device: str, backend: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    unavailable = backend_unavailable(backend)
    if unavailable:
        return "; ".join(unavailable)
    if device == "cpu" and backend == "triton" and not triton_interpreter():
        return "triton on cpu needs TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no GPU)"
    return None


def device_backends(op_name: str, reference: bool = True) -> list:
    """pytest params ``(device, backend)`` for every backend the op registers, with readable ids.

    ``reference=False`` leaves the reference out: for a test whose only check is a comparison with the
    reference, which the reference would pass by construction.
    """
    params = []
    for device, backends in _DEVICE_BACKENDS.items():
        for backend in backends:
            if backend not in OPS[op_name].rows or (backend == "reference" and not reference):
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            reason = _skip_reason(device, backend)
            if reason:
                marks.append(pytest.mark.skip(reason=reason))
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    tested = set(OPS[op_name].rows) - (set() if reference else {"reference"})
    assert {p.values[1] for p in params} == tested, "a registered backend has no test device"
    assert set(OPS[op_name].rows) <= set(BACKENDS)
    return params


def int8_codes(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Random int8 over the full range, -128 included."""
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)


def int8_linear_operands(m: int, n: int, k: int, device, bias_dtype: torch.dtype | None, seed: int = 0) -> list:
    """``[x_q, x_scale, w_q, w_scale, bias]`` for the int8 linear ops: full-range codes, small positive
    scales, a random bias of ``bias_dtype`` (or None); the same values for the same arguments."""
    g = torch.Generator().manual_seed(seed + m * 31 + n * 7 + k)
    x_q, w_q = int8_codes(m, k, generator=g), int8_codes(n, k, generator=g)
    x_scale = torch.rand(m, generator=g) / 100 + 1e-4
    w_scale = torch.rand(n, generator=g) / 100 + 1e-4
    bias = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return [t if t is None else t.to(device) for t in (x_q, x_scale, w_q, w_scale, bias)]


def assert_error_within(out: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, factor: float = 2.0,
                        magnitude: torch.Tensor | None = None) -> None:
    """Float tier: ``out``'s max error against ``truth`` is at most ``factor`` times ``baseline``'s.

    ``baseline`` is what PyTorch computes in the same dtype (flash-attention's rule), so the bound scales
    with the dtype's precision; the floor of one float32 ulp of the largest value keeps an exact baseline
    from demanding more than float32 can give. For a sum whose terms cancel, float32 rounds at the size of
    the terms, not of the result: ``magnitude`` (e.g. ``|x| @ |w|.T``) then sets the floor's scale.
    """
    truth = truth.double()
    out_err = (out.double() - truth).abs().max().item()
    base_err = (baseline.double() - truth).abs().max().item()
    scale = truth if magnitude is None else magnitude.double()
    floor = torch.finfo(torch.float32).eps * scale.abs().max().item()
    assert out_err <= factor * base_err + floor, f"error {out_err:.3g} > {factor} x baseline {base_err:.3g}"


# The cpu ISAs whose kernels include the AVX-512 ones (qbert's own GELU epilogue, attention kernel).
AVX512_ISAS = ("avx512_vnni", "amx_int8")


@contextlib.contextmanager
def forced_cpu_isa(name: str) -> Iterator[str]:
    """The cpu kernels forced onto instruction set ``name`` inside the block (the test skips when this CPU
    lacks it); the automatic choice is restored after."""
    from qbert import _ext

    C = _ext.module()
    if name not in C.cpu_isas():
        pytest.skip(f"this CPU cannot run {name} (it offers {C.cpu_isas()})")
    C.set_cpu_isa(name)
    assert C.cpu_isa() == name
    try:
        yield name
    finally:
        C.set_cpu_isa("auto")
