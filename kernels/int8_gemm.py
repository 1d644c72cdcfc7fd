"""Triton GEMM with an int8 weight: int8_gemm, int8_linear (W8A8) and w8a16_linear share this kernel.

c[m, n] = epilogue(sum_k a[m, k] * b[n, k]) with b [N, K] int8 in the nn.Linear layout (K contiguous,
which is the "col" operand layout both mma.sync and wgmma want for 8-bit types, so no transpose is
needed anywhere). Constexpr switches pick the variant, one kernel for the whole family:

  variant        a       accumulator   epilogue (float32)                              c
  int8_gemm      int8    int32, exact  none                                            int32
  int8_linear    int8    int32, exact  (f32(acc) * a_scale[m]) * b_scale[n] + bias[n]  f32/f16/bf16
                                       [then GELU]
  w8a16_linear   float   float32       acc * b_scale[n] + bias[n]                      a's dtype
For float a, each int8 b tile is cast to a's dtype in registers (the float weight never exists in memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qbert.kernels._common import (
    INT8_GEMM_CONFIGS,
    INTERPRET_GEMM_CONFIG,
    Launcher,
    cast_for_store,
    check_contiguous,
    grouped_tile,
    m_bucket,
)

_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)


@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, c_ptr,                   # a [M, K] int8 or float, b [N, K] int8, c [M, N]
    a_scale_ptr, b_scale_ptr, bias_ptr,    # [M] f32, [N] f32, [N] float; read only if switched on
    M, N, K,
    M_BUCKET,                              # autotune key only (see _common.m_bucket)
    stride_am, stride_bn, stride_cm,       # row strides; the inner (K, N) strides are 1
    ACC_DTYPE: tl.constexpr,               # tl.int32 for int8 a, tl.float32 for float a
    DOT_PRECISION: tl.constexpr,           # "ieee" for f32 a (no TF32: torch's f32 matmul is IEEE)
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,                    # exact-erf GELU on the float32 y (int8_linear activation="gelu")
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,                  # K % BLOCK_K == 0: the main loop needs no K mask
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                      # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)                                        # [BLOCK_K]
    # Rows/columns past M/N wrap onto valid ones, so main-loop loads need no M/N mask (the store masks
    # them). int64 because M * K can pass 2**31 for long batches of tokens.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]       # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None]       # [BLOCK_K, BLOCK_N], K-major

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        # int8 -> f16/bf16/f32 is exact (|code| <= 128), and done on the tile in registers: the float
        # weight never exists in memory. For int8 a this cast is a no-op.
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    mask_m = offs_m < M
    mask_n = offs_n < N
    # Parenthesized: triton before 3.9 rejects a chained `A or B or C` in a kernel.
    if (A_SCALE or B_SCALE) or HAS_BIAS:
        # Dequantize in float32 in the reference's order: (acc * a_scale) * b_scale + bias.
        out = acc.to(tl.float32)
        if A_SCALE:
            a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)   # [BLOCK_M] f32
            out = out * a_scale[:, None]
        if B_SCALE:
            b_scale = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)   # [BLOCK_N] f32
            out = out * b_scale[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)         # [BLOCK_N] any float
            out = out + bias.to(tl.float32)[None, :]
        if GELU:
            # torch's formula and order: (y * 0.5) * (1 + erf(y * (1 / sqrt(2)))).
            out = out * 0.5 * (1.0 + tl.math.erf(out * _SQRT_HALF))
    else:
        out = acc
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]   # [BLOCK_M, BLOCK_N]
    tl.store(c_ptrs, cast_for_store(out, c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_launch = Launcher(_int8_gemm_kernel, INT8_GEMM_CONFIGS, INTERPRET_GEMM_CONFIG)


def int8_gemm_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T``: a int8 [M, K], b int8 [N, K] -> int32 [M, N]."""
    check_contiguous("int8_gemm_triton", a=a, b=b)
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return c
    # The scale and bias pointers are never read (switches off); c stands in for them.
    _launch(m, n, a, b, c, c, c, c, m, n, k, m_bucket(m), a.stride(0), b.stride(0), c.stride(0),
            ACC_DTYPE=tl.int32, DOT_PRECISION="tf32", A_SCALE=False, B_SCALE=False, HAS_BIAS=False, GELU=False)
    return c


def int8_linear_triton(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype, activation: str = "none") -> torch.Tensor:
    """``act((f32(x_q @ w_q.T) * x_scale[:, None]) * w_scale + bias)`` -> out_dtype [M, N], fused epilogue;
    activation "none" or "gelu"."""
    check_contiguous("int8_linear_triton", x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    m, k = x_q.shape
    n = w_q.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    _launch(m, n, x_q, w_q, out, x_scale, w_scale, out if bias is None else bias, m, n, k, m_bucket(m),
            x_q.stride(0), w_q.stride(0), out.stride(0),
            ACC_DTYPE=tl.int32, DOT_PRECISION="tf32", A_SCALE=True, B_SCALE=True, HAS_BIAS=bias is not None,
            GELU=activation == "gelu")
    return out
