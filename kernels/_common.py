"""Helpers shared by qbert's Triton kernels: rounding, config lists, and the autotune-or-fixed launch.

Kernels here must stay valid on triton 3.6 through 3.9 (the GPU machines run 3.6): plain pointer
arithmetic (no ``make_block_ptr``), ``tl.dot`` with explicit ``out_dtype``, no ``libdevice`` calls (the
interpreter cannot run them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import triton
import triton.language as tl

from qbert.quant.int8 import INT8_QMAX
from qbert.quant.packing import BYTES_PER_WORD, PACK_CHUNK, WORD_BITS, byte_mask, slices

# Triton decides between compiling and interpreting when a kernel is decorated, i.e. at import time, and
# so do we: the same switch picks autotuning (GPU) or one fixed config (interpreter).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET = tl.constexpr(INTERPRET)

QMAX = tl.constexpr(INT8_QMAX)

# Adding 1.5 * 2**23 to a float32 |y| < 2**22 lands in [2**23, 2**24), where the float32 ulp is exactly 1:
# the IEEE add (round to nearest, ties to even) does the rounding, and subtracting the constant back is
# exact. The 0.5 * 2**23 half keeps negative y in that binade too.
_RNE_MAGIC = tl.constexpr(1.5 * 2**23)


@triton.jit
def round_half_even(y):
    """Round float32 ``y`` to the nearest integer, ties to even (torch.round's rule), for |y| < 2**22.

    ``y.to(tl.int8)`` truncates toward zero (in the interpreter, and in PTX's cvt.rzi), and libdevice's
    rint does not run in the interpreter, hence the add-and-subtract. Nothing reassociates the two adds
    away (Triton sets no fast-math reassociation flags); tests/kernels/test_triton_aot.py checks the PTX.
    """
    return (y + _RNE_MAGIC) - _RNE_MAGIC


# ---- per-token int8 quantization (quantize_per_token's rule: qbert/ops/quantize_per_token.py) ---------
_INF = tl.constexpr(float("inf"))
_NAN = tl.constexpr(float("nan"))


@triton.jit
def finite_abs(x):
    """|x| where x is finite, +inf where it is a NaN or an infinity (NaN < inf is false).

    Its max over a row is +inf exactly when the row holds a non-finite value; a plain max of |x| might
    drop a NaN (PTX's max.f32 returns the other operand)."""
    ax = tl.abs(x)
    return tl.where(ax < _INF, ax, _INF)


@triton.jit
def token_scale(amax):
    """The scale of a row whose max of ``finite_abs`` is ``amax``: amax / 127 (IEEE division), 1 where
    that is 0 (an all-zero row, or an underflow), NaN for a row holding a NaN or an infinity."""
    scale = tl.math.div_rn(amax, QMAX)
    scale = tl.where(scale > 0, scale, 1.0)
    return tl.where(amax < _INF, scale, _NAN)


@triton.jit
def token_codes(x, scale, finite):
    """int8 codes clamp(round_half_even(x / scale), -127, 127) of float32 ``x``; 0 where the row is not
    ``finite`` (its scale is NaN). Clamping before rounding is the same as after (the bounds are integers)
    and keeps |x / scale| small enough for round_half_even; the rounded value is integral, so the int8
    cast is exact."""
    c = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    return tl.where(finite, round_half_even(c), 0.0).to(tl.int8)


# bfloat16 keeps the top 16 bits of a float32; rounding to nearest even adds half an ulp minus one, plus
# the kept lsb, before dropping them.
_BF16_DROPPED_BITS = tl.constexpr(16)
_BF16_HALF_ULP_MINUS_ONE = tl.constexpr((1 << 15) - 1)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr):
    """``x.to(dtype)``, with float32 -> bfloat16 rounded to nearest even under the interpreter too.

    Triton 3.9's interpreter truncates f32 -> bf16 casts, where the GPU's cvt.rn rounds to nearest even
    like torch; it would leave every bf16 output a half ulp from the reference. Rounding the float32 by
    hand first makes the cast exact. Compiled kernels skip this (the branch is resolved at compile time).
    NaN payloads are not preserved by the hand rounding (an interpreter-only path).
    """
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        lsb = (bits >> _BF16_DROPPED_BITS) & 1
        bits = ((bits + _BF16_HALF_ULP_MINUS_ONE + lsb) >> _BF16_DROPPED_BITS) << _BF16_DROPPED_BITS
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# ---- GEMM configs -----------------------------------------------------------------------------------
# One list per operand width. Every config keeps num_warps % 4 == 0 and BLOCK_M % 64 == 0 where it is
# meant for large M, which Hopper's wgmma needs (one warpgroup per 64 rows); BLOCK_M < 64 configs exist
# for the few-token case and run on mma.sync. Shared memory per config = num_stages * (A tile + B tile);
# tests/kernels/test_triton_aot.py compiles every config for sm_80 and sm_90 and checks it fits.

def _config(block_m: int, block_n: int, block_k: int, group_m: int, num_stages: int,
            num_warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_stages=num_stages, num_warps=num_warps)


# Grouped ordering: GROUP_M row-tiles share each column tile of B while it is in L2.
_GROUP_M = 8

# int8 x int8: BLOCK_K = 128 bytes is one full 128-byte swizzle row of shared memory and four k32 mma
# steps. The largest tiles use 3 stages so that 3 * (128*128 + 256*128) B = 144 KiB fits sm_80's 163 KiB.
INT8_GEMM_CONFIGS: tuple[triton.Config, ...] = (
    _config(128, 256, 128, _GROUP_M, 3, 8),   # large M and N: BERT FFN up-projection
    _config(256, 128, 128, _GROUP_M, 3, 8),
    _config(128, 128, 128, _GROUP_M, 4, 8),
    _config(128, 128, 64, _GROUP_M, 4, 4),
    _config(64, 128, 128, _GROUP_M, 4, 4),   # fewer tokens: more CTAs along N keep the SMs busy
    _config(128, 64, 128, _GROUP_M, 4, 4),
    _config(64, 64, 128, _GROUP_M, 4, 4),
    _config(32, 64, 256, _GROUP_M, 3, 4),    # few tokens (M <= 32): long K steps, mma.sync
)

# float activations x int8 weight: A is 2 bytes (f16/bf16) or 4 bytes (f32, IEEE FMA path), so BLOCK_K is
# 64 (128 bytes of f16). The f32 case sets the budget: 3 * (128*64*4 + 256*64) B = 144 KiB on sm_80.
W8A16_CONFIGS: tuple[triton.Config, ...] = (
    _config(128, 256, 64, _GROUP_M, 3, 8),
    _config(128, 128, 64, _GROUP_M, 3, 8),
    _config(128, 128, 64, _GROUP_M, 4, 4),
    _config(64, 128, 64, _GROUP_M, 4, 4),
    _config(128, 64, 64, _GROUP_M, 3, 4),
    _config(64, 64, 64, _GROUP_M, 4, 4),
    _config(32, 64, 128, _GROUP_M, 3, 4),
)

# The interpreter runs every program and every K step in Python (milliseconds each) and cannot autotune:
# one config with large tiles keeps the CPU tests fast. Warps and stages mean nothing there.
INTERPRET_GEMM_CONFIG = _config(64, 64, 128, _GROUP_M, 1, 4)

# Autotuning keys on the next power of two of M (capped), not M itself: BERT batches change the token
# count on every call, and retuning per distinct M would cost seconds each time.
_M_BUCKET_MAX = 4096


def check_contiguous(name: str, **tensors: Any) -> None:
    """The kernels index with row strides and a unit inner stride; the op entry points already make sure."""
    for arg, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: {arg} must be contiguous")


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), _M_BUCKET_MAX)


def even_k(args: dict[str, Any]) -> bool:
    """Heuristic for EVEN_K: K is a multiple of BLOCK_K, so the main loop needs no K mask."""
    return args["K"] % args["BLOCK_K"] == 0


def gemm_grid(m: int, n: int) -> Callable[[dict[str, Any]], tuple[int]]:
    """A 1-D grid of output tiles; the kernel maps the program id to a tile in grouped order."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


class Launcher:
    """A GEMM kernel autotuned over ``configs`` on a GPU, or run with one fixed config when interpreted.

    ``kernel`` is the plain ``@triton.jit`` function (ahead-of-time compilation needs it unwrapped); the
    launcher adds the EVEN_K heuristic and, on GPU, the autotuner keyed on (M bucket, N, K) (the autotuner
    also keys on every tensor's dtype).
    """

    def __init__(self, kernel: Any, configs: Sequence[triton.Config], interpret_config: triton.Config):
        heuristic = triton.heuristics({"EVEN_K": even_k})(kernel)
        self._interpret_config = interpret_config
        if INTERPRET:
            self._kernel = heuristic
        else:
            self._kernel = triton.autotune(configs=list(configs), key=["M_BUCKET", "N", "K"])(heuristic)

    def __call__(self, m: int, n: int, *args: Any, **constexprs: Any) -> None:
        grid = gemm_grid(m, n)
        if INTERPRET:
            config = self._interpret_config
            meta = dict(config.kwargs)
            self._kernel[grid(meta)](*args, **meta, **constexprs, num_warps=config.num_warps,
                                     num_stages=config.num_stages)
        else:
            self._kernel[grid](*args, **constexprs)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, walking GROUP_M row tiles down each column before moving right.

    Consecutive programs then share B's column tile (and reuse A's GROUP_M row tiles), so both stay in L2.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)  # the last group may be short
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# ---- low-bit weight codes (the layout is stated once, in qbert.quant.packing) -----------------------
# A chunk of 32 codes is read as 8 "quads" of four consecutive codes, one code per byte of a 32-bit word:
# one shift and one byte mask of a slice word give a quad (packing.py's byte-sliced rule), and a 3-bit
# quad is the byte-wise OR of its 2-bit and 1-bit slices' quads.
_CHUNK = tl.constexpr(PACK_CHUNK)                             # codes per chunk
_QUADS = tl.constexpr(PACK_CHUNK // BYTES_PER_WORD)           # quads per chunk
_LANES = tl.constexpr(BYTES_PER_WORD)                         # codes per quad
_BYTE_BITS = tl.constexpr(WORD_BITS // BYTES_PER_WORD)
_ONES_PER_BYTE = tl.constexpr(byte_mask(1))                   # 0x01010101: a byte mask is width-ones times it
_W3_SLICES = slices(3)  # ((2, 0), (1, 2)): code bits 0-1 in words 0-1 of a chunk, bit 2 in word 2
_W3_LOW_WIDTH = tl.constexpr(_W3_SLICES[0][0])
_W3_HIGH_WIDTH = tl.constexpr(_W3_SLICES[1][0])
_W3_HIGH_SHIFT = tl.constexpr(_W3_SLICES[1][1])


@triton.jit
def _slice_quads(w_ptr, offs_n, chunk0, n_chunks, N, BITS: tl.constexpr, CHUNKS: tl.constexpr,
                 BLOCK_N: tl.constexpr, WIDTH: tl.constexpr, FIRST_WORD: tl.constexpr, MASKED: tl.constexpr):
    """Quads [CHUNKS, 8, BLOCK_N] (int32, 4 codes of WIDTH bits in its bytes) of one slice of the chunks
    chunk0 .. chunk0 + CHUNKS - 1 of columns offs_n; chunks >= n_chunks read as zeros when MASKED."""
    chunk = chunk0 + tl.arange(0, CHUNKS)                                         # [CHUNKS]
    rows = chunk[:, None] * BITS + FIRST_WORD + tl.arange(0, WIDTH)[None, :]      # [CHUNKS, WIDTH]
    # Each row is N contiguous words: a warp reads neighbouring columns (coalesced).
    ptrs = w_ptr + rows[:, :, None] * N + offs_n[None, None, :]                   # [CHUNKS, WIDTH, BLOCK_N]
    if MASKED:
        words = tl.load(ptrs, mask=(chunk < n_chunks)[:, None, None], other=0)
    else:
        words = tl.load(ptrs)
    # Quad i of a word sits at bit WIDTH * i of each byte.
    shifts = WIDTH * tl.arange(0, _BYTE_BITS // WIDTH)                           # [8 / WIDTH]
    quads = words[:, :, None, :] >> shifts[None, None, :, None]                  # [CHUNKS, WIDTH, 8/WIDTH, BLOCK_N]
    if WIDTH < _BYTE_BITS:
        # The shift is arithmetic (int32), but its sign bits land above every byte's WIDTH kept bits; an
        # 8-bit slice is whole bytes and needs no mask (its 0xFFFFFFFF would not fit an int32 either).
        quads = quads & ((2**WIDTH - 1) * _ONES_PER_BYTE)
    return tl.reshape(quads, (CHUNKS, _QUADS, BLOCK_N))                            # quad q = word * 8/WIDTH + i


@triton.jit
def load_lowbit_codes(w_ptr, offs_n, chunk0, n_chunks, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Unsigned codes u int32 [BLOCK_K, BLOCK_N] of K rows chunk0 * 32 .. + BLOCK_K, columns offs_n.

    w_ptr: w_packed int32 [n_chunks * BITS, N] (qbert.quant.packing); BLOCK_K a multiple of 32; offs_n
    valid columns. Only the packed words are read (BITS / 8 bytes per code): the codes exist in registers.
    Offsets are int32: w_packed must hold fewer than 2**31 words (8 GiB).
    """
    CHUNKS: tl.constexpr = BLOCK_K // _CHUNK
    if BITS == 3:
        low = _slice_quads(w_ptr, offs_n, chunk0, n_chunks, N, BITS, CHUNKS, BLOCK_N, _W3_LOW_WIDTH, 0, MASKED)
        high = _slice_quads(w_ptr, offs_n, chunk0, n_chunks, N, BITS, CHUNKS, BLOCK_N, _W3_HIGH_WIDTH,
                            _W3_LOW_WIDTH, MASKED)
        quads = low | (high << _W3_HIGH_SHIFT)                                    # byte-wise: no carries
    else:
        quads = _slice_quads(w_ptr, offs_n, chunk0, n_chunks, N, BITS, CHUNKS, BLOCK_N, BITS, 0, MASKED)
    lanes = _BYTE_BITS * tl.arange(0, _LANES)                                     # [4]
    codes = (quads[:, :, None, :] >> lanes[None, None, :, None]) & (2**BITS - 1)  # [CHUNKS, 8, 4, BLOCK_N]
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))                                  # K row = chunk*32 + quad*4 + lane


# ---- low-bit GEMM configs (kernels/lowbit_linear.py) ------------------------------------------------
# BLOCK_K counts codes and must be a multiple of the 32-code chunk; the launcher shrinks it to
# gcd(BLOCK_K, group_size) so that a K tile never spans two K groups (group_size 32 runs BLOCK_K = 32).
# Shared memory per stage = x tile + packed words (BLOCK_K * BITS / 8 bytes a column), plus one staging
# buffer of the unpacked operand for the dot; tests/kernels/test_lowbit_aot.py compiles every config.
#
# Few tokens (BLOCK_M = 16, the smallest mma M): the GEMM streams the weight, BITS / 16 of the bytes of an
# f16 one, so the tiles are built for bytes in flight, not for math: long K tiles (256 codes of 4 bits
# are 128 B per column per stage) and 4-5 stages keep each SM's loads queued, and BLOCK_N 64-128 with
# split-K (below) gives every SM a CTA even when N is only 1024 (BERT-large).
# Many tokens: the usual tensor-core tiles (BLOCK_M % 64 == 0 and whole warpgroups for wgmma on sm_90);
# unpacking a [BLOCK_K, BLOCK_N] tile is amortized over BLOCK_M rows. No 128 x 256 / 256 x 128 tiles: the
# unpacked codes need registers beside the accumulator, and ptxas spills there (test_lowbit_aot checks).
LOWBIT_A16_CONFIGS: tuple[triton.Config, ...] = (
    _config(16, 64, 256, _GROUP_M, 4, 4),    # M <= 16: the weight stream; 4 KiB of 4-bit codes a stage
    _config(16, 128, 128, _GROUP_M, 4, 4),
    _config(16, 64, 128, _GROUP_M, 5, 4),
    _config(32, 64, 128, _GROUP_M, 4, 4),
    _config(64, 128, 64, _GROUP_M, 4, 4),    # 64 codes = 128 B of an f16 x row per stage
    _config(128, 128, 64, _GROUP_M, 3, 8),   # large M and N: BERT FFN
    _config(128, 64, 64, _GROUP_M, 4, 4),
)

# W4A8: int8 x and int8-widened codes, so BLOCK_K = 128 bytes of x per row (four k32 mma steps) and,
# for the common group_size 128, exactly one K group per tile: the int32 tile sum is scaled into the
# float accumulator once per group.
LOWBIT_A8_CONFIGS: tuple[triton.Config, ...] = (
    _config(128, 128, 128, _GROUP_M, 4, 8),  # M >= 4096: the int8 tensor cores' regime
    _config(64, 128, 128, _GROUP_M, 4, 4),
    _config(128, 64, 128, _GROUP_M, 4, 4),
    _config(32, 64, 128, _GROUP_M, 4, 4),
    _config(16, 64, 256, _GROUP_M, 4, 4),    # few tokens: as the A16 list
)

# Split-K for few tokens: with M <= SPLIT_K_MAX_M there is one row tile, so only N / BLOCK_N CTAs stream
# the weight (16 for N = 1024); splitting K over up to SPLIT_K_MAX programs per tile fills the SMs. Each
# split keeps at least SPLIT_K_MIN_K codes of K (two 128-code tiles), so the float32 partials it writes
# (and the launcher sums) stay small next to the weight bytes it reads.
SPLIT_K_MAX_M = 16
SPLIT_K_BLOCK_N = 64      # the few-token configs' usual BLOCK_N, to count tiles before autotuning
SPLIT_K_MAX = 8
SPLIT_K_MIN_K = 256
