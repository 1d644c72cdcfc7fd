"""Triton residual add + LayerNorm + per-token int8 quantization (spec: qbert/ops/add_layernorm_quantize.py).

One program per row, the whole row in registers (BLOCK_K = next power of two of K): the add, the
LayerNorm reductions, the normalization, the rounding to x.dtype and the quantization of that rounded y
all happen on one read of x and residual. The reductions:
  * max |h|: +inf for a row holding a NaN or an infinity, which gives y = NaN, codes 0, scale NaN; a row
    with max |h| > UNSCALED_MAX is multiplied by a power of two c that brings it into [2, 4) (exact), and
    eps by c^2, so that its sum of squares cannot overflow float32;
  * the mean, summed in float64 (exact for a constant row, whose deviations are then exactly 0);
  * the variance, the float32 mean of (h - mean)^2 (a second pass over the registers: no cancellation).
y agrees with the exact LayerNorm to float32 rounding; the codes and scale are bit-exact for the y
written: the divisions are IEEE (``div_rn``, ``sqrt_rn``; Triton's plain f32 ``/`` and ``sqrt`` are
approximate on the GPU) and the rounding is half to even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qbert.kernels._common import cast_for_store, check_contiguous, finite_abs, token_codes, token_scale

# The largest row a program holds: 16384 values over 32 warps is 16 a thread, which stays in registers
# (over 16 warps, 32 a thread, bf16 spills on sm_80; tests/kernels/test_add_layernorm_quantize_aot.py
# checks). BERT-family rows are 768-4096; longer ones are refused through the op's supports().
MAX_K = 16384
_ELEMS_PER_WARP = 256  # 8 per lane: two 16-byte loads of f32 (one of f16 / bf16)
_MAX_WARPS = 32
# The largest max |h| normalized as it is: then |h - mean| <= 2**33, and K * (2**33)**2 stays below
# float32's max (2**128) for any K. Rows of larger values are scaled by a power of two first.
UNSCALED_MAX = tl.constexpr(2.0**32)
_EXPONENT_MASK = tl.constexpr(0x7F800000)  # float32's exponent field: v & it is 2**e for v = m * 2**e
_SCALED_MIN = tl.constexpr(2.0)            # a scaled row's max |h| lies in [2, 4)


def launch_config(k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) for rows of k elements."""
    block_k = triton.next_power_of_2(k)
    return block_k, max(1, min(_MAX_WARPS, block_k // _ELEMS_PER_WARP))


@triton.jit
def _scale_factor(v):
    """c = 2 / 2**e for a positive normal float32 v = m * 2**e, m in [1, 2): v * c lies in [2, 4). c is a
    power of two and a normal float for every finite v (c >= 2**-126), and the division is exact, so
    multiplying by c is exact barring underflow."""
    pow2 = (v.to(tl.uint32, bitcast=True) & _EXPONENT_MASK).to(tl.float32, bitcast=True)
    return tl.math.div_rn(_SCALED_MIN, pow2)


# K is not specialized: Triton would turn K == 1 into a constant, which cannot be cast to float.
@triton.jit(do_not_specialize=["K"])
def _add_layernorm_quantize_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr,   # x, residual [M, K] T; weight, bias [K] f32
    y_ptr, q_ptr, scale_ptr,                     # y [M, K] T, q [M, K] int8, scale [M] f32
    K, eps,                                      # every [M, K] tensor is contiguous: rows are K apart
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)          # int64: row * K can pass 2**31
    offs = tl.arange(0, BLOCK_K)                 # [BLOCK_K]
    mask = offs < K
    base = row * K
    h = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        # The f32 sum rounded to x.dtype is PyTorch's f16 / bf16 add (f32 has >= 2p + 2 bits).
        h = cast_for_store(h + r, y_ptr.dtype.element_ty).to(tl.float32)

    h_max = tl.max(finite_abs(h), axis=0)        # masked lanes are 0
    finite = h_max < float("inf")
    # LayerNorm is invariant under h -> c * h, eps -> c**2 * eps; c is a power of two (exact). eps * c * c
    # may underflow to 0, only where eps is negligible beside the variance.
    # (The factor is computed for every row; the max keeps its division away from a zero h_max.)
    c = tl.where(finite & (h_max > UNSCALED_MAX), _scale_factor(tl.maximum(h_max, UNSCALED_MAX)), 1.0)
    h = h * c
    eps = eps * c * c
    mean = (tl.sum(h.to(tl.float64), axis=0) / K).to(tl.float32)   # IEEE f64 division
    d = tl.where(mask, h - mean, 0.0)            # masked lanes must not add mean^2 to the variance
    var_eps = tl.math.div_rn(tl.sum(d * d, axis=0), K.to(tl.float32)) + eps
    # var + eps is 0 only for a constant row (d = 0: the f64 mean is exact) of scaled values whose scaled
    # eps underflowed; any finite rstd then gives y = bias, as the reference does.
    rstd = tl.where(var_eps > 0, tl.math.div_rn(1.0, tl.sqrt_rn(var_eps)), 0.0)
    y = d * rstd * tl.load(weight_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs, mask=mask, other=0.0)
    y = tl.where(finite, y, float("nan"))        # a row holding a NaN or an infinity: y = NaN
    y_out = cast_for_store(y, y_ptr.dtype.element_ty)
    tl.store(y_ptr + base + offs, y_out, mask=mask)

    # The codes quantize the y just written (rounded to x.dtype), by quantize_per_token's rule.
    y = tl.where(mask, y_out.to(tl.float32), 0.0)
    y_max = tl.max(finite_abs(y), axis=0)
    scale = token_scale(y_max)
    tl.store(scale_ptr + row, scale)
    tl.store(q_ptr + base + offs, token_codes(y, scale, y_max < float("inf")), mask=mask)


def add_layernorm_quantize_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                  bias: torch.Tensor | None, eps: float
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] (+ residual) -> (y [M, K] x.dtype, y_q int8 [M, K], y_scale f32 [M]); K <= MAX_K."""
    check_contiguous("add_layernorm_quantize_triton", x=x, residual=residual)
    m, k = x.shape
    if k > MAX_K:
        raise ValueError(f"add_layernorm_quantize_triton: K must be <= {MAX_K}, got {k}")
    y = torch.empty_like(x)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, q, scale
    weight = weight.float().contiguous()                       # [K]: the kernel reads f32 parameters
    bias_f32 = bias.float().contiguous() if bias is not None else weight  # any valid pointer when absent
    block_k, num_warps = launch_config(k)
    _add_layernorm_quantize_kernel[(m,)](
        x, residual if residual is not None else x, weight, bias_f32, y, q, scale, k, eps,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_K=block_k, num_warps=num_warps)
    return y, q, scale
