"""The cpu backend of lowbit_linear and w4a8_linear on every instruction set this CPU can run, each
forced with qbert._C.set_cpu_isa, at sizes just past the kernels' blocks.

Tolerance tiers: w4a8_linear is exact (integer sums per K group, then the reference's float32 ops in
the reference's order: bit for bit); lowbit_linear is "same math in float" (FMAs in another summation
order than PyTorch's matmul: error against float64 at most 2x that of the float32 reference).
"""

from __future__ import annotations

import pytest
import torch

from qbert import _ext
from qbert.ops.lowbit_linear import lowbit_linear_reference
from qbert.ops.w4a8_linear import W4A8_BITS, W4A8_MAX_GROUP_K, w4a8_linear_reference
from qbert.quant.lowbit import dequantize_lowbit
from qbert.quant.packing import BITS_CHOICES, pack, unpack
from tests._backends import assert_error_within, forced_cpu_isa
from tests.ops._lowbit import case_id, lowbit_operands

pytestmark = pytest.mark.skipif(bool(_ext.load_error()), reason="; ".join(_ext.load_error()) or "loaded")

ISAS = ("scalar", "avx2", "avx_vnni", "avx512_vnni")

# (M, N, K, group_size) around the blocks: lowbit_linear's direct path (16 / 8 / 4 column vectors, 4- and
# 2-row tiles) and its 64 columns x 128 k panels and 6-row tiles (the panels only at M past the direct path);
# w4a8_linear's 48-column (AVX-512) and 16-column (256-bit) panels and 8- / 6-row tiles; K not a
# multiple of the 4-k quad; one group wider than K; a single output column.
CASES = [(1, 65, 129, 32), (7, 49, 257, 64), (9, 17, 130, 130), (13, 97, 160, 32), (6, 64, 128, 128),
         (8, 48, 256, 1024), (17, 1, 33, 32)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(params=ISAS)
def isa(request):
    """Forces one ISA for the test, skipping ISAs this CPU lacks; restores the automatic choice after."""
    with forced_cpu_isa(request.param) as name:
        yield name


def _truth(x, w_packed, scales, zeros, bits, group_size, bias):
    w = dequantize_lowbit(unpack(w_packed, bits, x.shape[-1]), scales, zeros, bits, group_size)
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def _magnitude(x, w_packed, scales, zeros, bits, group_size, bias):
    """|x| @ |w|.T (+ |bias|): the size of the terms each output sums, which float32 rounds at."""
    w = dequantize_lowbit(unpack(w_packed, bits, x.shape[-1]), scales, zeros, bits, group_size)
    y = x.double().abs() @ w.double().abs().T
    return y if bias is None else y + bias.double().abs()


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("bits", BITS_CHOICES, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lowbit_linear_cpu(isa, case, bits, dtype):
    args = lowbit_operands(*case, bits, dtype, "cpu", symmetric=bits == 3)
    out = torch.ops.qbert.lowbit_linear_cpu(*args)
    assert out.dtype == dtype and out.shape == (case[0], case[1])
    assert_error_within(out, _truth(*args), lowbit_linear_reference(*args), magnitude=_magnitude(*args))


# lowbit_linear_cpu serves M <= max_direct_m with its direct path (codes decoded in registers) and larger
# M with panels: M one below, at and one past that threshold, N ragged against both paths' column blocks
# (64 and 16 columns), K against the 32-code chunk, one group per row or groups of 32.
THRESHOLD_SHAPES = [(67, 161, 32), (13, 100, 100)]


@pytest.mark.parametrize("bits", BITS_CHOICES, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("shape", THRESHOLD_SHAPES, ids=lambda s: "N{}-K{}-g{}".format(*s))
@pytest.mark.parametrize("past_threshold", (-1, 0, 1), ids=lambda d: f"threshold{d:+d}")
def test_lowbit_linear_cpu_across_the_direct_path_threshold(isa, past_threshold, shape, bits):
    m = torch.ops.qbert.lowbit_linear_cpu_max_direct_m() + past_threshold
    args = lowbit_operands(m, *shape, bits, torch.float32, "cpu", symmetric=bits == 3, bias=m % 2 == 1)
    out = torch.ops.qbert.lowbit_linear_cpu(*args)
    assert out.shape == (m, shape[0])
    assert_error_within(out, _truth(*args), lowbit_linear_reference(*args), magnitude=_magnitude(*args))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("bits", W4A8_BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_w4a8_linear_cpu_exact(isa, case, bits, dtype):
    args = lowbit_operands(*case, bits, dtype, "cpu", symmetric=bits == 3, bias=case[0] % 2 == 1)
    out = torch.ops.qbert.w4a8_linear_cpu(*args)
    torch.testing.assert_close(out, w4a8_linear_reference(*args), rtol=0, atol=0)


def test_w4a8_linear_cpu_refuses_zero_points_outside_the_code_range():
    """u - zero must fit the int8 operand: a zero point above 2**bits - 1 is refused, not wrapped."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 96, generator=g)
    w_packed = pack(torch.randint(0, 16, (40, 96), dtype=torch.uint8, generator=g), 4)
    scales = torch.rand(3, 40, generator=g)
    zeros = torch.randint(0, 16, (3, 40), dtype=torch.uint8, generator=g)
    zeros[2, 39] = 16
    with pytest.raises(RuntimeError, match=r"w4a8_linear_cpu: zero points must be in \[0, 15\] for bits=4 \(u - "
                                           r"zero must fit an int8 operand\), got a zero point of 16"):
        torch.ops.qbert.w4a8_linear_cpu(x, w_packed, scales, zeros, 4, 32, None)


def test_w4a8_linear_cpu_refuses_a_k_group_past_the_int32_limit():
    k = W4A8_MAX_GROUP_K + 1
    w_packed = torch.zeros(-(-k // 32) * 4, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=f"w4a8_linear_cpu: a K group of min\\(group_size={k}, K={k}\\) "
                                           f"elements exceeds {W4A8_MAX_GROUP_K}"):
        torch.ops.qbert.w4a8_linear_cpu(torch.zeros(1, k), w_packed, torch.ones(1, 1), None, 4, k, None)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", [(13, 257, 160, 32), (128, 768, 768, 128)], ids=case_id)
def test_thread_count_does_not_change_results(isa, case, restore_threads):
    args = lowbit_operands(*case, 4, torch.float32, "cpu")
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append((torch.ops.qbert.lowbit_linear_cpu(*args), torch.ops.qbert.w4a8_linear_cpu(*args)))
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def _args(**changes):
    args = dict(zip(("x", "w_packed", "scales", "zeros", "bits", "group_size", "bias"),
                    lowbit_operands(3, 8, 64, 32, 4, torch.float32, "cpu")))
    args.update(changes)
    return tuple(args.values())


@pytest.mark.parametrize(("name", "args", "match"), [
    ("lowbit_linear_cpu", _args(bits=5), r"bits must be one of \[2, 3, 4, 8\], got 5"),
    ("w4a8_linear_cpu", _args(bits=8), r"bits must be one of \[2, 3, 4\], got 8"),
    ("lowbit_linear_cpu", _args(group_size=48), "group_size must be a positive multiple of 32, or >= K=64"),
    ("w4a8_linear_cpu", _args(w_packed=torch.zeros(7, 8, dtype=torch.int32)), "w_packed must have ceil"),
    ("lowbit_linear_cpu", _args(scales=torch.ones(1, 8)), r"scales must have shape \[ceil\(K/group_size\)=2, N=8\]"),
    ("w4a8_linear_cpu", _args(zeros=torch.zeros(2, 8, dtype=torch.int32)), "zeros must be Byte"),
    ("lowbit_linear_cpu", _args(x=torch.zeros(3, 64, dtype=torch.float64)), "x must be Float, Half or BFloat16"),
    ("w4a8_linear_cpu", _args(bias=torch.zeros(9)), r"bias must have shape \[N=8\]"),
], ids=["lowbit-bits", "w4a8-bits", "group_size", "w_packed-rows", "scales-shape", "zeros-dtype", "x-dtype",
        "bias-shape"])
def test_cpp_checks_name_the_op_and_constraint(name, args, match):
    with pytest.raises(RuntimeError, match=f"{name}: {match}"):
        getattr(torch.ops.qbert, name)(*args)
