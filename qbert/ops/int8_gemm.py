"""int8_gemm: exact int8 x int8 -> int32 matrix product.

Math: c[m, n] = sum_k a[m, k] * b[n, k]   (c = a @ b.T, exact in int32)
Shapes: a int8 [M, K], b int8 [N, K] (the nn.Linear weight layout), both contiguous,
1 <= K <= INT8_GEMM_MAX_K (131071, where the int32 sum can no longer overflow) -> c int32 [M, N].
"""

from __future__ import annotations

import torch

from qbert.ops import _checks
from qbert.ops._registry import Row, op

NAME = "int8_gemm"


def check_operands(name: str, a: torch.Tensor, b: torch.Tensor, a_name: str = "a", b_name: str = "b") -> None:
    """The checks int8_gemm and int8_linear share: int8 a [.., K] against int8 b [N, K]."""
    _checks.check_dtype(name, a_name, a, torch.int8)
    _checks.check_dtype(name, b_name, b, torch.int8)
    _checks.check_ndim(name, b_name, b, ndim=2)
    if a.shape[-1] != b.shape[1]:
        raise ValueError(f"{name}: K mismatch: {a_name} is {_checks.shape_str(a, 'MK')}, "
                         f"{b_name} is {_checks.shape_str(b, 'NK')}")
    _checks.check_nonempty_k(name, a_name, a)
    _checks.check_int8_gemm_k(name, a_name, a)
    _checks.check_contiguous(name, **{a_name: a, b_name: b})
    _checks.check_same_device(name, **{a_name: a, b_name: b})


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    _checks.check_ndim(NAME, "a", a, ndim=2)
    check_operands(NAME, a, b)


@torch.library.custom_op("qbert::int8_gemm", mutates_args=())
def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a`` [M, K] and ``b`` [N, K]; returns int32 [M, N]."""
    _check(a, b)
    return _OP(a, b)


@int8_gemm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


def int8_gemm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 holds every partial sum exactly (|sum| < 2**31 < 2**53), whatever the summation order,
    # and float64 matmul exists on every device, unlike integer matmul.
    return (a.double() @ b.double().T).to(torch.int32)


def _triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from qbert.kernels.int8_gemm import int8_gemm_triton

    return int8_gemm_triton(a, b)


_OP = op(NAME, reference=int8_gemm_reference,
         cpu=Row(kernel="int8_gemm_cpu"),
         triton=Row(_triton),
         cuda=Row(kernel="int8_gemm_cuda"))
