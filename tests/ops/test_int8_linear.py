import pytest
import torch

import qbert
from qbert.ops import int8_linear, quantize_per_token
from qbert.ops.int8_linear import int8_linear_reference
from tests._backends import device_backends, int8_codes
from tests._backends import int8_linear_operands as _operands

SHAPES = [(1, 1, 1), (7, 13, 129), (13, 257, 7), (129, 13, 257), (128, 768, 768), (16, 3072, 768)]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device,backend", device_backends("int8_linear", reference=False))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float16],
                         ids=["nobias", "bias-f32", "bias-f16"])
@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda v: str(v))
def test_against_reference(device, backend, out_dtype, bias_dtype, m, n, k):
    # Tier: same math in float. The epilogue runs the reference's float32 ops in the same order on an
    # exact int32 accumulator, so float32 results agree to an ulp and narrower outputs to their rounding.
    x_q, x_scale, w_q, w_scale, bias = _operands(m, n, k, device, bias_dtype)
    with qbert.use_backend(backend):
        out = int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype=out_dtype)
    expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device,backend", device_backends("int8_linear", reference=False))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m,n,k", [(7, 13, 129), (64, 3072, 768)], ids=lambda v: str(v))
def test_gelu_against_reference(device, backend, out_dtype, m, n, k):
    # Tier: same math in float; the GELU runs on the float32 y before the rounding to out_dtype. A GPU
    # erff (CUDA, Triton's libdevice) or the AVX-512 epilogue's erf may differ from torch's in the last
    # float32 ulps, which the default tolerance covers.
    x_q, x_scale, w_q, w_scale, bias = _operands(m, n, k, device, torch.float32)
    with qbert.use_backend(backend):
        out = int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype=out_dtype, activation="gelu")
    expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, "gelu")
    assert out.dtype == out_dtype and out.shape == (m, n)
    torch.testing.assert_close(out, expected)
    unfused = torch.nn.functional.gelu(int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, torch.float32))
    torch.testing.assert_close(out, unfused.to(out_dtype))


def test_activation_error():
    with pytest.raises(ValueError, match=r"int8_linear: activation must be one of \('none', 'gelu'\), got 'tanh'"):
        int8_linear(*_operands(7, 13, 64, "cpu", None), activation="tanh")


def test_leading_dims_and_default_dtype():
    x = torch.randn(2, 3, 64)
    w_q = int8_codes(16, 64, generator=torch.Generator().manual_seed(0))
    w_scale = torch.full((16,), 0.01)
    x_q, x_scale = quantize_per_token(x)
    out = int8_linear(x_q, x_scale, w_q, w_scale)
    assert out.shape == (2, 3, 16) and out.dtype == torch.float32
    flat = int8_linear_reference(x_q.reshape(6, 64), x_scale.reshape(6), w_q, w_scale, None, torch.float32)
    torch.testing.assert_close(out.reshape(6, 16), flat)


def test_close_to_float_linear():
    # Quality: W8A8 of a random layer stays close to the float layer (SQNR well above 30 dB).
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(32, 256, generator=g), torch.randn(128, 256, generator=g) / 16, torch.randn(128, generator=g)
    w_q, w_scale = quantize_per_token(w)
    x_q, x_scale = quantize_per_token(x)
    y = torch.nn.functional.linear(x, w, b)
    err = y - int8_linear(x_q, x_scale, w_q, w_scale, b)
    assert 10 * torch.log10(y.pow(2).sum() / err.pow(2).sum()) > 30


def test_opcheck():
    args = _operands(7, 13, 64, "cpu", torch.float32)
    torch.library.opcheck(torch.ops.qbert.int8_linear.default, tuple(args), {"out_dtype": torch.float16})


def test_compile_fullgraph():
    x_q, x_scale, w_q, w_scale, bias = _operands(9, 5, 32, "cpu", torch.float32)
    compiled = torch.compile(lambda *a: int8_linear(*a, out_dtype=torch.float16).relu(), fullgraph=True,
                             backend="aot_eager")
    out = compiled(x_q, x_scale, w_q, w_scale, bias)
    expected = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, torch.float16).relu()
    torch.testing.assert_close(out, expected)


def _bad(**changes):
    args = dict(zip(("x_q", "x_scale", "w_q", "w_scale", "bias"), _operands(7, 13, 64, "cpu", torch.float32)))
    args.update(changes)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(x_q=torch.zeros(7, 64)), TypeError, "int8_linear: x_q must be int8"),
    (_bad(x_scale=torch.zeros(7, dtype=torch.float16)), TypeError, "x_scale must be float32"),
    (_bad(x_scale=torch.zeros(6)), ValueError, r"x_scale must have shape \[7\]"),
    (_bad(w_scale=torch.zeros(12)), ValueError, r"w_scale must have shape \[N=13\]"),
    (_bad(bias=torch.zeros(14)), ValueError, r"bias must have shape \[N=13\]"),
    (_bad(bias=torch.zeros(13, dtype=torch.int32)), TypeError, "bias must be float32"),
    (_bad(w_q=torch.zeros(13, 65, dtype=torch.int8)), ValueError, r"K mismatch: x_q is \[M=7, K=64\]"),
    (_bad(w_q=torch.zeros(64, 13, dtype=torch.int8).T), ValueError, "w_q must be contiguous"),
    (_bad(w_scale=torch.zeros(13, device="meta")), ValueError, "one device"),
], ids=["x-dtype", "scale-dtype", "x-scale-shape", "w-scale-shape", "bias-shape", "bias-dtype", "k-mismatch",
        "contiguity", "device"])
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        int8_linear(**args)


def test_out_dtype_error():
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
        int8_linear(*_operands(7, 13, 64, "cpu", None), out_dtype=torch.int32)


@pytest.mark.parametrize("m,n,k", [(1024, 768, 64), (1000, 3088, 71)], ids=lambda v: str(v))
@pytest.mark.parametrize("bias_dtype", [None, torch.float32], ids=["nobias", "bias"])
def test_large_float32_output_default_backend(m, n, k, bias_dtype):
    # Outputs of several MiB take the cpu backend's streaming-store path (the ragged second case ends in a
    # partial panel). Tier: same math in float, as above.
    x_q, x_scale, w_q, w_scale, bias = _operands(m, n, k, "cpu", bias_dtype)
    out = int8_linear(x_q, x_scale, w_q, w_scale, bias)
    torch.testing.assert_close(out, int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, torch.float32))
