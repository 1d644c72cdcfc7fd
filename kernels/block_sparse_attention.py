"""Triton block-sparse attention: forward with online softmax over the active key blocks, and backward.

Math (qbert/ops/block_sparse_attention.py holds the reference, the specification), per batch b, head h:
    allowed[i, j] = layout[h, i // LB, j // LB] and key_padding_mask[b, j]     (LB = layout block size)
    s[i, j]   = scale * q[i] . k[j]                        where allowed, else -inf
    lse[i]    = log sum_j exp(s[i, j])                     (-inf for a row that sees no key)
    p[i, j]   = exp(s[i, j] - lse[i])                      (0 for a row that sees no key)
    out[i]    = sum_j p[i, j] v[j]                         (zeros for a row that sees no key)
Backward (flash-attention 2), with dlse the gradient of lse (zero unless a caller uses lse):
    delta[i]  = sum_d dout[i, d] out[i, d] - dlse[i]
    dv[j]     = sum_i p[i, j] dout[i]
    ds[i, j]  = p[i, j] (dout[i] . v[j] - delta[i])
    dq[i]     = scale sum_j ds[i, j] k[j]          dk[j] = scale sum_i ds[i, j] q[i]

Tensors: q, k, v [B, H, S, D] (any strides with a unit stride along D), float16 / bfloat16 / float32;
out, dq, dk, dv contiguous [B, H, S, D] in q's dtype; lse, delta contiguous float32 [B, H, S].
The layout arrives in CSR form (qbert/sparse/csr.py): counts int32 [LH, NB], indices int32 [LH, NB, NB]
(contiguous, NB = ceil(S / LB), LH = H or 1 for one layout shared by every head). The forward and dQ
walk the CSR of the layout (per query block, its key blocks); dK/dV walk the CSR of the transposed layout
(per key block, the query blocks that see it). Each output tile is written by exactly one program: no
atomics, and the result does not depend on scheduling.

Scores are kept in base 2 (scale * log2(e) folded into one multiplier, exp2 instead of exp), the usual
flash-attention trick: exp2 is one MUFU instruction, exp is exp2 plus a multiply.
All accumulation is in float32; p and ds are rounded to the input dtype before their tensor-core dots,
as flash-attention does. Kernels stay valid on triton 3.6 through 3.9 (plain pointer arithmetic, no
``make_block_ptr``, no libdevice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


# ---- tile configs -------------------------------------------------------------------------------------
# A program owns a tile of BLOCK_M query rows (forward, dQ) or BLOCK_N key rows (dK/dV) and walks the
# active blocks of its layout row in steps of the other tile size. Both divide the layout block size LB,
# so a tile never straddles two layout blocks and one CSR row serves the whole program; a layout block
# larger than the tile is walked in LB // tile sub-steps. Why these sizes:
#   * LB = 16 / 32: the tile is the whole block (it cannot be larger: the next block belongs to another
#     CSR row). 16 rows per warp is one m16 mma.sync row of tiles, hence 1 warp for 16 and 2 for 32 in the
#     forward; wgmma needs 64 rows per warpgroup, so these blocks run mma.sync on sm_90 too.
#   * LB = 64 and 128, forward: 64 / 128 query rows with 64-key steps (flash-attention's forward shape on
#     H100), on 8 warps: at head_dim 128 the float32 accumulator, Q and the score tile need more than the
#     255 registers a thread of 4 warps has on sm_80 (ptxas spills), while 8 warps fit on both archs. The
#     two 64-key steps per block of 128 give the pipeline (3 stages of K and V) work to overlap.
#   * backward: a program holds float32 accumulators of its own tile (dK and dV, or dQ) next to two to four
#     input tiles, about twice the forward's live state: twice the forward's warps at LB <= 32, 2 stages,
#     and 64-row tiles for LB >= 64 (flash-attention 2's backward also stays at 64-row tiles on A100 for
#     head_dim 128). dK/dV keeps two accumulators and K, V: 8 warps, or it spills at head_dim 128 on sm_80.
#     dQ walks keys in 32-row steps on 4 warps (the Triton tutorial's dQ shape): 64-key steps spill on
#     sm_80 with 4 warps at head_dim 128, and with 8 warps at head_dim 64.
#   * float32 tiles take twice the bytes of f16 per stage: the forward's 3 stages of 64-row K and V tiles
#     at head_dim 128 would need 176 KiB (LB = 64) and 225 KiB (LB = 128), over sm_80's 163 KiB, so float32
#     runs 2 stages there (160 KiB at LB = 128). float32 is the IEEE FMA path, bound by arithmetic rather
#     than by loads, so the shallower pipeline costs it little.
# tests/kernels/test_block_sparse_aot.py compiles every config for sm_80 and sm_90 with every head_dim and
# checks the tensor-core instructions, the shared memory (163 KiB on sm_80 is the binding limit) and that
# ptxas spills no register for f16 / bf16.

@dataclass(frozen=True)
class TileConfig:
    kernel: str        # "fwd", "bwd_dkdv" or "bwd_dq"
    layout_block: int  # LB: the layout block size this config serves
    block_m: int       # query rows per tile
    block_n: int       # key rows per tile
    num_warps: int
    num_stages: int    # for float16 / bfloat16
    fp32_stages: int   # for float32

    def stages(self, dtype: torch.dtype) -> int:
        return self.fp32_stages if dtype == torch.float32 else self.num_stages


CONFIGS: tuple[TileConfig, ...] = (
    TileConfig("fwd", 16, 16, 16, 1, 3, 3),
    TileConfig("fwd", 32, 32, 32, 2, 3, 3),
    TileConfig("fwd", 64, 64, 64, 8, 3, 2),
    TileConfig("fwd", 128, 128, 64, 8, 3, 2),
    TileConfig("bwd_dkdv", 16, 16, 16, 2, 2, 2),
    TileConfig("bwd_dkdv", 32, 32, 32, 4, 2, 2),
    TileConfig("bwd_dkdv", 64, 64, 64, 8, 2, 2),
    TileConfig("bwd_dkdv", 128, 64, 64, 8, 2, 2),
    TileConfig("bwd_dq", 16, 16, 16, 2, 2, 2),
    TileConfig("bwd_dq", 32, 32, 32, 4, 2, 2),
    TileConfig("bwd_dq", 64, 64, 32, 4, 2, 2),
    TileConfig("bwd_dq", 128, 64, 32, 4, 2, 2),
)

# The delta preprocess is a row reduction over [rows, D]: 64 rows per program is 8 KiB of fp16 per input.
PREPROCESS_ROWS = 64
PREPROCESS_WARPS = 4


def config_for(kernel: str, layout_block: int) -> TileConfig:
    """The one config of ``kernel`` for layout blocks of ``layout_block`` tokens."""
    for config in CONFIGS:
        if config.kernel == kernel and config.layout_block == layout_block:
            return config
    raise ValueError(f"block_sparse_attention: no {kernel} tile config for layout block size {layout_block}")


# ---- kernels ------------------------------------------------------------------------------------------

@triton.jit
def _key_ok(kpm_ptr, offs_n, S, stride_kpm_s, EVEN_S: tl.constexpr, HAS_KPM: tl.constexpr):
    """[BLOCK_N] bool: key offs_n exists (offs_n < S) and, with a padding mask, is a real key.
    ``kpm_ptr`` already points at this batch's row of the mask."""
    if EVEN_S:
        ok = offs_n >= 0  # all True: S is a multiple of the layout block, no key is past the end
    else:
        ok = offs_n < S
    if HAS_KPM:
        real = tl.load(kpm_ptr + offs_n * stride_kpm_s, mask=ok, other=0)
        ok = ok & (real != 0)
    return ok


@triton.jit
def _lse_base2(lse_ptr, offs_m, S):
    """[BLOCK_M] lse * log2(e) of rows offs_m, with +inf for rows past S and rows that see no key
    (lse = -inf): exp2(s - inf) = 0 then gives those rows p = 0 and so zero gradients."""
    lse = tl.load(lse_ptr + offs_m, mask=offs_m < S, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _block_sparse_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,       # q, k, v [B, H, S, D]; out [B, H, S, D]; lse [B, H, S] f32
    counts_ptr, indices_ptr,                     # CSR: [LH, NB] i32, [LH, NB, NB] i32
    kpm_ptr,                                     # key padding mask [B, S] u8 (1 = real key), if HAS_KPM
    scale_log2,                                  # softmax scale * log2(e)
    H, S, NB,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_kpm_b, stride_kpm_s,
    HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr,               # False: one layout (LH = 1) for every head
    HAS_KPM: tl.constexpr, EVEN_S: tl.constexpr,  # EVEN_S: S % LAYOUT_BLOCK == 0, no ragged last block
    DOT_PRECISION: tl.constexpr,                 # "ieee" for float32 (torch's f32 matmul), else "tf32"
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    lh = h if LAYOUT_PER_HEAD else 0
    q_block = (pid_m * BLOCK_M) // LAYOUT_BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                          # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM)                                           # [D]
    row_ok = offs_m < S
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    kpm_ptr += b * stride_kpm_b
    q = tl.load(q_ptr + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)                     # running max (base 2)
    l_i = tl.zeros((BLOCK_M,), tl.float32)                                   # running sum of exp2
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    csr_row = lh * NB + q_block
    count = tl.load(counts_ptr + csr_row)
    SUB: tl.constexpr = LAYOUT_BLOCK // BLOCK_N                               # steps per layout block
    # One flat loop over (active block, sub-step) so the software pipeliner sees a single loop.
    for step in range(count * SUB):
        kv_block = tl.load(indices_ptr + csr_row * NB + step // SUB)
        offs_n = kv_block * LAYOUT_BLOCK + (step % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)   # [BLOCK_N]
        key_ok = _key_ok(kpm_ptr, offs_n, S, stride_kpm_s, EVEN_S, HAS_KPM)
        kt = tl.load(k_ptr + offs_n[None, :] * stride_ks + offs_d[:, None],
                     mask=(offs_n < S)[None, :], other=0.0)                  # [D, BLOCK_N]
        v = tl.load(v_ptr + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=(offs_n < S)[:, None], other=0.0)                   # [BLOCK_N, D]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=tl.float32) * scale_log2  # [BM, BN]
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far are all masked keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - m) = 0 rather than NaN, and its l and acc stay 0.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)                                    # rescales the old sums
        p = tl.math.exp2(s - m_sub[:, None])                                 # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION,
                                            out_dtype=tl.float32)
        m_i = m_new

    seen = l_i > 0.0                                                         # the row saw a key
    out = acc / tl.where(seen, l_i, 1.0)[:, None]                            # rows without keys: 0
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    rows = pid_bh.to(tl.int64) * S + offs_m                                  # contiguous out and lse
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _block_sparse_attention_bwd_preprocess_kernel(
    out_ptr, dout_ptr, dlse_ptr, delta_ptr,      # out, dout contiguous [B*H*S, D]; dlse, delta f32 [B*H*S]
    ROWS, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_r < ROWS
    ptrs = offs_r[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(out_ptr + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + offs_r, mask=ok, other=0.0)
    tl.store(delta_ptr + offs_r, delta, mask=ok)


@triton.jit
def _block_sparse_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr,  # dout contiguous [B, H, S, D]; lse, delta [B, H, S]
    dk_ptr, dv_ptr,                                     # contiguous [B, H, S, D]
    counts_ptr, indices_ptr,                            # CSR of the TRANSPOSED layout: per key block
    kpm_ptr, scale_log2, scale,
    H, S, NB,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_kpm_b, stride_kpm_s,
    HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr, HAS_KPM: tl.constexpr, EVEN_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    lh = h if LAYOUT_PER_HEAD else 0
    kv_block = (pid_n * BLOCK_N) // LAYOUT_BLOCK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BLOCK_N]
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < S
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    rows0 = pid_bh.to(tl.int64) * S                                           # contiguous [B, H, S, ...]
    dout_ptr += rows0 * HEAD_DIM
    lse_ptr += rows0
    delta_ptr += rows0
    key_ok = _key_ok(kpm_ptr + b * stride_kpm_b, offs_n, S, stride_kpm_s, EVEN_S, HAS_KPM)
    k = tl.load(k_ptr + offs_n[:, None] * stride_ks + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)

    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    csr_row = lh * NB + kv_block
    count = tl.load(counts_ptr + csr_row)
    SUB: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    for step in range(count * SUB):
        q_block = tl.load(indices_ptr + csr_row * NB + step // SUB)
        offs_m = q_block * LAYOUT_BLOCK + (step % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)   # [BLOCK_M]
        row_ok = offs_m < S
        qt = tl.load(q_ptr + offs_m[None, :] * stride_qs + offs_d[:, None],
                     mask=row_ok[None, :], other=0.0)                        # [D, BLOCK_M]
        do = tl.load(dout_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)                        # [BLOCK_M, D]
        lse2 = _lse_base2(lse_ptr, offs_m, S)                                # [BLOCK_M]
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)          # [BLOCK_M]
        st = tl.dot(k, qt, input_precision=DOT_PRECISION, out_dtype=tl.float32) * scale_log2   # [BN, BM]
        pt = tl.where(key_ok[:, None], tl.math.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=tl.float32)     # [BN, BM]
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION, out_dtype=tl.float32)

    ptrs = (rows0 + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + ptrs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + ptrs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _block_sparse_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr,
    dq_ptr,                                             # contiguous [B, H, S, D]
    counts_ptr, indices_ptr,                            # CSR of the layout: per query block
    kpm_ptr, scale_log2, scale,
    H, S, NB,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_kpm_b, stride_kpm_s,
    HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr, HAS_KPM: tl.constexpr, EVEN_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    lh = h if LAYOUT_PER_HEAD else 0
    q_block = (pid_m * BLOCK_M) // LAYOUT_BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    kpm_ptr += b * stride_kpm_b
    rows0 = pid_bh.to(tl.int64) * S
    q = tl.load(q_ptr + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(dout_ptr + (rows0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)                            # [BLOCK_M, D]
    lse2 = _lse_base2(lse_ptr + rows0, offs_m, S)
    delta = tl.load(delta_ptr + rows0 + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    csr_row = lh * NB + q_block
    count = tl.load(counts_ptr + csr_row)
    SUB: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for step in range(count * SUB):
        kv_block = tl.load(indices_ptr + csr_row * NB + step // SUB)
        offs_n = kv_block * LAYOUT_BLOCK + (step % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = _key_ok(kpm_ptr, offs_n, S, stride_kpm_s, EVEN_S, HAS_KPM)
        kt = tl.load(k_ptr + offs_n[None, :] * stride_ks + offs_d[:, None],
                     mask=(offs_n < S)[None, :], other=0.0)                  # [D, BLOCK_N]
        vt = tl.load(v_ptr + offs_n[None, :] * stride_vs + offs_d[:, None],
                     mask=(offs_n < S)[None, :], other=0.0)                  # [D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=tl.float32) * scale_log2    # [BM, BN]
        p = tl.where(key_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION, out_dtype=tl.float32)

    tl.store(dq_ptr + (rows0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---- launchers ----------------------------------------------------------------------------------------

def _check_inner_stride(name: str, **tensors: torch.Tensor) -> None:
    """The kernels index rows with strides and need a unit stride along head_dim (the op checks it)."""
    for arg, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: {arg} needs a unit stride along head_dim, got strides {list(t.stride())}")


def _common_args(q, k, v, key_padding_mask):
    """Strides of q, k, v and the padding mask (as uint8, same strides) shared by the three kernels."""
    kpm = q if key_padding_mask is None else key_padding_mask.view(torch.uint8)   # q: never read
    kpm_strides = (0, 0) if key_padding_mask is None else kpm.stride()
    return kpm, (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *kpm_strides)


def _constexprs(q, counts, block_size, key_padding_mask, config: TileConfig) -> dict:
    seq = q.shape[2]
    return {"HEAD_DIM": q.shape[3], "LAYOUT_BLOCK": block_size, "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n, "LAYOUT_PER_HEAD": counts.shape[0] > 1,
            "HAS_KPM": key_padding_mask is not None, "EVEN_S": seq % block_size == 0,
            "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
            "num_warps": config.num_warps, "num_stages": config.stages(q.dtype)}


def block_sparse_attention_triton(q, k, v, kv_counts, kv_indices, block_size, key_padding_mask, scale):
    """Forward: ``(out [B, H, S, D] in q.dtype, lse float32 [B, H, S])``; arguments as the op checks them."""
    _check_inner_stride("block_sparse_attention_triton", q=q, k=k, v=v)
    batch, heads, seq, head_dim = q.shape
    out = torch.empty((batch, heads, seq, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    config = config_for("fwd", block_size)
    kpm, strides = _common_args(q, k, v, key_padding_mask)
    grid = (triton.cdiv(seq, config.block_m), batch * heads)
    _block_sparse_attention_fwd_kernel[grid](
        q, k, v, out, lse, kv_counts, kv_indices, kpm, scale * math.log2(math.e),
        heads, seq, kv_counts.shape[1], *strides,
        **_constexprs(q, kv_counts, block_size, key_padding_mask, config))
    return out, lse


def block_sparse_attention_backward_triton(grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices,
                                           q_counts, q_indices, block_size, key_padding_mask, scale):
    """Backward: ``(dq, dk, dv)``, contiguous [B, H, S, D] in q.dtype.

    ``grad_out`` and ``out`` are read contiguous: autograd hands gradients in whatever layout the consumer
    produced (the expanded zero-stride tensor of ``out.sum()``, say), so they are copied when they are not.
    """
    _check_inner_stride("block_sparse_attention_backward_triton", q=q, k=k, v=v)
    batch, heads, seq, head_dim = q.shape
    grad_out, out = grad_out.contiguous(), out.contiguous()
    dq, dk, dv = (torch.empty((batch, heads, seq, head_dim), dtype=q.dtype, device=q.device) for _ in range(3))
    if batch == 0:
        return dq, dk, dv
    rows = batch * heads * seq
    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    _block_sparse_attention_bwd_preprocess_kernel[(triton.cdiv(rows, PREPROCESS_ROWS),)](
        out, grad_out, delta if grad_lse is None else grad_lse, delta, rows,
        HEAD_DIM=head_dim, BLOCK_ROWS=PREPROCESS_ROWS, HAS_DLSE=grad_lse is not None,
        num_warps=PREPROCESS_WARPS)

    kpm, strides = _common_args(q, k, v, key_padding_mask)
    scales = (scale * math.log2(math.e), scale)
    nb = kv_counts.shape[1]
    config = config_for("bwd_dkdv", block_size)
    _block_sparse_attention_bwd_dkdv_kernel[(triton.cdiv(seq, config.block_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, q_counts, q_indices, kpm, *scales, heads, seq, nb, *strides,
        **_constexprs(q, q_counts, block_size, key_padding_mask, config))
    config = config_for("bwd_dq", block_size)
    _block_sparse_attention_bwd_dq_kernel[(triton.cdiv(seq, config.block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, kv_counts, kv_indices, kpm, *scales, heads, seq, nb, *strides,
        **_constexprs(q, kv_counts, block_size, key_padding_mask, config))
    return dq, dk, dv
