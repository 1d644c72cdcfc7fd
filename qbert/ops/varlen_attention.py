"""varlen_attention: softmax attention within each of several sequences packed row by row (no padding).

Math (the reference below is the specification): sequence b owns the L_b consecutive rows
[start_b, start_b + L_b) of q, k and v (start_b = L_0 + ... + L_{b-1}); for each sequence and head h
(columns [h d, (h + 1) d), d = A / heads)
    out[rows_b, cols_h] = softmax(scaling * q[rows_b, cols_h] k[rows_b, cols_h]^T) v[rows_b, cols_h]
which is torch's ``scaled_dot_product_attention`` of that sequence alone, with no mask: each query
attends to exactly the keys of its own sequence. This is how an unpadded encoder batch (``qbert.nn.unpad``)
attends, and a padded batch with no mask is the case of equal lengths.
Shapes: q, k, v float32 [T, A], contiguous, A divisible by ``heads``; lengths int64 [B], non-negative,
summing to T (a length may be 0) -> out float32 [T, A]. All on the CPU.

The cpu backend (csrc/cpu/varlen_attention.cpp) computes it in float32 with AVX-512 FMA (scores,
softmax, context per block of queries, a head's keys packed once) on CPUs with AVX-512 and a head size
that is a multiple of 16, and through torch's scaled_dot_product_attention per sequence otherwise: the
same math as the reference, in another summation order (the same-math tier, not bitwise).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from qbert.ops import _checks
from qbert.ops._registry import Row, op

NAME = "varlen_attention"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, heads: int,
           values: bool = True) -> None:
    """Shapes, dtypes, devices, and with ``values`` the lengths themselves (not in the fake: it has none)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_dtype(NAME, name, t, torch.float32)
        _checks.check_ndim(NAME, name, t, ndim=2)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{NAME}: q, k and v must have one shape [T, A], got {list(q.shape)}, {list(k.shape)} "
                         f"and {list(v.shape)}")
    _checks.check_contiguous(NAME, q=q, k=k, v=v)
    _checks.check_dtype(NAME, "lengths", lengths, torch.int64)
    _checks.check_ndim(NAME, "lengths", lengths, ndim=1)
    if heads < 1 or q.shape[1] % heads:
        raise ValueError(f"{NAME}: heads must be positive and divide the width A={q.shape[1]}, got {heads}")
    _checks.check_same_device(NAME, q=q, k=k, v=v, lengths=lengths)
    if values:
        if bool((lengths < 0).any()):
            raise ValueError(f"{NAME}: lengths must be non-negative, got {lengths.tolist()}")
        if int(lengths.sum()) != q.shape[0]:
            raise ValueError(f"{NAME}: lengths must sum to the rows of q (T={q.shape[0]}), got "
                             f"{int(lengths.sum())}")


@torch.library.custom_op("qbert::varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, heads: int,
                     scaling: float) -> torch.Tensor:
    """Attention within each sequence of the packed rows of ``q``, ``k``, ``v`` [T, A] (``lengths`` [B]
    rows each), ``heads`` heads, scores scaled by ``scaling``; returns the context [T, A]."""
    _check(q, k, v, lengths, heads)
    return _OP(q, k, v, lengths, heads, scaling)


@varlen_attention.register_fake
def _(q, k, v, lengths, heads, scaling):
    _check(q, k, v, lengths, heads, values=False)
    return torch.empty_like(q)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                               heads: int, scaling: float) -> torch.Tensor:
    """The specification: torch's scaled_dot_product_attention on each sequence's rows alone."""
    out = torch.empty_like(q)
    sizes = lengths.tolist()
    for start, length in zip(itertools.accumulate([0, *sizes]), sizes):
        if length:
            q_b, k_b, v_b, out_b = (t[start:start + length].view(1, length, heads, -1).transpose(1, 2)
                                    for t in (q, k, v, out))  # [1, heads, L, d] views
            out_b.copy_(F.scaled_dot_product_attention(q_b, k_b, v_b, dropout_p=0.0, scale=scaling))
    return out


_OP = op(NAME, reference=varlen_attention_reference,
         cpu=Row(kernel="varlen_attention_cpu"))
