import pytest
import torch

import qbert
from qbert.ops import w4a8_linear
from qbert.ops.w4a8_linear import W4A8_BITS, signed_codes, w4a8_linear_reference
from tests._backends import assert_error_within, device_backends
from tests.ops._lowbit import CASES, DTYPES, case_id, lowbit_operands, w4a8_truth


@pytest.mark.parametrize("device,backend", device_backends("w4a8_linear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bits", W4A8_BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_against_reference(device, backend, dtype, bits, case):
    # Tier: same math in float. The activation codes must be exact (quantize_per_token's rule), the
    # per-group int32 sums exact; the float epilogue's error at most 2x that of the float32 reference.
    args = lowbit_operands(*case, bits, dtype, device)
    with qbert.use_backend(backend):
        out = w4a8_linear(*args)
    assert out.dtype == dtype and out.shape == (case[0], case[1]) and out.device.type == device
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    assert_error_within(out.cpu(), w4a8_truth(*args), w4a8_linear_reference(*cpu_args))


@pytest.mark.parametrize("device,backend", device_backends("w4a8_linear"))
@pytest.mark.parametrize("bits", W4A8_BITS, ids=lambda b: f"w{b}")
def test_symmetric_codes_without_bias(device, backend, bits):
    args = lowbit_operands(9, 40, 96, 32, bits, torch.float32, device, symmetric=True, bias=False)
    with qbert.use_backend(backend):
        out = w4a8_linear(*args)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    assert_error_within(out.cpu(), w4a8_truth(*args), w4a8_linear_reference(*cpu_args))


def test_signed_codes_fit_int8():
    _, w_packed, _, zeros, bits, group, _ = lowbit_operands(4, 64, 96, 32, 4, torch.float32, "cpu")
    q = signed_codes(w_packed, zeros, bits, 96, group)
    assert q.dtype == torch.int8 and q.abs().max() <= (1 << bits) - 1


def test_close_to_lowbit_linear():
    # Quality: the int8 activations cost little against the float-activation layer.
    args = lowbit_operands(32, 64, 256, 128, 4, torch.float32, "cpu")
    out = w4a8_linear(*args)
    a16 = qbert.ops.lowbit_linear(*args)
    assert ((out - a16).norm() / a16.norm()).item() < 0.02


def test_opcheck():
    torch.library.opcheck(torch.ops.qbert.w4a8_linear.default,
                          lowbit_operands(7, 13, 64, 32, 4, torch.float32, "cpu"))


def test_compile_fullgraph():
    args = lowbit_operands(3, 8, 64, 32, 3, torch.float32, "cpu")
    compiled = torch.compile(lambda *a: w4a8_linear(*a).sum(-1), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), w4a8_linear_reference(*args).sum(-1))


@pytest.mark.parametrize("change,match", [
    ({"bits": 8}, r"w4a8_linear: bits must be one of \(2, 3, 4\)"),
    ({"group_size": 16}, "group_size must be a positive multiple of 32"),
], ids=["bits", "group"])
def test_errors(change, match):
    names = ("x", "w_packed", "scales", "zeros", "bits", "group_size", "bias")
    args = dict(zip(names, lowbit_operands(7, 13, 64, 32, 4, torch.float32, "cpu")))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        w4a8_linear(**args)
