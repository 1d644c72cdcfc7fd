"""add_layernorm_quantize on every backend against the pure-PyTorch reference.

Tiers: y is float (its error against a float64 LayerNorm of the same h is at most twice that of PyTorch's
float32 LayerNorm rounded to x.dtype); y_q and y_scale are exact against quantize_per_token_reference of
the y the backend returned, and y_q is within one code of the reference's codes (a y one rounding away can
move a code by one). Rows holding a NaN or an infinity are exact too: NaN y, NaN scale, codes 0, in the
same places on every backend.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import qbert
from qbert import _ext
from qbert.ops.add_layernorm_quantize import (
    EPS_MAX,
    EPS_MIN,
    add_layernorm_quantize,
    add_layernorm_quantize_reference,
)
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


def _layer_norm(h, weight, bias, dtype, eps=EPS):
    """F.layer_norm of h in ``dtype`` with the parameters as the op reads them (as float32)."""
    b = None if bias is None else bias.float().to(dtype)
    return F.layer_norm(h.to(dtype), (h.shape[-1],), weight.float().to(dtype), b, eps)


def _check_against_reference(x, residual, weight, bias, y, y_q, y_scale, eps=EPS) -> None:
    k = x.shape[-1]
    assert y.shape == x.shape and y_q.shape == x.shape and y_scale.shape == x.shape[:-1]
    assert y.dtype == x.dtype and y_q.dtype == torch.int8 and y_scale.dtype == torch.float32
    _, q_ref, _ = add_layernorm_quantize_reference(x, residual, weight, bias, eps)
    # Float tier: the same h (PyTorch's add in x.dtype) normalized in float64, against PyTorch's float32.
    h = x if residual is None else x + residual
    truth = _layer_norm(h, weight, bias, torch.float64, eps)
    assert_error_within(y, truth, _layer_norm(h, weight, bias, torch.float32, eps).to(x.dtype))
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
    # Variance 0: the mean of a constant row is exact (the kernels sum it in float64), h - mean is 0 and
    # y = bias (an all-zero y without a bias: scale 1, codes 0), at any magnitude: 1.1e20 and 3e38 are
    # rows the kernels first scale by a power of two, whose scaled eps underflows to 0 (f16 cannot hold them).
    k = 64
    values = (2.5, 0.0, 1.1, -7.3) if dtype == torch.float16 else (2.5, 0.0, 1.1e20, -3e38)
    x = torch.tensor([[v] * k for v in values], dtype=dtype, device=device)
    weight = torch.linspace(0.5, 2, k, device=device)
    bias = torch.linspace(-3, 3, k, device=device) if has_bias else None
    y, y_q, y_scale = _run(backend, x, None, weight, bias)
    expected = (bias if has_bias else torch.zeros(k, device=device)).to(dtype).expand(len(values), k)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    q_own, scale_own = quantize_per_token_reference(y)
    assert torch.equal(y_q, q_own) and torch.equal(y_scale, scale_own)
    if not has_bias:
        assert torch.equal(y_scale, torch.ones(len(values), device=device)) and not y_q.any()


NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
BAD_ROW = 2


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("where", ("x", "residual"))
@pytest.mark.parametrize("value", NONFINITE.values(), ids=NONFINITE.keys())
def test_nonfinite_row(device, backend, dtype, where, value):
    # Exact: the row holding a NaN or an infinity gives y NaN, y_scale NaN and codes 0; every other row is
    # bit-identical to the all-finite result. K = 129: the bad value sits in a vector body, not a tail.
    x, residual, weight, bias = _inputs((4, 129), dtype, device, True, True, seed=9)
    clean = _run(backend, x, residual, weight, bias)
    (x if where == "x" else residual)[BAD_ROW, 70] = value
    y, y_q, y_scale = _run(backend, x, residual, weight, bias)
    others = [r for r in range(x.shape[0]) if r != BAD_ROW]
    for got, expected in zip((y, y_q, y_scale), clean):
        assert torch.equal(got[others], expected[others])
    assert y[BAD_ROW].isnan().all() and y_scale[BAD_ROW].isnan() and not y_q[BAD_ROW].any()


@pytest.mark.parametrize("device,backend", device_backends(NAME))
def test_overflowing_residual_add_is_a_nonfinite_row(device, backend):
    # float16: 60000 + 60000 rounds to inf in h (PyTorch's add), so that row is NaN like an inf input.
    x, residual, weight, bias = _inputs((3, 64), torch.float16, device, True, True, seed=10)
    x[1, 5], residual[1, 5] = 60000.0, 60000.0
    y, y_q, y_scale = _run(backend, x, residual, weight, bias)
    assert y[1].isnan().all() and y_scale[1].isnan() and not y_q[1].any()
    assert y[[0, 2]].isfinite().all() and y_scale[[0, 2]].isfinite().all()


def _scaled_baseline(h, weight, bias, dtype):
    """PyTorch's float32 LayerNorm of h, computed on h * c (c the power of two that brings max |h| near 1,
    exact) with eps * c^2, where float32 does not overflow: the same-dtype path the float tier compares to."""
    c = 2.0 ** -torch.log2(h.float().abs().amax(-1, keepdim=True)).round()
    b = None if bias is None else bias.float()
    return torch.cat([F.layer_norm(row * ci, (h.shape[-1],), weight.float(), b, EPS * ci.item() ** 2)
                      for row, ci in zip(h.float(), c)]).view(h.shape).to(dtype)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=_name)
@pytest.mark.parametrize("k", (4, 129, 768))
@pytest.mark.parametrize("magnitude", (1e20, 1e37))
def test_rows_near_the_float32_range(device, backend, dtype, k, magnitude):
    # Float tier against a float64 LayerNorm: rows whose variance overflows float32 (|h| ~ 1e20 and up).
    # k = 4 is the row [1e20, -1e20, 3e20, 0] scaled to the magnitude.
    g = torch.Generator().manual_seed(k)
    if k == 4:
        x = torch.tensor([[1.0, -1.0, 3.0, 0.0]]) * magnitude
    else:
        x = torch.randn(3, k, generator=g) * magnitude
    x = x.to(dtype).to(device)
    weight = (1 + 0.5 * torch.randn(k, generator=g)).to(device)
    bias = torch.randn(k, generator=g).to(device)
    y, y_q, y_scale = _run(backend, x, None, weight, bias)
    truth = _layer_norm(x, weight, bias, torch.float64)
    assert y.isfinite().all()
    assert_error_within(y, truth, _scaled_baseline(x, weight, bias, dtype))
    q_own, scale_own = quantize_per_token_reference(y)
    assert torch.equal(y_q, q_own) and torch.equal(y_scale, scale_own)


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
    # Beside the random rows: a NaN row and (where the dtype holds them) rows the kernel scales first.
    x[1, 700] = float("nan")
    if dtype != torch.float16:
        x[3] *= 1e30
        residual[3] = 0
    expected = torch.ops.qbert.add_layernorm_quantize_cpu(x, residual, weight, bias, EPS)
    C.set_cpu_isa(isa)
    try:
        got = torch.ops.qbert.add_layernorm_quantize_cpu(x, residual, weight, bias, EPS)
    finally:
        C.set_cpu_isa("auto")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


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
        ((x, None, w, None, 0.0), ValueError, (r"eps must be a normal float32 number in \[1.17549e-38, "
                                               r"3.40282e\+38\] \(added to a float32 variance\), got 0.0")),
        ((x, None, w, None, -1e-5), ValueError, "eps must be a normal float32 number"),
        ((x, None, w, None, float("nan")), ValueError, "eps must be a normal float32 number"),
        ((x, None, w, None, float("inf")), ValueError, "eps must be a normal float32 number"),
        ((x, None, w, None, EPS_MIN / 2), ValueError, "eps must be a normal float32 number"),
        ((x, None, w, None, EPS_MAX * 2), ValueError, "eps must be a normal float32 number"),
        ((x, None, torch.ones(8, device="meta"), None, EPS), ValueError, "all tensors must be on one device"),
    ]


@pytest.mark.parametrize("args,error,match", _errors(),
                         ids=["dtype", "scalar", "empty-k", "residual-dtype", "residual-shape", "weight-shape",
                              "bias-shape", "weight-dtype", "x-layout", "residual-layout", "weight-layout",
                              "eps-zero", "eps-negative", "eps-nan", "eps-inf", "eps-subnormal", "eps-past-float32",
                              "device"])
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        add_layernorm_quantize(*args)


@pytest.mark.skipif(bool(_ext.load_error()), reason="; ".join(_ext.load_error()) or "loaded")
@pytest.mark.parametrize("eps", (0.0, float("nan"), EPS_MIN / 2, EPS_MAX * 2), ids=("zero", "nan", "subnormal",
                                                                                 "past-float32"))
def test_cpu_op_refuses_eps(eps):
    x = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="add_layernorm_quantize_cpu: eps must be a normal float32 number"):
        torch.ops.qbert.add_layernorm_quantize_cpu(x, None, torch.ones(8), None, eps)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("eps", (EPS_MIN, EPS_MAX), ids=("min", "max"))
def test_eps_bounds_are_accepted(device, backend, eps):
    x, residual, weight, bias = _inputs((3, 64), torch.float32, device, True, True, seed=4)
    with qbert.use_backend(backend):
        out = add_layernorm_quantize(x, residual, weight, bias, eps)
    _check_against_reference(x, residual, weight, bias, *out, eps=eps)
