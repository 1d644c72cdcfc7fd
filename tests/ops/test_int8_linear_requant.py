import pytest
import torch

import qbert
from qbert import _ext
from qbert.ops import int8_linear, int8_linear_requant, quantize_per_token
from qbert.ops.int8_linear_requant import int8_linear_requant_reference
from tests._backends import AVX512_ISAS, device_backends
from tests._backends import int8_linear_operands as _operands

# (680, 784, 64): an f32 GEMM output past 2 MiB, written with non-temporal stores (GELU epilogue included).
SHAPES = [(1, 1, 1), (7, 13, 129), (13, 257, 32), (129, 13, 257), (64, 3072, 768), (16, 768, 3072), (680, 784, 64)]


def _exact(backend: str, activation: str) -> bool:
    """The cpu row's float32 epilogue rounds exactly like the reference; its GELU is torch's below AVX-512
    and qbert's own (in the epilogue) on AVX-512."""
    if backend != "cpu":
        return False
    return activation == "none" or _ext.module().cpu_isa() not in AVX512_ISAS


@pytest.mark.parametrize("device,backend", device_backends("int8_linear_requant", reference=False))
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float16], ids=["nobias", "bias-f32", "bias-f16"])
@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda v: str(v))
def test_against_reference(device, backend, activation, bias_dtype, m, n, k):
    args = _operands(m, n, k, device, bias_dtype)
    with qbert.use_backend(backend):
        y_q, y_scale = int8_linear_requant(*args, activation=activation)
    ref_q, ref_scale = int8_linear_requant_reference(*args, activation)
    assert y_q.dtype == torch.int8 and y_q.shape == (m, n) and y_scale.dtype == torch.float32 and y_scale.shape == (m,)
    if _exact(backend, activation):
        # Tier: exact. The float32 y is the reference's bit for bit, and quantization is exact.
        assert torch.equal(y_q, ref_q) and torch.equal(y_scale, ref_scale)
        return
    # Tier: same math in float. A GPU y, or the AVX-512 epilogue's GELU, may differ from the reference's in
    # the last ulps (erf), which can move the row max by an ulp and a code that sits on a rounding boundary
    # by one step; nothing more.
    torch.testing.assert_close(y_scale, ref_scale)
    assert (y_q.int() - ref_q.int()).abs().max().item() <= 1


def test_equals_unfused_chain():
    # The fused op is the unfused chain int8_linear(float32, gelu) -> quantize_per_token, exactly.
    x_q, x_scale, w_q, w_scale, bias = _operands(33, 96, 64, "cpu", torch.float32)
    y = int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype=torch.float32, activation="gelu")
    expected = quantize_per_token(y)
    got = int8_linear_requant(x_q, x_scale, w_q, w_scale, bias, activation="gelu")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_zero_row_gets_unit_scale():
    x_q, x_scale, w_q, w_scale, _ = _operands(4, 16, 32, "cpu", None)
    x_q[2] = 0
    y_q, y_scale = int8_linear_requant(x_q, x_scale, w_q, w_scale)
    assert y_scale[2].item() == 1.0 and not y_q[2].any()


NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("device,backend", device_backends("int8_linear_requant"))
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("value", NONFINITE.values(), ids=NONFINITE.keys())
def test_nonfinite_row_requantizes_to_nan_scale(device, backend, activation, value):
    # Exact: a non-finite x_scale makes row 2's y non-finite: y_scale NaN, codes 0; the other rows are
    # bit-identical to the all-finite result.
    args = _operands(5, 40, 64, device, torch.float32)
    with qbert.use_backend(backend):
        clean_q, clean_scale = int8_linear_requant(*args, activation=activation)
        args[1][2] = value
        y_q, y_scale = int8_linear_requant(*args, activation=activation)
    others = [0, 1, 3, 4]
    assert y_scale[2].isnan() and not y_q[2].any()
    assert torch.equal(y_q[others], clean_q[others]) and torch.equal(y_scale[others], clean_scale[others])


@pytest.mark.parametrize("device,backend", device_backends("int8_linear_requant"))
def test_no_output_columns(device, backend):
    # N = 0 works as in int8_linear: y_q [M, 0], and y_scale 1 (an empty row counts as an all-zero one).
    x_q, x_scale, _, _, _ = _operands(3, 1, 32, device, None)
    w_q = torch.zeros(0, 32, dtype=torch.int8, device=device)
    w_scale = torch.zeros(0, device=device)
    with qbert.use_backend(backend):
        y_q, y_scale = int8_linear_requant(x_q.view(1, 3, 32), x_scale.view(1, 3), w_q, w_scale)
    assert y_q.shape == (1, 3, 0) and y_q.dtype == torch.int8
    assert torch.equal(y_scale, torch.ones(1, 3, device=device))
    ref_q, ref_scale = int8_linear_requant_reference(x_q, x_scale, w_q, w_scale, None, "none")
    assert ref_q.shape == (3, 0) and torch.equal(ref_scale, torch.ones(3, device=device))


def test_leading_dims():
    x_q, x_scale, w_q, w_scale, bias = _operands(6, 16, 32, "cpu", torch.float32)
    y_q, y_scale = int8_linear_requant(x_q.view(2, 3, 32), x_scale.view(2, 3), w_q, w_scale, bias, "gelu")
    ref_q, ref_scale = int8_linear_requant(x_q, x_scale, w_q, w_scale, bias, "gelu")  # the same op, flat
    assert y_q.shape == (2, 3, 16) and y_scale.shape == (2, 3)
    assert torch.equal(y_q.view(6, 16), ref_q) and torch.equal(y_scale.view(6), ref_scale)


def test_opcheck():
    args = _operands(7, 13, 64, "cpu", torch.float32)
    torch.library.opcheck(torch.ops.qbert.int8_linear_requant.default, tuple(args), {"activation": "gelu"})


def test_compile_fullgraph():
    args = _operands(9, 5, 32, "cpu", torch.float32)
    compiled = torch.compile(lambda *a: int8_linear_requant(*a, activation="gelu"), fullgraph=True,
                             backend="aot_eager")
    got = compiled(*args)
    expected = int8_linear_requant(*args, activation="gelu")  # eager
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _bad(**changes):
    args = dict(zip(("x_q", "x_scale", "w_q", "w_scale", "bias"), _operands(7, 13, 64, "cpu", torch.float32)))
    args.update(changes)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(x_q=torch.zeros(7, 64)), TypeError, "int8_linear_requant: x_q must be int8"),
    (_bad(x_scale=torch.zeros(6)), ValueError, r"int8_linear_requant: x_scale must have shape \[7\]"),
    (_bad(w_scale=torch.zeros(12)), ValueError, r"w_scale must have shape \[N=13\]"),
    (_bad(bias=torch.zeros(14)), ValueError, r"bias must have shape \[N=13\]"),
    (_bad(w_q=torch.zeros(13, 65, dtype=torch.int8)), ValueError, r"K mismatch: x_q is \[M=7, K=64\]"),
    (_bad(activation="relu"), ValueError, r"activation must be one of \('none', 'gelu'\), got 'relu'"),
], ids=["x-dtype", "x-scale-shape", "w-scale-shape", "bias-shape", "k-mismatch", "activation"])
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        int8_linear_requant(**args)
