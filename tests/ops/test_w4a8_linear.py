import pytest
import torch

import qbert
from qbert.ops import w4a8_linear
from qbert.ops.w4a8_linear import W4A8_BITS, W4A8_MAX_GROUP_K, signed_codes, w4a8_linear_reference
from qbert.quant.packing import packed_rows
from tests._backends import assert_error_within, device_backends
from tests.ops._lowbit import CASES, DTYPES, case_id, lowbit_operands, w4a8_truth


@pytest.mark.parametrize("device,backend", device_backends("w4a8_linear", reference=False))
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


@pytest.mark.parametrize("device,backend", device_backends("w4a8_linear", reference=False))
@pytest.mark.parametrize("bits", W4A8_BITS, ids=lambda b: f"w{b}")
def test_symmetric_codes_without_bias(device, backend, bits):
    args = lowbit_operands(9, 40, 96, 32, bits, torch.float32, device, symmetric=True, bias=False)
    with qbert.use_backend(backend):
        out = w4a8_linear(*args)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    assert_error_within(out.cpu(), w4a8_truth(*args), w4a8_linear_reference(*cpu_args))


NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("device,backend", device_backends("w4a8_linear"))
@pytest.mark.parametrize("value", NONFINITE.values(), ids=NONFINITE.keys())
def test_nonfinite_token_gives_a_nan_row(device, backend, value):
    # Exact: token 3 of 5 holds the value: its whole output row is NaN (x_scale NaN); the other rows are
    # bit-identical to the all-finite result. Two K groups, so the NaN passes through the group sums.
    args = list(lowbit_operands(5, 40, 96, 32, 4, torch.float32, device))
    with qbert.use_backend(backend):
        clean = w4a8_linear(*args)
        args[0][3, 50] = value
        out = w4a8_linear(*args)
    assert out[3].isnan().all()
    assert torch.equal(out[[0, 1, 2, 4]], clean[[0, 1, 2, 4]])


@pytest.mark.parametrize("device,backend", device_backends("w4a8_linear"))
@pytest.mark.parametrize("group_size", (130, 1000), ids=lambda g: f"g{g}")
def test_group_wider_than_k_is_one_group(device, backend, group_size):
    # group_size > K means one group per row, exactly as group_size = K (K = 129), on every backend.
    args = list(lowbit_operands(7, 13, 129, 129, 4, torch.float32, device))
    with qbert.use_backend(backend):
        per_row = w4a8_linear(*args)
        args[5] = group_size
        wide = w4a8_linear(*args)
    assert torch.equal(wide, per_row)


@pytest.mark.parametrize("bits", W4A8_BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("zero", ("past", 255), ids=("just-past-the-range", "255"))
def test_zero_points_outside_the_code_range_are_refused(bits, zero):
    # u - zero would not fit the int8 operand (both backends used to wrap it).
    names = ("x", "w_packed", "scales", "zeros", "bits", "group_size", "bias")
    args = dict(zip(names, lowbit_operands(7, 13, 64, 32, bits, torch.float32, "cpu")))
    bad = (1 << bits) if zero == "past" else zero
    args["zeros"][1, 4] = bad
    with pytest.raises(ValueError, match=rf"w4a8_linear: zero points must be in \[0, {(1 << bits) - 1}\] for "
                                         rf"bits={bits} \(u - zero must fit an int8 operand\), got a zero point "
                                         rf"of {bad}"):
        w4a8_linear(**args)


def test_k_group_longer_than_the_int32_limit_is_refused():
    # One group of W4A8_MAX_GROUP_K + 1 elements: 127 * 15 per element would overflow its int32 sum.
    k = W4A8_MAX_GROUP_K + 1
    x = torch.zeros(1, k)
    w_packed = torch.zeros(packed_rows(k, 4), 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"w4a8_linear: a K group of {k} elements .* exceeds {W4A8_MAX_GROUP_K}"):
        w4a8_linear(x, w_packed, torch.ones(1, 1), None, 4, k)


@pytest.mark.parametrize("bits", W4A8_BITS, ids=lambda b: f"w{b}")
def test_reference_matches_float64_math_on_the_same_codes(bits):
    # The backends are compared with the reference above; the reference itself against float64 math on the
    # same integer codes (w4a8_truth), at float32's default tolerance: its int32 group sums are exact.
    args = lowbit_operands(129, 13, 257, 128, bits, torch.float32, "cpu")
    torch.testing.assert_close(w4a8_linear_reference(*args), w4a8_truth(*args).float())


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
