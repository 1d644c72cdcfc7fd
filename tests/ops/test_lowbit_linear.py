import pytest
import torch

import qbert
from qbert.ops import lowbit_linear
from qbert.ops.lowbit_linear import lowbit_linear_reference
from qbert.quant.lowbit import dequantize_lowbit
from qbert.quant.packing import BITS_CHOICES, pack, unpack
from tests._backends import assert_error_within, device_backends
from tests.ops._lowbit import CASES, DTYPES, case_id, lowbit_operands, lowbit_truth_and_baseline


def _skip_interpreter_bf16(device, backend, dtype):
    if (device, backend, dtype) == ("cpu", "triton", torch.bfloat16):
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (the op refuses it there)")


@pytest.mark.parametrize("device,backend", device_backends("lowbit_linear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bits", BITS_CHOICES, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_against_reference(device, backend, dtype, bits, case):
    # Tier: same math in float: error against float64 math on the same codes at most 2x that of PyTorch
    # computing the layer in the activation dtype with the weight dequantized to it.
    _skip_interpreter_bf16(device, backend, dtype)
    args = lowbit_operands(*case, bits, dtype, device)
    with qbert.use_backend(backend):
        out = lowbit_linear(*args)
    assert out.dtype == dtype and out.shape == (case[0], case[1]) and out.device.type == device
    assert_error_within(out.cpu(), *lowbit_truth_and_baseline(*args))


@pytest.mark.parametrize("device,backend", device_backends("lowbit_linear"))
@pytest.mark.parametrize("bits", BITS_CHOICES, ids=lambda b: f"w{b}")
def test_symmetric_codes_without_bias(device, backend, bits):
    # zeros=None: the implicit zero point 2**(bits-1).
    args = lowbit_operands(9, 40, 96, 32, bits, torch.float32, device, symmetric=True, bias=False)
    with qbert.use_backend(backend):
        out = lowbit_linear(*args)
    assert_error_within(out.cpu(), *lowbit_truth_and_baseline(*args))


def test_reference_matches_dequantized_float_linear():
    x, w_packed, scales, zeros, bits, group, bias = lowbit_operands(9, 17, 70, 32, 3, torch.float32, "cpu")
    w = dequantize_lowbit(unpack(w_packed, bits, 70), scales, zeros, bits, group)
    torch.testing.assert_close(lowbit_linear_reference(x, w_packed, scales, zeros, bits, group, bias),
                               torch.nn.functional.linear(x, w, bias))


def test_leading_dims():
    x, *rest = lowbit_operands(6, 16, 64, 32, 4, torch.float32, "cpu")
    out = lowbit_linear(x.view(2, 3, 64), *rest)
    torch.testing.assert_close(out.view(6, 16), lowbit_linear(x, *rest), rtol=0, atol=0)


def test_opcheck():
    args = lowbit_operands(7, 13, 64, 32, 4, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.qbert.lowbit_linear.default, args)


def test_compile_fullgraph():
    args = lowbit_operands(3, 8, 64, 32, 3, torch.float32, "cpu")
    compiled = torch.compile(lambda *a: lowbit_linear(*a).sum(-1), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), lowbit_linear_reference(*args).sum(-1))


_NAMES = ("x", "w_packed", "scales", "zeros", "bits", "group_size", "bias")


@pytest.mark.parametrize("change,error,match", [
    ({"x": torch.zeros(7, 64, dtype=torch.int8)}, TypeError, "lowbit_linear: x must be float32"),
    ({"bits": 5}, ValueError, r"bits must be one of \(2, 3, 4, 8\)"),
    ({"group_size": 48}, ValueError, "group_size must be a positive multiple of 32, or >= K=64"),
    ({"w_packed": torch.zeros(13, 64, dtype=torch.int8)}, TypeError, "w_packed must be int32"),
    ({"w_packed": torch.zeros(4, 13, dtype=torch.int32)}, ValueError,
     r"w_packed must have ceil\(K/32\)\*bits = 8 rows for K=64, bits=4"),
    ({"scales": torch.zeros(13)}, ValueError, r"scales must have shape \[ceil\(K/group_size\)=2, N=13\]"),
    ({"zeros": torch.zeros(2, 13, dtype=torch.int8)}, TypeError, "zeros must be uint8"),
    ({"bias": torch.zeros(12)}, ValueError, r"bias must have shape \[N=13\]"),
    ({"x": torch.zeros(64, 7).T}, ValueError, "x must be contiguous"),
    ({"scales": torch.zeros(2, 13, device="meta")}, ValueError, "one device"),
], ids=["x-dtype", "bits", "group", "w-dtype", "w-rows", "scales", "zeros", "bias", "contiguity", "device"])
def test_errors(change, error, match):
    args = dict(zip(_NAMES, lowbit_operands(7, 13, 64, 32, 4, torch.float32, "cpu")))
    args.update(change)
    with pytest.raises(error, match=match):
        lowbit_linear(**args)


def test_pack_is_the_layout_the_op_reads():
    # One weight, two packings of the same codes into different bit widths give the same result.
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 4, (8, 64), dtype=torch.uint8, generator=g)
    x = torch.randn(3, 64, generator=g)
    scales = torch.rand(1, 8, generator=g)
    zeros2 = torch.full((1, 8), 2, dtype=torch.uint8)
    as2 = lowbit_linear(x, pack(codes, 2), scales, zeros2, 2, 64)
    as4 = lowbit_linear(x, pack(codes, 4), scales, zeros2, 4, 64)
    torch.testing.assert_close(as2, as4, rtol=0, atol=0)
