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
