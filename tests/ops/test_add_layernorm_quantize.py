"""add_layernorm_quantize on every backend against the pure-PyTorch reference.

Tiers: y is float (its error against a float64 LayerNorm of the same h is at most twice the reference's,
computed in the same dtype); y_q and y_scale are exact against quantize_per_token_reference of the y the
backend returned, and y_q is within one code of the reference's codes (a y one rounding away can move a
code by one).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import qbert
from qbert import _ext
from qbert.ops.add_layernorm_quantize import add_layernorm_quantize, add_layernorm_quantize_reference
from qbert.ops.quantize_per_token import quantize_per_token_reference
from tests._backends import assert_error_within, device_backends

NAME = "add_layernorm_quantize"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KS = (1, 7, 64, 129, 768, 1024)
LEADING = ((1,), (3, 5))
# The Triton interpreter costs tens of ms a call: it runs the BERT width and two ragged ones, 15 rows.
INTERPRETED_SHAPES = {(1, (3, 5)), (129, (3, 5)), (768, (3, 5))}
# Past the CUDA warp path's 1024 (a block per row): one ragged width, one BERT FFN width.
LONG_KS = (1025, 4096)
EPS = 1e-5


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _matrix() -> list:
    params = []
    for p in device_backends(NAME):
        device, backend = p.values
        interpreted = device == "cpu" and backend == "triton"
        for dtype, residual, bias, k, lead in itertools.product(DTYPES, (True, False), (True, False), KS, LEADING):
            if interpreted and (k, lead) not in INTERPRETED_SHAPES:
                continue
            case = (f"{_name(dtype)}-{'res' if residual else 'nores'}-{'bias' if bias else 'nobias'}-K{k}-"
                    f"{'x'.join(map(str, lead))}")
            params.append(pytest.param(device, backend, dtype, residual, bias, k, lead, marks=p.marks,
                                       id=f"{p.id}-{case}"))
    return params


def _inputs(shape, dtype, device, residual: bool, bias: bool, seed: int):
    """x with a per-row offset and spread (LayerNorm must remove both), a residual, and weight / bias
    around 1 / 0 in float32, the usual LayerNorm parameter dtype."""
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(shape, generator=g) * (1 + 3 * torch.rand(*shape[:-1], 1, generator=g)) + 2
    r = torch.randn(shape, generator=g) if residual else None
    w = 1 + 0.5 * torch.randn(k, generator=g)
    b = torch.randn(k, generator=g) if bias else None
    return (x.to(dtype).to(device), None if r is None else r.to(dtype).to(device), w.to(device),
            None if b is None else b.to(device))


def _run(backend, x, residual, weight, bias):
    with qbert.use_backend(backend):
        return add_layernorm_quantize(x, residual, weight, bias, EPS)


def _check_against_reference(x, residual, weight, bias, y, y_q, y_scale) -> None:
    k = x.shape[-1]
    assert y.shape == x.shape and y_q.shape == x.shape and y_scale.shape == x.shape[:-1]
    assert y.dtype == x.dtype and y_q.dtype == torch.int8 and y_scale.dtype == torch.float32
    y_ref, q_ref, _ = add_layernorm_quantize_reference(x, residual, weight, bias, EPS)
    # Float tier: the same h (PyTorch's add in x.dtype) normalized in float64.
    h = x if residual is None else x + residual
    truth = F.layer_norm(h.double(), (k,), weight.double(), None if bias is None else bias.double(), EPS)
    assert_error_within(y, truth, y_ref)
    # Exact tier: the codes and scales of the y that was returned.
    q_own, scale_own = quantize_per_token_reference(y.reshape(-1, k))
    torch.testing.assert_close(y_q.reshape(-1, k), q_own, rtol=0, atol=0)
    torch.testing.assert_close(y_scale.reshape(-1), scale_own, rtol=0, atol=0)
    assert (y_q.int() - q_ref.int()).abs().max().item() <= 1


@pytest.mark.parametrize("device,backend,dtype,has_residual,has_bias,k,lead", _matrix())
def test_against_reference(device, backend, dtype, has_residual, has_bias, k, lead):
    x, residual, weight, bias = _inputs((*lead, k), dtype, device, has_residual, has_bias, seed=k + len(lead))
    _check_against_reference(x, residual, weight, bias, *_run(backend, x, residual, weight, bias))


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=_name)
@pytest.mark.parametrize("k", LONG_KS)
def test_long_rows(device, backend, dtype, k):
    x, residual, weight, bias = _inputs((3, k), dtype, device, True, True, seed=k)
    _check_against_reference(x, residual, weight, bias, *_run(backend, x, residual, weight, bias))


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_unaligned_rows(device, backend, dtype):
    # Views one element into their storage: contiguous, but rows are not 16-byte aligned (the CUDA kernel's
    # vector loads must not be taken).
    rows, k = 4, 768
    x, residual, weight, bias = _inputs((rows, k), dtype, device, True, True, seed=3)
    x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(rows, k)
    residual = torch.cat([residual.new_zeros(1), residual.flatten()])[1:].view(rows, k)
    assert x.data_ptr() % 16 and residual.data_ptr() % 16
    _check_against_reference(x, residual, weight, bias, *_run(backend, x, residual, weight, bias))


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("has_bias", (True, False), ids=("bias", "nobias"))
def test_constant_rows(device, backend, dtype, has_bias):
    # Variance 0: 2.5 and 0 sum exactly in float32, so the mean is exact, h - mean is 0 and y = bias (an
    # all-zero y without a bias: scale 1, codes 0).
    k = 64
    x = torch.tensor([[2.5] * k, [0.0] * k], dtype=dtype, device=device)
    weight = torch.linspace(0.5, 2, k, device=device)
    bias = torch.linspace(-3, 3, k, device=device) if has_bias else None
    y, y_q, y_scale = _run(backend, x, None, weight, bias)
    expected = (bias if has_bias else torch.zeros(k, device=device)).to(dtype).expand(2, k)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    q_own, scale_own = quantize_per_token_reference(y)
    assert torch.equal(y_q, q_own) and torch.equal(y_scale, scale_own)
    if not has_bias:
        assert torch.equal(y_scale, torch.ones(2, device=device)) and not y_q.any()


@pytest.mark.parametrize("device,backend", device_backends(NAME))
def test_no_rows(device, backend):
    x, residual, weight, bias = _inputs((0, 16), torch.float16, device, True, True, seed=0)
    y, y_q, y_scale = _run(backend, x, residual, weight, bias)
    assert y.shape == y_q.shape == (0, 16) and y_scale.shape == (0,)


@pytest.mark.skipif(bool(_ext.load_error()), reason="; ".join(_ext.load_error()) or "loaded")
@pytest.mark.parametrize("isa", ("scalar", "avx2", "avx_vnni", "avx512_vnni"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_cpu_isas_agree_bit_for_bit(isa, dtype):
    # The cpu kernel sums in the same order on every ISA and never contracts into FMAs.
    C = _ext.module()
    if isa not in C.cpu_isas():
        pytest.skip(f"this CPU cannot run {isa} (it offers {C.cpu_isas()})")
    x, residual, weight, bias = _inputs((5, 771), dtype, "cpu", True, True, seed=11)
    expected = torch.ops.qbert.add_layernorm_quantize_cpu(x, residual, weight, bias, EPS)
    C.set_cpu_isa(isa)
    try:
        got = torch.ops.qbert.add_layernorm_quantize_cpu(x, residual, weight, bias, EPS)
    finally:
        C.set_cpu_isa("auto")
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
def test_parameters_of_any_float_dtype(device, backend):
    x, residual, weight, bias = _inputs((2, 3, 48), torch.float16, device, True, True, seed=5)
    weight, bias = weight.half(), bias.double()
    _check_against_reference(x, residual, weight, bias, *_run(backend, x, residual, weight, bias))


@pytest.mark.parametrize("residual", (True, False), ids=("res", "nores"))
def test_opcheck(residual):
    x, r, weight, bias = _inputs((2, 3, 32), torch.float32, "cpu", residual, True, seed=1)
    torch.library.opcheck(torch.ops.qbert.add_layernorm_quantize.default, (x, r, weight, bias, EPS))


def test_compile_fullgraph():
    x, residual, weight, bias = _inputs((4, 48), torch.float32, "cpu", True, True, seed=2)
    compiled = torch.compile(lambda x, r: add_layernorm_quantize(x * 2, r, weight, bias, EPS), fullgraph=True,
                             backend="aot_eager")
    got = compiled(x, residual)
    expected = add_layernorm_quantize(x * 2, residual, weight, bias, EPS)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _errors():
    x = torch.zeros(4, 8)
    w = torch.ones(8)
    return [
        ((x.int(), None, w, None, EPS), TypeError, "add_layernorm_quantize: x must be float32 or float16 or bfloat16"),
        ((torch.zeros(()), None, w, None, EPS), ValueError, "at least 1 dims"),
        ((torch.zeros(4, 0), None, torch.ones(0), None, EPS), ValueError, r"last dim \(K\) of x must be at least 1"),
        ((x, x.half(), w, None, EPS), TypeError, "residual must have x's dtype float32, got float16"),
        ((x, torch.zeros(4, 9), w, None, EPS), ValueError, r"residual must have x's shape \[4, 8\]"),
        ((x, None, torch.ones(9), None, EPS), ValueError, r"weight must have shape \[K=8\]"),
        ((x, None, w, torch.ones(4, 8), EPS), ValueError, r"bias must have shape \[K=8\]"),
        ((x, None, w.int(), None, EPS), TypeError, "weight must be float32 or float16 or bfloat16 or float64"),
        ((torch.zeros(8, 4).T, None, w, None, EPS), ValueError, "x must be contiguous"),
        ((x, torch.zeros(8, 4).T, w, None, EPS), ValueError, "residual must be contiguous"),
        ((x, None, torch.ones(16)[::2], None, EPS), ValueError, "weight must be contiguous"),
        ((x, None, w, None, 0.0), ValueError, "eps must be > 0, got 0.0"),
        ((x, None, w, None, -1e-5), ValueError, "eps must be > 0"),
        ((x, None, w, None, float("nan")), ValueError, "eps must be > 0"),
        ((x, None, torch.ones(8, device="meta"), None, EPS), ValueError, "all tensors must be on one device"),
    ]


@pytest.mark.parametrize("args,error,match", _errors(),
                         ids=["dtype", "scalar", "empty-k", "residual-dtype", "residual-shape", "weight-shape",
                              "bias-shape", "weight-dtype", "x-layout", "residual-layout", "weight-layout",
                              "eps-zero", "eps-negative", "eps-nan", "device"])
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        add_layernorm_quantize(*args)
