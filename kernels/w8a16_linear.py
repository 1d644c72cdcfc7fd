"""Triton W8A16 linear: float activations times an int8 weight, dequantized in the epilogue.

It runs the int8-weight GEMM of kernels/int8_gemm.py with a float ``a``: each int8 weight tile is loaded
(half the bytes of an f16 weight, which is the point when the GEMM is bandwidth-bound at small M), cast to
x's dtype in registers, and fed to an f16/bf16 tensor-core dot with float32 accumulation (f32 x runs the
IEEE FMA path). The per-channel scale factors out of the K sum, so it is applied once per output:
    out[m, n] = (acc[m, n] * w_scale[n] + bias[n]).to(x.dtype)
"""

from __future__ import annotations

import torch
import triton.language as tl
from qbert.kernels._common import INTERPRET_GEMM_CONFIG, W8A16_CONFIGS, Launcher, check_contiguous, m_bucket
from qbert.kernels.int8_gemm import _int8_gemm_kernel

# Its own launcher: float a needs other tiles (BLOCK_K in bytes differs) and its own autotune cache.
_launch = Launcher(_int8_gemm_kernel, W8A16_CONFIGS, INTERPRET_GEMM_CONFIG)


def w8a16_linear_triton(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``(x @ w_q.T) * w_scale + bias``: x f32/f16/bf16 [M, K], w_q int8 [N, K] -> x.dtype [M, N]."""
    check_contiguous("w8a16_linear_triton", x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    m, k = x.shape
    n = w_q.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    # f32 x: IEEE products, as torch's default f32 matmul (TF32 would round x to 10 mantissa bits).
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _launch(m, n, x, w_q, out, out, w_scale, out if bias is None else bias, m, n, k, m_bucket(m),
            x.stride(0), w_q.stride(0), out.stride(0),
            ACC_DTYPE=tl.float32, DOT_PRECISION=precision, A_SCALE=False, B_SCALE=True,
            HAS_BIAS=bias is not None, GELU=False)
    return out
