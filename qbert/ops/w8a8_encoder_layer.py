"""w8a8_encoder_layer: one BERT-family encoder layer of the fused W8A8 chain (``qbert.nn.fused``) in one op.

Math (the reference below is the specification: qbert ops, and torch's scaled dot-product attention for a
padded batch with a mask, in this order):
    codes      = (x_q, x_scale), or quantize_per_token(x) when they are None
    q, k, v    = int8_linear(codes, W_q), int8_linear(codes, W_k), int8_linear(codes, W_v)   float32 [R, A]
    context    = unpadded (``indices``, R = T real tokens): varlen_attention(q, k, v, L), L_b the real
                   tokens of sequence b (its rows are consecutive, as the indices ascend)
                 padded (indices None, R = B * S) with no mask: varlen_attention(q, k, v, [S] * B)
                 padded with a mask: q, k, v -> [B, S, A] -> [B, heads, S, A / heads] ->
                   scaled_dot_product_attention(q, k, v, attention_mask, scale=scaling) -> [R, A]
    a, a_codes = add_layernorm_quantize(w8a8_linear(context, W_o), x, LN_1)
    h_codes    = int8_linear_requant(a_codes, W_1, activation="gelu")
    y, y_codes = add_layernorm_quantize(int8_linear(h_codes, W_2), a, LN_2)
    returns (y float32 [R, H], y_q int8 [R, H], y_scale float32 [R])
This is the layer ``FusedLayer`` runs op by op, there with Hugging Face's sdpa attention in eval mode (no
dropout) on the padded shape; A = heads * head size (the hidden size H unless heads were pruned). Unpadded, ``indices`` are
the real tokens' ascending positions in the flattened [B * S] of a batch whose mask is plain key padding
(``qbert.nn.unpad``): each real query attends to exactly the real keys of its sequence, so attention runs
on those alone and skips the pad positions; that is the padded attention's math, not its bits, where the
op-by-op chain scatters to the padded shape and runs the model's attention (sdpa). So is varlen_attention
on a padded batch with no mask: qbert's attention kernel, not torch's.
Shapes: x float32 [R, H]; x_q int8 [R, H] and x_scale float32 [R], or both None; params: the ``PARAMS``
tensors, in that order (``layer_params`` reads them off a layer; a bias may be None); attention_mask: what
the layer receives (None, or a 4-D float or bool mask broadcastable to [B, heads, S, S]; read only when
padded: unpadded, the indices hold it); indices int64
[R] ascending, or None. All on the CPU.

Unlike the other ops this one is a plain function, not a torch.library custom op, and runs in eager mode
only: the custom-op wrapper costs ~60 us a call with this many arguments (measured), and it is there to
save Python; a compiled forward has none to save and runs the layer's ops (custom ops) one by one.
The cpu backend runs the layer in one C++ call (csrc/cpu/w8a8_encoder_layer.cpp) on the same kernels, in
the same order, as the reference does on the cpu backend's ops: its results are those bits. What it saves
is the Python of the ~10 op calls and ~10 module calls of a layer. There is no GPU row: on CUDA the layer
runs op by op, on each op's CUDA kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qbert.ops import _checks
from qbert.ops._registry import Row, op
from qbert.ops.add_layernorm_quantize import add_layernorm_quantize
from qbert.ops.int8_linear import int8_linear
from qbert.ops.int8_linear_requant import int8_linear_requant
from qbert.ops.quantize_per_token import quantize_per_token
from qbert.ops.varlen_attention import varlen_attention
from qbert.ops.w8a8_linear import w8a8_linear

NAME = "w8a8_encoder_layer"
# The layer's tensors, in the order the op takes them: (module path under the layer, attribute).
PARAMS: tuple[tuple[str, str], ...] = (
    *((f"attention.self.{proj}", attr) for proj in ("query", "key", "value") for attr in ("w_q", "w_scale", "bias")),
    ("attention.output.dense", "w_q"), ("attention.output.dense", "w_scale"), ("attention.output.dense", "bias"),
    ("attention.output.LayerNorm", "weight"), ("attention.output.LayerNorm", "bias"),
    ("intermediate.dense", "w_q"), ("intermediate.dense", "w_scale"), ("intermediate.dense", "bias"),
    ("output.dense", "w_q"), ("output.dense", "w_scale"), ("output.dense", "bias"),
    ("output.LayerNorm", "weight"), ("output.LayerNorm", "bias"),
)
_OPTIONAL = frozenset(i for i, (_, attr) in enumerate(PARAMS) if attr == "bias")


def layer_params(layer: torch.nn.Module) -> list[torch.Tensor | None]:
    """The ``PARAMS`` tensors of a BERT-family encoder layer whose projections are w8a8 ``QLinear``s, by
    plain attribute access (``get_submodule`` per tensor costs ~0.1 ms a layer)."""
    attention = layer.attention.self
    out, ffn_out = layer.attention.output, layer.output
    params: list[torch.Tensor | None] = []
    for dense, norm in (((attention.query, attention.key, attention.value, out.dense), out.LayerNorm),
                        ((layer.intermediate.dense, ffn_out.dense), ffn_out.LayerNorm)):
        for linear in dense:
            params += (linear.w_q, linear.w_scale, linear.bias)
        params += (norm.weight, norm.bias)
    return params


def _check(x, x_q, x_scale, params, heads, attention_mask, indices, batch, seq) -> None:
    _checks.check_dtype(NAME, "x", x, torch.float32)
    if x.dim() != 2:
        raise ValueError(f"{NAME}: x must be 2-D [rows, hidden], got shape {list(x.shape)}")
    if (x_q is None) != (x_scale is None):
        raise ValueError(f"{NAME}: x_q and x_scale go together: pass both or neither")
    if x_q is not None:
        _checks.check_dtype(NAME, "x_q", x_q, torch.int8)
        if x_q.shape != x.shape or x_scale.shape != x.shape[:1]:
            raise ValueError(f"{NAME}: x_q must have x's shape {list(x.shape)} and x_scale [{x.shape[0]}], got "
                             f"{list(x_q.shape)} and {list(x_scale.shape)}")
    if len(params) != len(PARAMS):
        raise ValueError(f"{NAME}: params must hold the {len(PARAMS)} tensors of PARAMS, got {len(params)}")
    missing = [".".join(PARAMS[i]) for i, t in enumerate(params) if t is None and i not in _OPTIONAL]
    if missing:
        raise ValueError(f"{NAME}: params has None for {', '.join(missing)} (only biases may be None)")
    if heads < 1 or batch < 1 or seq < 1:
        raise ValueError(f"{NAME}: heads, batch and seq must be positive, got {heads}, {batch}, {seq}")
    if indices is None:
        if x.shape[0] != batch * seq:
            raise ValueError(f"{NAME}: without indices x must have batch * seq = {batch * seq} rows, "
                             f"got {x.shape[0]}")
    else:
        _checks.check_dtype(NAME, "indices", indices, torch.int64)
        if indices.shape != x.shape[:1]:
            raise ValueError(f"{NAME}: indices must have shape [{x.shape[0]}] (one position per row of x), "
                             f"got {list(indices.shape)}")
    _checks.check_same_device(NAME, x=x, x_q=x_q, x_scale=x_scale, attention_mask=attention_mask, indices=indices,
                              **{f"params[{i}]": t for i, t in enumerate(params)})


def w8a8_encoder_layer(x: torch.Tensor, x_q: torch.Tensor | None, x_scale: torch.Tensor | None,
                       params: list[torch.Tensor | None], eps1: float, eps2: float, heads: int, scaling: float,
                       attention_mask: torch.Tensor | None, indices: torch.Tensor | None, batch: int,
                       seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused W8A8 encoder layer (see the module docstring); returns ``(y, y_q, y_scale)``. Eager only:
    under ``torch.compile`` the layer runs op by op (each op a custom op the compiler sees)."""
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{NAME} runs in eager mode only: under torch.compile a layer runs op by op")
    _check(x, x_q, x_scale, params, heads, attention_mask, indices, batch, seq)
    return _OP(x, x_q, x_scale, params, eps1, eps2, heads, scaling, attention_mask, indices, batch, seq)


def w8a8_encoder_layer_reference(x, x_q, x_scale, params, eps1, eps2, heads, scaling, attention_mask, indices,
                                 batch, seq):
    (qw, qs, qb, kw, ks, kb, vw, vs, vb, ow, os_, ob, n1w, n1b, uw, us, ub, dw, ds, db, n2w, n2b) = params
    if x_q is None:
        x_q, x_scale = quantize_per_token(x)

    q, k, v = (int8_linear(x_q, x_scale, w, s, b) for w, s, b in ((qw, qs, qb), (kw, ks, kb), (vw, vs, vb)))

    if indices is None and attention_mask is not None:
        def heads_view(t: torch.Tensor) -> torch.Tensor:  # [B * S, A] -> [B, heads, S, d]
            return t.view(batch, -1, heads, t.shape[1] // heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(*(heads_view(t) for t in (q, k, v)), attn_mask=attention_mask,
                                                 dropout_p=0.0, scale=scaling)
        context = context.transpose(1, 2).contiguous().view(batch * seq, -1)
    else:
        lengths = (torch.full((batch,), seq, dtype=torch.int64) if indices is None
                   else torch.bincount(indices // seq, minlength=batch))
        context = varlen_attention(q, k, v, lengths, heads, scaling)
    a, a_q, a_scale = add_layernorm_quantize(w8a8_linear(context, ow, os_, ob), x, n1w, n1b, eps1)
    h_q, h_scale = int8_linear_requant(a_q, a_scale, uw, us, ub, "gelu")
    return add_layernorm_quantize(int8_linear(h_q, h_scale, dw, ds, db), a, n2w, n2b, eps2)


_OP = op(NAME, reference=w8a8_encoder_layer_reference,
         cpu=Row(kernel="w8a8_encoder_layer_cpu"))
