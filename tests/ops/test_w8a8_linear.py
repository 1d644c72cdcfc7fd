import pytest
import torch

import qbert
from qbert.ops import int8_linear, quantize_per_token, w8a8_linear
from qbert.ops.w8a8_linear import w8a8_linear_reference
from qbert.quant.int8 import INT8_GEMM_MAX_K
from tests._backends import device_backends, int8_codes

SHAPES = [(1, 1, 1), (7, 13, 129), (13, 257, 7), (128, 768, 768)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _operands(m, n, k, dtype, device, bias=True):
    g = torch.Generator().manual_seed(m * 31 + n * 7 + k)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w_q = int8_codes(n, k, generator=g)
    w_scale = torch.rand(n, generator=g) / 100 + 1e-4
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return [t if t is None else t.to(device) for t in (x, w_q, w_scale, b)]


@pytest.mark.parametrize("device,backend", device_backends("w8a8_linear", reference=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda v: str(v))
def test_equals_quantize_then_int8_linear(device, backend, dtype, bias, m, n, k):
    # Tier: same math in float. The fused op is the two ops in turn, on the same backend: identical.
    x, w_q, w_scale, b = _operands(m, n, k, dtype, device, bias)
    with qbert.use_backend(backend):
        out = w8a8_linear(x, w_q, w_scale, b)
        two_ops = int8_linear(*quantize_per_token(x), w_q, w_scale, b, out_dtype=dtype)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out, two_ops, rtol=0, atol=0)
    torch.testing.assert_close(out, w8a8_linear_reference(x, w_q, w_scale, b))


NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("device,backend", device_backends("w8a8_linear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("value", NONFINITE.values(), ids=NONFINITE.keys())
def test_nonfinite_token_gives_a_nan_row(device, backend, dtype, value):
    # Exact: token 1 of 4 holds the value: its whole output row is NaN (x_scale NaN); the other rows are
    # bit-identical to the all-finite result.
    x, w_q, w_scale, b = _operands(4, 13, 129, dtype, device)
    with qbert.use_backend(backend):
        clean = w8a8_linear(x, w_q, w_scale, b)
        x[1, 100] = value
        out = w8a8_linear(x, w_q, w_scale, b)
    assert out[1].isnan().all()
    assert torch.equal(out[[0, 2, 3]], clean[[0, 2, 3]])


def test_k_limit_is_checked():
    # Past INT8_GEMM_MAX_K the int32 sums of the codes can overflow (K = 200000 did on every backend).
    k = INT8_GEMM_MAX_K + 1
    with pytest.raises(ValueError, match=f"w8a8_linear: K={k} exceeds {INT8_GEMM_MAX_K}, beyond which an int32"):
        w8a8_linear(torch.ones(1, k), torch.ones(2, k, dtype=torch.int8), torch.ones(2))


def test_leading_dims():
    x, w_q, w_scale, b = _operands(6, 16, 32, torch.float32, "cpu")
    out = w8a8_linear(x.view(2, 3, 32), w_q, w_scale, b)
    torch.testing.assert_close(out.view(6, 16), w8a8_linear(x, w_q, w_scale, b), rtol=0, atol=0)


def test_opcheck():
    torch.library.opcheck(torch.ops.qbert.w8a8_linear.default, tuple(_operands(7, 13, 64, torch.float32, "cpu")))


def test_compile_fullgraph():
    args = _operands(3, 8, 16, torch.float32, "cpu")
    compiled = torch.compile(lambda *a: w8a8_linear(*a).sum(-1), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), w8a8_linear_reference(*args).sum(-1))


@pytest.mark.parametrize("change,error,match", [
    ({"x": torch.zeros(7, 64, dtype=torch.int8)}, TypeError, "w8a8_linear: x must be float32"),
    ({"w_q": torch.zeros(13, 64)}, TypeError, "w8a8_linear: w_q must be int8"),
    ({"w_q": torch.zeros(13, 63, dtype=torch.int8)}, ValueError, r"K mismatch: x is \[M=7, K=64\]"),
    ({"bias": torch.zeros(12)}, ValueError, r"bias must have shape \[N=13\]"),
    ({"x": torch.zeros(64, 7).T}, ValueError, "x must be contiguous"),
    ({"w_scale": torch.zeros(13, device="meta")}, ValueError, "one device"),
], ids=["x-dtype", "w-dtype", "k-mismatch", "bias-shape", "contiguity", "device"])
def test_errors(change, error, match):
    args = dict(zip(("x", "w_q", "w_scale", "bias"), _operands(7, 13, 64, torch.float32, "cpu")))
    args.update(change)
    with pytest.raises(error, match=match):
        w8a8_linear(**args)
