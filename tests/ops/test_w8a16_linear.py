import pytest
import torch

import qbert
from qbert.ops import w8a16_linear
from qbert.ops.w8a16_linear import w8a16_linear_reference
from tests._backends import assert_error_within, device_backends, int8_codes

SHAPES = [(1, 1, 1), (7, 13, 129), (13, 257, 7), (129, 13, 257), (128, 768, 768)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _operands(m, n, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed + m * 31 + n * 7 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w_q = int8_codes(n, k, generator=g)
    w_scale = torch.rand(n, generator=g) / 100 + 1e-4
    bias = torch.randn(n, generator=g).to(dtype)
    return [t.to(device) for t in (x, w_q, w_scale, bias)]


@pytest.mark.parametrize("device,backend", device_backends("w8a16_linear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda v: str(v))
def test_against_reference(device, backend, dtype, m, n, k):
    # Tier: same math in float: error against float64 math on the same codes at most 2x that of PyTorch
    # computing the layer in the activation dtype with the weight dequantized to it.
    x, w_q, w_scale, bias = _operands(m, n, k, dtype, device)
    if (device, backend, dtype) == ("cpu", "triton", torch.bfloat16):
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (the op refuses it there)")
    with qbert.use_backend(backend):
        out = w8a16_linear(x, w_q, w_scale, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    truth = (x.double() @ w_q.double().T) * w_scale.double() + bias.double()
    same_dtype = torch.nn.functional.linear(x, (w_q.float() * w_scale[:, None]).to(dtype), bias)
    assert_error_within(out, truth, same_dtype)


def test_reference_matches_dequantized_float_linear():
    x, w_q, w_scale, bias = _operands(9, 17, 33, torch.float32, "cpu")
    expected = torch.nn.functional.linear(x, w_q.float() * w_scale[:, None], bias)
    torch.testing.assert_close(w8a16_linear_reference(x, w_q, w_scale, bias), expected)


def test_opcheck():
    torch.library.opcheck(torch.ops.qbert.w8a16_linear.default, tuple(_operands(7, 13, 64, torch.float32, "cpu")))


def test_compile_fullgraph():
    args = _operands(3, 8, 16, torch.float32, "cpu")
    compiled = torch.compile(lambda *a: w8a16_linear(*a).sum(-1), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), w8a16_linear_reference(*args).sum(-1))


@pytest.mark.parametrize("change,error,match", [
    ({"x": torch.zeros(7, 64, dtype=torch.int8)}, TypeError, "w8a16_linear: x must be float32"),
    ({"w_q": torch.zeros(13, 64)}, TypeError, "w_q must be int8"),
    ({"w_q": torch.zeros(13, 63, dtype=torch.int8)}, ValueError, r"K mismatch: x is \[M=7, K=64\]"),
    ({"w_scale": torch.zeros(13, 1)}, ValueError, r"w_scale must have shape \[N=13\]"),
    ({"x": torch.zeros(64, 7).T}, ValueError, "x must be contiguous"),
    ({"bias": torch.zeros(13, device="meta")}, ValueError, "one device"),
], ids=["x-dtype", "w-dtype", "k-mismatch", "scale-shape", "contiguity", "device"])
def test_errors(change, error, match):
    args = dict(zip(("x", "w_q", "w_scale", "bias"), _operands(7, 13, 64, torch.float32, "cpu")))
    args.update(change)
    with pytest.raises(error, match=match):
        w8a16_linear(**args)
