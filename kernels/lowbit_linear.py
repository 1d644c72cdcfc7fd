"""Triton low-bit weight GEMMs: lowbit_linear (W{2,3,4,8}A16) and w4a8_linear (W{2,3,4}A8), one kernel.

out[m, n] = epilogue(sum_k x[m, k] * q[n, k]) with q = u - zero the signed codes of ``w_packed`` int32
[ceil(K/32) * BITS, N] (layout: qbert.quant.packing; N contiguous, so the words of neighbouring output
channels are neighbours in memory and every K step is a coalesced stream). Each K tile of codes is
unpacked in registers from the packed words only (BITS / 8 bytes a weight): the float weight never
exists in memory. Two constexpr switches pick the variant:

  variant              x tile           q operand   dot accumulator       scale
  lowbit_linear (A16)  f16 / bf16 / f32 q.to(x)     float32               per K tile, or once (ONE_GROUP)
  w4a8_linear   (A8)   int8 (per token) q.to(int8)  int32 (exact)         per K tile, or once (ONE_GROUP)

q is an exact small integer in its operand type (|q| <= 255 is exact in f16 / bf16 / f32, and |q| <= 15
in int8 for <= 4 bits), so the scales factor out of the dot: a K tile never spans two K groups (BLOCK_K divides group_size), and
    acc_f[m, n] += f32(dot(x_tile, q_tile))[m, n] * scales[g(tile), n]
or, with one group per row (ONE_GROUP), the whole K loop accumulates in the dot and is scaled once.
Epilogue (float32): (acc_f * x_scale[m] for A8) + bias[n], cast to the output dtype.

Split-K (few tokens): SPLIT_K programs share an output tile, each over a contiguous run of K tiles, and
write float32 partials [SPLIT_K, M, N] that the launcher sums (then adds the bias and casts): no atomics,
so results do not depend on scheduling, and autotuning may rerun the kernel freely.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from qbert.kernels._common import (
    INTERPRET,
    INTERPRET_GEMM_CONFIG,
    LOWBIT_A8_CONFIGS,
    LOWBIT_A16_CONFIGS,
    SPLIT_K_BLOCK_N,
    SPLIT_K_MAX,
    SPLIT_K_MAX_M,
    SPLIT_K_MIN_K,
    cast_for_store,
    check_contiguous,
    even_k,
    grouped_tile,
    load_lowbit_codes,
    m_bucket,
)
from qbert.kernels.quantize_per_token import quantize_per_token_triton

from qbert.quant.packing import PACK_CHUNK

_CHUNK = tl.constexpr(PACK_CHUNK)


@triton.jit
def _zero_point(zeros_row_ptr, cols, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zero points [BLOCK_N] int32 of one K group: stored uint8, or the implicit 2**(BITS-1)."""
    if HAS_ZEROS:
        return tl.load(zeros_row_ptr + cols).to(tl.int32)
    else:
        return tl.full((BLOCK_N,), 2 ** (BITS - 1), tl.int32)


@triton.jit
def _lowbit_linear_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr,   # x [M, K] float or int8, w_packed [K_words, N] i32, [G, N] f32 / u8
    x_scale_ptr, bias_ptr, c_ptr,          # [M] f32 (A8 only), [N] float, c [M, N] or f32 [SPLIT_K, M, N]
    M, N, K, group_size,
    M_BUCKET,                              # autotune key only (see _common.m_bucket)
    stride_xm, stride_cs, stride_cm,       # x / c row strides, c split stride; inner strides are 1
    BITS: tl.constexpr,                    # 2, 3, 4 or 8
    ACT_INT8: tl.constexpr,                # x is int8 (per-token quantized): int8 dot, int32 accumulator
    ONE_GROUP: tl.constexpr,               # group_size >= K: one scale per column, applied after the K loop
    HAS_ZEROS: tl.constexpr,               # else the implicit zero 2**(BITS-1) (symmetric codes)
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,           # "ieee" for f32 x (torch's f32 matmul is not TF32)
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,                  # K % BLOCK_K == 0: no K mask
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                       # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                       # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)                                         # [BLOCK_K]
    # Rows / columns past M / N wrap onto valid ones, so loads need no M / N mask (the store masks them).
    # int64 rows of x and c: M * K passes 2**31 for long batches of tokens.
    rows_x = (offs_m % M).to(tl.int64)
    cols = offs_n % N
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :]         # [BLOCK_M, BLOCK_K]
    n_chunks = tl.cdiv(K, _CHUNK)                                          # chunks of codes in w_packed

    if ONE_GROUP:
        # One K group: scale and zero per column, read once; the dot accumulates across all of K.
        scale = tl.load(scales_ptr + cols)                                  # [BLOCK_N] f32
        zero = _zero_point(zeros_ptr, cols, BITS, HAS_ZEROS, BLOCK_N)       # [BLOCK_N] i32
        if ACT_INT8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    for kt in range(first, last):
        k0 = kt * BLOCK_K
        if EVEN_K:
            x = tl.load(x_ptrs + k0)
        else:
            # Past K, x is 0, so whatever codes the zero-padded chunk holds add nothing.
            x = tl.load(x_ptrs + k0, mask=offs_k[None, :] < K - k0, other=0)
        u = load_lowbit_codes(w_ptr, cols, k0 // _CHUNK, n_chunks, N, BITS, BLOCK_K, BLOCK_N,
                              not EVEN_K)                                    # [BLOCK_K, BLOCK_N] i32
        if not ONE_GROUP:
            # The tile lies inside K group g (BLOCK_K divides group_size): one scale and zero row for the
            # whole tile, read once per tile (a [BLOCK_N] row that stays in cache across the group).
            g = k0 // group_size
            scale = tl.load(scales_ptr + g * N + cols)                      # [BLOCK_N] f32
            zero = _zero_point(zeros_ptr + g * N, cols, BITS, HAS_ZEROS, BLOCK_N)
        q = u - zero[None, :]                                               # [BLOCK_K, BLOCK_N], exact ints
        if ACT_INT8:
            # |q| <= 15 (<= 4-bit codes): the int8 narrowing is exact; s8 x s8 -> s32 tensor cores.
            q = q.to(tl.int8)
            dot_acc_dtype = tl.int32
        else:
            # |q| <= 255 is exact in f16 / bf16 / f32: the tensor cores see the integer codes.
            q = q.to(x_ptr.dtype.element_ty)
            dot_acc_dtype = tl.float32
        if ONE_GROUP:
            acc = tl.dot(x, q, acc, input_precision=DOT_PRECISION, out_dtype=dot_acc_dtype)
        else:
            part = tl.dot(x, q, input_precision=DOT_PRECISION, out_dtype=dot_acc_dtype)
            acc += part.to(tl.float32) * scale[None, :]

    # Epilogue in float32, in the references' order: (acc * scale) * x_scale + bias.
    out = acc.to(tl.float32)
    if ONE_GROUP:
        out = out * scale[None, :]
    mask_m = offs_m < M
    mask_n = offs_n < N
    if ACT_INT8:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)      # [BLOCK_M] f32
        out = out * x_scale[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)           # [BLOCK_N] any float
        out = out + bias.to(tl.float32)[None, :]
    c_ptrs = (c_ptr + pid_k.to(tl.int64) * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n[None, :])                                           # [BLOCK_M, BLOCK_N]
    tl.store(c_ptrs, cast_for_store(out, c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The interpreter has no SMs to fill; pretending a small GPU's worth makes the split-K heuristic pick
# SPLIT_K > 1 for the CPU tests' few-token shapes (M = 16, N = K = 768 splits K in 2), so that path is tested.
_INTERPRET_SMS = 32
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "group_size", "BITS", "SPLIT_K"]


def _config_key(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def fit_block_k(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune pruning (and the interpreter's config): BLOCK_K -> gcd(BLOCK_K, group_size) unless one
    group covers K, so no K tile spans two groups; configs that become equal are kept once."""
    k, group_size = named_args["K"], named_args["group_size"]
    fitted: dict[tuple, triton.Config] = {}
    for config in configs:
        block_k = config.kwargs["BLOCK_K"]
        if group_size < k:
            block_k = math.gcd(block_k, group_size)  # both multiples of 32: at least one chunk
        config = triton.Config({**config.kwargs, "BLOCK_K": block_k}, num_warps=config.num_warps,
                               num_stages=config.num_stages)
        fitted.setdefault(_config_key(config), config)
    return list(fitted.values())


class _Launcher:
    """The low-bit kernel autotuned over ``configs`` on a GPU (keyed on M bucket, N, K, group size, bits and
    split), or run with one fixed config when interpreted; adds the EVEN_K heuristic."""

    def __init__(self, configs: tuple[triton.Config, ...]):
        kernel = triton.heuristics({"EVEN_K": even_k})(_lowbit_linear_kernel)
        if INTERPRET:
            self._kernel = kernel
        else:
            self._kernel = triton.autotune(configs=list(configs), key=_AUTOTUNE_KEY,
                                           prune_configs_by={"early_config_prune": fit_block_k})(kernel)

    def __call__(self, x, x_scale, w_packed, scales, zeros, bias, c, group_size, split_k, **constexprs):
        m, k = x.shape
        n = w_packed.shape[1]
        args = (x, w_packed, scales, scales if zeros is None else zeros, scales if x_scale is None else x_scale,
                c if bias is None else bias, c, m, n, k, group_size, m_bucket(m),
                x.stride(0), c.stride(0) if split_k > 1 else 0, c.stride(-2))
        constexprs.update(ONE_GROUP=group_size >= k, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
                          SPLIT_K=split_k)

        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k

        if INTERPRET:
            (config,) = fit_block_k([INTERPRET_GEMM_CONFIG], {"K": k, "group_size": group_size})
            self._kernel[grid(config.kwargs)](*args, **config.kwargs, **constexprs,
                                              num_warps=config.num_warps, num_stages=config.num_stages)
        else:
            self._kernel[grid](*args, **constexprs)


_launch_a16 = _Launcher(LOWBIT_A16_CONFIGS)
_launch_a8 = _Launcher(LOWBIT_A8_CONFIGS)


def pick_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """SPLIT_K for an [M, K] x [K, N] low-bit GEMM: > 1 only for few tokens, to give every SM a CTA."""
    if m > SPLIT_K_MAX_M:
        return 1
    sms = _INTERPRET_SMS if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(SPLIT_K_MAX, sms // triton.cdiv(n, SPLIT_K_BLOCK_N), k // SPLIT_K_MIN_K))


def _run(launch, x, x_scale, w_packed, scales, zeros, bits, group_size, bias, out_dtype, split_k,
         **constexprs) -> torch.Tensor:
    m, k = x.shape
    n = w_packed.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    split = pick_split_k(m, n, k, x.device) if split_k is None else split_k
    if split == 1:
        launch(x, x_scale, w_packed, scales, zeros, bias, out, group_size, 1, BITS=bits, **constexprs)
        return out
    # float32 partials, summed here in a fixed order; then bias and one rounding to out_dtype.
    partials = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    launch(x, x_scale, w_packed, scales, zeros, None, partials, group_size, split, BITS=bits, **constexprs)
    y = partials.sum(0)
    if bias is not None:
        y += bias.float()
    return out.copy_(y)


def lowbit_linear_triton(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bits: int, group_size: int, bias: torch.Tensor | None,
                         *, split_k: int | None = None) -> torch.Tensor:
    """``x @ dequantize(w_packed).T + bias`` (qbert.ops.lowbit_linear): x f32/f16/bf16 [M, K], w_packed
    int32 [ceil(K/32)*bits, N], scales f32 / zeros u8 (or None) [ceil(K/group_size), N] -> x.dtype [M, N].

    group_size: a multiple of 32, or >= K for one group. split_k: None picks it by shape (pick_split_k).
    """
    check_contiguous("lowbit_linear_triton", x=x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)
    # f32 x: IEEE products, as torch's default f32 matmul (TF32 would round x to 10 mantissa bits).
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    return _run(_launch_a16, x, None, w_packed, scales, zeros, bits, group_size, bias, x.dtype, split_k,
                ACT_INT8=False, DOT_PRECISION=precision)


def w4a8_linear_triton(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, bits: int, group_size: int, bias: torch.Tensor | None,
                       *, split_k: int | None = None) -> torch.Tensor:
    """qbert.ops.w4a8_linear: x quantized per token (kernels/quantize_per_token.py), then int8 x int8 dots
    on the codes widened to int8 in registers (bits 2, 3, 4); shapes and arguments as lowbit_linear_triton.
    """
    check_contiguous("w4a8_linear_triton", x=x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)
    x_q, x_scale = quantize_per_token_triton(x)
    return _run(_launch_a8, x_q, x_scale, w_packed, scales, zeros, bits, group_size, bias, x.dtype, split_k,
                ACT_INT8=True, DOT_PRECISION="tf32")
