"""block_sparse_attention: softmax attention restricted to the active blocks of a ``BlockLayout``.

Math (the reference below is the specification), per batch b and head h, with LB = layout.block_size:
    allowed[i, j] = layout.mask[h or 0, i // LB, j // LB] and key_padding_mask[b, j]
    s[i, j]  = scale * (q[i] . k[j])                       where allowed, -inf elsewhere
    lse[i]   = log sum_j exp(s[i, j])
    out[i]   = sum_j exp(s[i, j] - lse[i]) v[j]
A query row that sees no key at all (its blocks' keys all padded, or an empty layout row) has lse = -inf,
outputs zeros and gets zero gradients, as does every key that no query sees.

Shapes: q, k, v [batch, heads, seq, head_dim], one shape (self-attention: seq_q == seq_k), float16 /
bfloat16 / float32, head_dim 32, 64 or 128, any strides (the triton backend needs a unit stride along
head_dim). ``layout``: ``qbert.sparse.BlockLayout`` with ``heads`` 1 (broadcast over every head) or
``heads``, and ``ceil(seq / block_size)`` query and key blocks (the last block may be partial).
``key_padding_mask``: bool [batch, seq], True = a real key that may be attended (Hugging Face's
attention_mask), or None. ``scale``: float, default ``head_dim ** -0.5``. -> out [batch, heads, seq,
head_dim] in q's dtype (contiguous).

The custom ops (``torch.ops.qbert.*``) take the layout as CSR tensors (``layout.csr`` and
``layout.csr_transposed``, see qbert/sparse/csr.py):
    block_sparse_attention(q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_size,
                           key_padding_mask, scale) -> (out, lse float32 [batch, heads, seq])
    block_sparse_attention_backward(grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices,
                                    q_counts, q_indices, block_size, key_padding_mask, scale)
                                    -> (dq, dk, dv)
The forward only rides the transposed CSR (q_counts, q_indices) along so that its autograd formula can
hand it to the backward, which walks it for dK and dV. Both dispatch through the registry. Both check
the CSR's values before any kernel reads them (a kernel indexes with them): every count in
[0, blocks], every row of indices a permutation of [0, blocks) (qbert/sparse/csr.py's form), and the
transposed CSR the transpose of the layout. That check reads the values (one wait for the GPU per call),
so it is skipped inside a CUDA graph capture, whose eager warm-up has checked the same cached layout.
"""

from __future__ import annotations

import math

import torch

from qbert.ops import _checks
from qbert.ops._registry import Row, op
from qbert.sparse.csr import from_csr
from qbert.sparse.layout import BLOCK_SIZES, BlockLayout

_INT32_MAX = 2**31 - 1
_CUDA_GRID_Y_MAX = 65535  # the kernels launch one program per (batch, head) along the grid's y axis

NAME = "block_sparse_attention"
BACKWARD_NAME = "block_sparse_attention_backward"
HEAD_DIMS = (32, 64, 128)


# ---- checks -------------------------------------------------------------------------------------------

def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_csr(op_name: str, kind: str, counts: torch.Tensor, indices: torch.Tensor, heads: int,
               blocks: int) -> None:
    _checks.check_dtype(op_name, f"{kind}_counts", counts, torch.int32)
    _checks.check_dtype(op_name, f"{kind}_indices", indices, torch.int32)
    layout_heads = counts.shape[0] if counts.dim() == 2 else -1
    if layout_heads not in (1, heads) or counts.shape != (layout_heads, blocks) or \
            indices.shape != (layout_heads, blocks, blocks):
        raise ValueError(f"{op_name}: {kind}_counts must be [layout heads (1 or {heads}), blocks={blocks}] and "
                         f"{kind}_indices [layout heads, {blocks}, {blocks}] (blocks = ceil(seq / block_size)), "
                         f"got {list(counts.shape)} and {list(indices.shape)}")
    _checks.check_contiguous(op_name, **{f"{kind}_counts": counts, f"{kind}_indices": indices})


def _csr_problem(kind: str, counts: torch.Tensor, indices: torch.Tensor, blocks: int) -> str | None:
    """What is wrong with the values of one CSR pair (None if nothing): the first offending row."""
    bad_count = (counts < 0) | (counts > blocks)                                     # [LH, NB]
    if bad_count.any():
        head, row = (int(i) for i in bad_count.nonzero()[0])
        return (f"{kind}_counts[{head}, {row}] = {int(counts[head, row])} is outside [0, blocks={blocks}]")
    expected = torch.arange(blocks, device=indices.device, dtype=indices.dtype)
    not_permutation = (indices.sort(dim=-1).values != expected).any(-1)             # [LH, NB]
    if not_permutation.any():
        head, row = (int(i) for i in not_permutation.nonzero()[0])
        return (f"{kind}_indices[{head}, {row}] = {indices[head, row].tolist()} is not a permutation of "
                f"[0, blocks={blocks}) (the active blocks first, then the others)")
    return None


def check_csr_values(op_name: str, kv_counts, kv_indices, q_counts, q_indices, blocks: int) -> None:
    """The CSR values the kernels index with (see the module docstring). One wait for the device when
    they are valid; the first problem is named when they are not."""
    if not _checks.values_readable(kv_counts, kv_indices, q_counts, q_indices):
        return
    expected = torch.arange(blocks, device=kv_indices.device, dtype=kv_indices.dtype)
    checks = [((counts >= 0) & (counts <= blocks)).all() & (indices.sort(dim=-1).values == expected).all()
              for counts, indices in ((kv_counts, kv_indices), (q_counts, q_indices))]
    # from_csr scatters by the indices: clamped, it stays in bounds before they are known to be valid.
    kv_mask = from_csr(kv_counts.clamp(0, blocks), kv_indices.clamp(0, blocks - 1))
    q_mask = from_csr(q_counts.clamp(0, blocks), q_indices.clamp(0, blocks - 1))
    checks.append((q_mask == kv_mask.transpose(-1, -2)).all())
    if bool(torch.stack(checks).all()):
        return
    for kind, counts, indices in (("kv", kv_counts, kv_indices), ("q", q_counts, q_indices)):
        problem = _csr_problem(kind, counts, indices, blocks)
        if problem is not None:
            raise ValueError(f"{op_name}: {problem}")
    raise ValueError(f"{op_name}: q_counts / q_indices must be the transpose of the layout kv_counts / kv_indices "
                     "describe (layout.csr_transposed of the same layout)")


def _check(q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_size, key_padding_mask, scale,
           op_name: str = NAME) -> None:
    _checks.check_dtype(op_name, "q", q, *_checks.FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op_name}: {name} must have q's dtype {_name(q.dtype)}, got {_name(t.dtype)}")
    _checks.check_ndim(op_name, "q", q, ndim=4)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{op_name}: q, k and v must share one shape [batch, heads, seq, head_dim] "
                         f"(self-attention, seq_q == seq_k), got q {list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)}")
    batch, heads, seq, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{op_name}: head_dim must be one of {HEAD_DIMS}, got {head_dim} "
                         f"(q is {_checks.shape_str(q, 'BHSD')})")
    if seq == 0 or heads == 0:
        raise ValueError(f"{op_name}: seq and heads must be at least 1, got q {_checks.shape_str(q, 'BHSD')}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{op_name}: block_size must be one of {BLOCK_SIZES}, got {block_size}")
    blocks = math.ceil(seq / block_size)
    _check_csr(op_name, "kv", kv_counts, kv_indices, heads, blocks)
    _check_csr(op_name, "q", q_counts, q_indices, heads, blocks)
    if q_counts.shape != kv_counts.shape:
        raise ValueError(f"{op_name}: the layout and its transpose must have one head count, got kv_counts "
                         f"{list(kv_counts.shape)} and q_counts {list(q_counts.shape)}")
    if key_padding_mask is not None:
        _checks.check_dtype(op_name, "key_padding_mask", key_padding_mask, torch.bool)
        if key_padding_mask.shape != (batch, seq):
            raise ValueError(f"{op_name}: key_padding_mask must be [batch={batch}, seq={seq}] "
                             f"(True = a real key), got {list(key_padding_mask.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"{op_name}: scale must be finite, got {scale}")
    _checks.check_same_device(op_name, q=q, k=k, v=v, kv_counts=kv_counts, kv_indices=kv_indices,
                              q_counts=q_counts, q_indices=q_indices, key_padding_mask=key_padding_mask)


def _check_backward(grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices,
                    block_size, key_padding_mask, scale) -> None:
    _check(q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_size, key_padding_mask, scale,
           BACKWARD_NAME)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.dtype != q.dtype or t.shape != q.shape:
            raise ValueError(f"{BACKWARD_NAME}: {name} must be {_name(q.dtype)} {list(q.shape)} like q, "
                             f"got {_name(t.dtype)} {list(t.shape)}")
    for name, t in (("lse", lse), ("grad_lse", grad_lse)):
        if t is not None and (t.dtype != torch.float32 or t.shape != q.shape[:3]):
            raise ValueError(f"{BACKWARD_NAME}: {name} must be float32 {list(q.shape[:3])} "
                             f"[batch, heads, seq], got {_name(t.dtype)} {list(t.shape)}")
    _checks.check_same_device(BACKWARD_NAME, q=q, grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse)


# ---- the custom ops -----------------------------------------------------------------------------------

@torch.library.custom_op("qbert::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor,
                              kv_indices: torch.Tensor, q_counts: torch.Tensor, q_indices: torch.Tensor,
                              block_size: int, key_padding_mask: torch.Tensor | None,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on a CSR layout: ``(out [B, H, S, D], lse float32 [B, H, S])``."""
    _check(q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_size, key_padding_mask, scale)
    check_csr_values(NAME, kv_counts, kv_indices, q_counts, q_indices, kv_counts.shape[1])
    return _OP(q, k, v, kv_counts, kv_indices, block_size, key_padding_mask, scale)


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_size, key_padding_mask, scale):
    _check(q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_size, key_padding_mask, scale)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("qbert::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward_op(
        grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kv_counts: torch.Tensor,
        kv_indices: torch.Tensor, q_counts: torch.Tensor, q_indices: torch.Tensor, block_size: int,
        key_padding_mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of block_sparse_attention given those of its outputs (out, lse)."""
    args = (grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices, block_size,
            key_padding_mask, scale)
    _check_backward(*args)
    check_csr_values(BACKWARD_NAME, kv_counts, kv_indices, q_counts, q_indices, kv_counts.shape[1])
    return _BACKWARD_OP(*args)


@block_sparse_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices, block_size,
      key_padding_mask, scale):
    _check_backward(grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices,
                    block_size, key_padding_mask, scale)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_size, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices, key_padding_mask)
    ctx.block_size, ctx.scale = block_size, scale
    # An unused output's gradient arrives as None rather than a materialized zero tensor: callers of the
    # public function never use lse, and the backward then skips reading it.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices, key_padding_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.qbert.block_sparse_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices, ctx.block_size,
        key_padding_mask, ctx.scale)
    # One gradient per forward input: none for the layout, block size, mask and scale.
    return dq, dk, dv, None, None, None, None, None, None, None


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the public function ------------------------------------------------------------------------------

def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           key_padding_mask: torch.Tensor | None = None,
                           scale: float | None = None) -> torch.Tensor:
    """Block-sparse softmax attention, differentiable in q, k and v.

    ``out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, j]) v[b, h, j]``, the softmax taken
    only over the keys j with ``layout.mask[h or 0, i // block_size, j // block_size]`` and
    ``key_padding_mask[b, j]``; a row with no such key outputs zeros (and gets zero gradients).

    q, k, v: [batch, heads, seq, head_dim], one shape and dtype (float16 / bfloat16 / float32), head_dim
    32, 64 or 128, on one device. layout: ``BlockLayout`` with 1 or ``heads`` heads and
    ``ceil(seq / block_size)`` blocks per side. key_padding_mask: bool [batch, seq], True = a real key,
    or None. scale: default ``head_dim ** -0.5``. Returns [batch, heads, seq, head_dim] in q's dtype.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"{NAME}: layout must be a qbert.sparse.BlockLayout, got {type(layout).__name__}")
    _checks.check_ndim(NAME, "q", q, ndim=4)
    heads, seq = q.shape[1], q.shape[2]
    if layout.heads not in (1, heads):
        raise ValueError(f"{NAME}: the layout has {layout.heads} heads; it must have 1 (shared by every head) "
                         f"or q's {heads}")
    blocks = math.ceil(seq / layout.block_size)
    if (layout.q_blocks, layout.kv_blocks) != (blocks, blocks):
        raise ValueError(f"{NAME}: seq={seq} at block_size={layout.block_size} needs {blocks}x{blocks} blocks, "
                         f"the layout has {layout.q_blocks}x{layout.kv_blocks}")
    kv_counts, kv_indices = layout.csr(q.device)
    q_counts, q_indices = layout.csr_transposed(q.device)
    out, _ = block_sparse_attention_op(q, k, v, kv_counts, kv_indices, q_counts, q_indices, layout.block_size,
                                       key_padding_mask, q.shape[-1] ** -0.5 if scale is None else float(scale))
    return out


# ---- reference ----------------------------------------------------------------------------------------

def token_mask(kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_size: int, seq: int,
               key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """bool [batch or 1, layout heads, seq, seq]: query i may attend key j (the layout's blocks expanded
    to tokens, and the key padding mask)."""
    block_of = torch.arange(seq, device=kv_counts.device) // block_size
    allowed = from_csr(kv_counts, kv_indices)[:, block_of][:, :, block_of][None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in q's dtype: ``(out, lse)``; rows with no allowed key give zeros and -inf.

    ``allowed`` broadcasts against the scores [B, H, S, S]. Differentiable without NaNs: the rows that see
    no key are given finite stand-in scores and masked out after the softmax.
    """
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    seen = allowed.any(-1, keepdim=True).expand(scores.shape[:-1] + (1,))
    scores = scores.masked_fill(~seen, 0.0)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    p = torch.exp(scores - lse).masked_fill(~seen, 0.0)
    return p @ v, lse.masked_fill(~seen, float("-inf")).squeeze(-1)


def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


def block_sparse_attention_reference(q, k, v, kv_counts, kv_indices, block_size, key_padding_mask, scale):
    allowed = token_mask(kv_counts, kv_indices, block_size, q.shape[2], key_padding_mask)
    out, lse = attention_reference(*_float32(q, k, v), allowed, scale)
    return out.to(q.dtype), lse


def block_sparse_attention_backward_reference(grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices,
                                              q_counts, q_indices, block_size, key_padding_mask, scale):
    """The softmax backward written out in float32 from the recomputed probabilities p:
    dv = p^T dout; ds = p * (dout v^T - rowsum(p * dout v^T) + dlse); dq = scale ds k; dk = scale ds^T q.
    (``out``, ``lse`` and the transposed CSR are recomputed rather than read.)"""
    allowed = token_mask(kv_counts, kv_indices, block_size, q.shape[2], key_padding_mask)
    qf, kf, vf, dout = _float32(q, k, v, grad_out)
    scores = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    _, lse_f = attention_reference(qf, kf, vf, allowed, scale)
    # Rows that see no key have lse = -inf; +inf there makes their p (and so their gradients) zero.
    p = torch.exp(scores - lse_f.masked_fill(lse_f == float("-inf"), float("inf"))[..., None])
    dp = dout @ vf.transpose(-1, -2)
    delta = (p * dp).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse[..., None]
    ds = p * (dp - delta)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    dv = p.transpose(-1, -2) @ dout
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


# ---- backend rows -------------------------------------------------------------------------------------

def _int32_reasons(q, k, v, key_padding_mask, kv_indices) -> list[str]:
    """The triton kernels' int32 offsets: a token row's offset within one (batch, head) slice (a tile
    reaches at most one layout block past seq), the CSR's flat offsets, and the (batch, head) grid axis."""
    reasons = []
    batch, heads, seq, _ = q.shape
    rows = seq + max(BLOCK_SIZES)
    strided = [(name, t.stride(2)) for name, t in (("q", q), ("k", k), ("v", v))]
    if key_padding_mask is not None:
        strided.append(("key_padding_mask", key_padding_mask.stride(1)))
    for name, stride in strided:
        if rows * stride > _INT32_MAX:
            reasons.append(f"{name}'s tokens are {stride} elements apart: offsets up to {rows} * {stride} within "
                           "one (batch, head) overflow the kernels' int32 arithmetic")
    if kv_indices.numel() > _INT32_MAX:
        reasons.append(f"the CSR indices hold {kv_indices.numel()} entries: their offsets overflow int32")
    if batch * heads > _CUDA_GRID_Y_MAX:
        reasons.append(f"batch * heads = {batch * heads} programs exceed the CUDA grid's {_CUDA_GRID_Y_MAX} along y")
    return reasons


def _stride_reasons(q, k, v) -> list[str]:
    strided = [name for name, t in (("q", q), ("k", k), ("v", v)) if t.stride(-1) != 1]
    if not strided:
        return []
    return [(f"the triton kernels need a unit stride along head_dim ({', '.join(strided)} "
             f"{'has' if len(strided) == 1 else 'have'} another; .contiguous() gives one)")]


def _triton(q, k, v, kv_counts, kv_indices, block_size, key_padding_mask, scale):
    from qbert.kernels.block_sparse_attention import block_sparse_attention_triton

    return block_sparse_attention_triton(q, k, v, kv_counts, kv_indices, block_size, key_padding_mask, scale)


def _triton_limits(q, k, v, kv_counts, kv_indices, block_size, key_padding_mask, scale) -> list[str]:
    return _stride_reasons(q, k, v) + _int32_reasons(q, k, v, key_padding_mask, kv_indices)


def _triton_backward(*args):
    from qbert.kernels.block_sparse_attention import block_sparse_attention_backward_triton

    return block_sparse_attention_backward_triton(*args)


def _triton_backward_limits(grad_out, grad_lse, q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices,
                            block_size, key_padding_mask, scale) -> list[str]:
    return _stride_reasons(q, k, v) + _int32_reasons(q, k, v, key_padding_mask, kv_indices)


# The backward's first tensor, grad_out, has q's dtype (checked): bf16_dot refuses the same inputs.
_OP = op(NAME, reference=block_sparse_attention_reference,
         triton=Row(_triton, bf16_dot=True, limits=_triton_limits))
_BACKWARD_OP = op(BACKWARD_NAME, reference=block_sparse_attention_backward_reference,
                  triton=Row(_triton_backward, bf16_dot=True, limits=_triton_backward_limits))
