"""GPU cases of the cuda backend of lowbit_linear / w4a8_linear that the generic op tests do not reach.

tests/ops/test_lowbit_linear.py and tests/ops/test_w4a8_linear.py already run the cuda row on every
generic case. Here: both sides of the small-M / large-M path boundary, split-K (its determinism and an
LLM-sized weight), an unaligned x view (the launcher's padded copy), and compute-sanitizer runs of every
path. Tolerance tier: same math in float, as in the generic tests.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

import qbert
from qbert.ops import lowbit_linear, w4a8_linear
from qbert.ops._registry import backend_unavailable
from qbert.ops.w4a8_linear import w4a8_linear_reference
from tests._backends import assert_error_within
from tests.cuda import _nvcc
from tests.ops._lowbit import lowbit_operands, lowbit_truth_and_baseline, w4a8_truth


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    reasons = backend_unavailable("cuda")
    return "; ".join(reasons) if reasons else None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

SMALL_M_MAX = 16  # lowbit_linear_kernel.cuh kSmallMMax: the streaming config's tile height


def _check_a16(args):
    with qbert.use_backend("cuda"):
        out = lowbit_linear(*args)
    assert_error_within(out.cpu(), *lowbit_truth_and_baseline(*args))
    return out


def _check_a8(args):
    with qbert.use_backend("cuda"):
        out = w4a8_linear(*args)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    assert_error_within(out.cpu(), w4a8_truth(*args), w4a8_linear_reference(*cpu_args))
    return out


@pytest.mark.parametrize("m", [SMALL_M_MAX - 1, SMALL_M_MAX, SMALL_M_MAX + 1, 128, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_a16_path_boundary(m, dtype, bits):
    _check_a16(lowbit_operands(m, 320, 1024, 128, bits, dtype, "cuda"))


@pytest.mark.parametrize("m", [SMALL_M_MAX, SMALL_M_MAX + 1, 257])
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"w{b}")
def test_a8_path_boundary(m, bits):
    _check_a8(lowbit_operands(m, 320, 1024, 64, bits, torch.float16, "cuda"))


def test_split_k_is_deterministic():
    # M = 1 on a 4096 x 4096 weight: few output tiles, so K is split over CTAs and reduced in order.
    args = lowbit_operands(1, 4096, 4096, 128, 4, torch.float16, "cuda")
    first = _check_a16(args)
    with qbert.use_backend("cuda"):
        assert torch.equal(first, lowbit_linear(*args))


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 16])
def test_llm_shape(m):
    _check_a16(lowbit_operands(m, 8192, 8192, 128, 4, torch.float16, "cuda"))


def test_unaligned_x_view():
    # A contiguous view starting 2 bytes into its storage: rows are not 16-byte aligned.
    x, *rest = lowbit_operands(5, 64, 256, 64, 4, torch.float16, "cuda")
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    shifted = storage[1:].view_as(x)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16
    _check_a16((shifted, *rest))


_SANITIZED = textwrap.dedent("""
    import torch, qbert
    from qbert.ops import lowbit_linear, w4a8_linear
    from tests.ops._lowbit import lowbit_operands, lowbit_truth_and_baseline
    with qbert.use_backend("cuda"):
        for m, dtype in ((3, torch.float16), (40, torch.bfloat16), (9, torch.float32)):
            for n, k in ((13, 129), (256, 512)):
                lowbit_linear(*lowbit_operands(m, n, k, 32, 3, dtype, "cuda"))
                w4a8_linear(*lowbit_operands(m, n, k, 32, 4, dtype, "cuda"))
        torch.cuda.synchronize()
""")


@pytest.mark.slow
@pytest.mark.skipif(_nvcc.SANITIZER is None, reason="compute-sanitizer not found (PATH, CUDA_HOME)")
@pytest.mark.parametrize("sanitizer_tool", _nvcc.SANITIZER_TOOLS)
def test_compute_sanitizer(sanitizer_tool):
    # Every path (small-M, large-M, SIMT, W4A8) on ragged and aligned shapes.
    _nvcc.assert_sanitizer_clean(sanitizer_tool, _SANITIZED)
