"""Triton per-token int8 quantization, bit-exact with quantize_per_token_reference.

One program per row: pass 1 reduces amax over K in BLOCK_K chunks (+inf when the row holds a NaN or an
infinity: scale NaN, codes 0), pass 2 re-reads the row (from L1/L2: a BERT row is at most a few KiB) and
writes the codes. Both divisions are IEEE-correctly rounded (``div_rn``): PTX's default f32 ``/`` in
Triton is approximate, and one ulp off in the scale or in x / scale moves codes that sit on a rounding
boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qbert.kernels._common import check_contiguous, finite_abs, token_codes, token_scale

# A whole BERT row (K <= 4096) in one chunk; longer rows loop. Chunks of 4096 f32 across 8 warps are 16
# values per thread, which stays in registers.
_MAX_BLOCK_K = 4096
_ELEMS_PER_WARP = 512  # 16 per lane: 4 vectorized 16-byte loads of f32
_MAX_WARPS = 8


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr,    # x [M, K] float, q [M, K] int8, scale [M] f32
    K, stride_xm, stride_qm,    # the K stride is 1
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)   # int64: row * stride can pass 2**31
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)          # [BLOCK_K]

    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, finite_abs(x))
    row_amax = tl.max(amax, axis=0)
    scale = token_scale(row_amax)
    finite = row_amax < float("inf")
    tl.store(scale_ptr + row, scale)

    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_row + k0 + offs, token_codes(x, scale, finite), mask=mask)


def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of x [M, K] (f32/f16/bf16) -> (q int8 [M, K], scale f32 [M])."""
    check_contiguous("quantize_per_token_triton", x=x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block_k = min(triton.next_power_of_2(k), _MAX_BLOCK_K)
    num_warps = max(1, min(_MAX_WARPS, block_k // _ELEMS_PER_WARP))
    _quantize_per_token_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block_k,
                                     num_warps=num_warps)
    return q, scale
