"""The fused W8A8 chain of a BERT-family encoder: int8 activations handed from one op to the next.

In a W8A8 encoder every projection needs its input as int8 codes with per-token scales. Quantizing in a
separate pass reads and writes every activation once more; the fused chain makes the producers emit the
codes and hands them on as explicit values, the (float, codes) pair, through the layer's forward:

    layer input x + codes (the previous layer's, or quantize_per_token(x) for the first layer)
      Q, K, V: int8_linear(codes) -> the model's attention implementation -> context
      attention output: w8a8 dense(context) -> dropout -> add_layernorm_quantize(+ x) -> a + codes
      FFN up: int8_linear_requant(codes, GELU) --------------------------------------> codes
      FFN down: int8_linear(codes) -> dropout -> add_layernorm_quantize(+ a) -------> y + codes -> next layer

The float activations stay the residual stream. Nothing rides on a tensor as a hidden attribute, so the
chain traces with ``torch.compile(fullgraph=True)``, CUDA graphs and ``torch.export``.

``fuse`` re-classes the family's encoder, layer and self-attention modules in place as subclasses of
their own Hugging Face classes (``FusedEncoder``, ``FusedLayer``, ``FusedSelfAttention`` mixed in), so
every parameter name, the state dict and Hugging Face's output capture (``output_hidden_states``,
``output_attentions``, which hook those classes) stay as they were. The mixins are written against the
encoder API of transformers 5 (``forward(hidden_states, attention_mask, ..., cache, **kwargs)``).

Which pieces of a layer use codes is decided once, when fusing, and recorded in ``FusedPieces``: the
Q/K/V projections when all three are w8a8; an add-norm (``LayerNorm(dropout(dense(x)) + residual)``)
when its dense is w8a8; the FFN up-projection when it and the FFN down-projection are w8a8 and the
activation is the exact GELU the int8 epilogue computes. A piece that does not qualify runs the
Hugging Face modules unchanged. The unfused path (``qbert.quantize(model, "w8a8", fuse=False)``) is the
reference the fused chain is tested against.

On the CPU in eager mode a layer whose four pieces all run on codes is one op, ``w8a8_encoder_layer``
(one C++ call: the same kernels in the same order, without the Python of the ~20 op and module calls
between them; its attention is qbert's ``varlen_attention`` where no mask is needed, the same math as sdpa,
not its bits, and sdpa itself on a masked padded batch, the same bits), when the forward is one that op reproduces: eval mode (no dropout),
float32, Hugging Face's sdpa attention, no keyword but ``position_ids`` for the attention, no cache or
cross-attention, no output capture, and no forward hooks on the layer's sub-modules (hooks on the layer
itself still run). Any other forward, and every forward on CUDA or under ``torch.compile`` / tracing,
runs the layer op by op as above. Where every layer of an encoder runs as one call, its forward and that
of the module holding it (the embeddings, masks and pooler around it) run torch's own ops serially,
qbert's kernels on qbert's thread pool at torch's thread count (``serial_torch``): no OpenMP worker then
spins between qbert's kernels.

Padded batches run unpadded (``qbert.nn.unpad``): the encoder gathers the real tokens' rows once, every
layer runs its row-wise ops on those [T, H] rows, the self-attention scatters Q, K and V back to the
padded [B, heads, S, d] for the model's attention implementation and gathers its context, and the encoder
scatters the last hidden state back to [B, S, H] once, with zeros at the pad positions (a one-call layer
attends within each sequence's real rows instead). For each real token the result equals the padded fused
forward bitwise op by op, in float (same math) in one call. Which batches stay padded (no padding, masks
that are not plain key padding, output capture, torch.compile / export / tracing / CUDA-graph capture,
``qbert.nn.unpad.unpadding(False)``) is listed in that module. A layer of a fused encoder that is not
itself fused gets its hidden states padded and unpadded around it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qbert import _ext, ops
from qbert.models import family_of
from qbert.nn import unpad
from qbert.nn.qlinear import QLinear
from qbert.ops.w8a8_encoder_layer import layer_params

Codes = tuple[torch.Tensor, torch.Tensor]  # per-token int8 codes [..., K] and float32 scales [...]


def is_w8a8(module: nn.Module | None) -> bool:
    return isinstance(module, QLinear) and module.format.name == "w8a8"


def is_exact_gelu(act: nn.Module) -> bool:
    """Hugging Face's ``GELUActivation`` (``hidden_act="gelu"``) or ``nn.GELU()``: the erf form the int8
    epilogue computes. The tanh approximations and other activations are not fused."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _codes(x: torch.Tensor, codes: Codes | None) -> Codes:
    return codes if codes is not None else ops.quantize_per_token(x.contiguous())


def _project(dense: QLinear, codes: Codes, dtype: torch.dtype) -> torch.Tensor:
    """``dense(x)`` in ``dtype`` from x's codes: the int8 GEMM with the dequantization and bias fused."""
    q, scale = codes
    return ops.int8_linear(q, scale, dense.w_q, dense.w_scale, dense.bias, out_dtype=dtype)


@dataclass(frozen=True)
class FusedPieces:
    """Which pieces of one encoder layer run on int8 codes (see the module docstring)."""

    qkv: bool
    attention_output: bool
    intermediate: bool
    output: bool

    @property
    def one_call(self) -> bool:
        """Every piece runs on codes: the layer can run as one ``w8a8_encoder_layer`` call."""
        return self.qkv and self.attention_output and self.intermediate and self.output

    def names(self, layer: str) -> list[str]:
        """The module names of the pieces that run fused, under the layer named ``layer``."""
        pieces = {"attention.self": self.qkv, "attention.output": self.attention_output,
                  "intermediate": self.intermediate, "output": self.output}
        return [f"{layer}.{piece}" for piece, fused in pieces.items() if fused]


def _pieces(layer: nn.Module) -> FusedPieces:
    attention = layer.attention.self
    return FusedPieces(
        qkv=all(is_w8a8(getattr(attention, name)) for name in ("query", "key", "value")),
        attention_output=is_w8a8(layer.attention.output.dense),
        intermediate=is_w8a8(layer.intermediate.dense) and is_w8a8(layer.output.dense)
        and is_exact_gelu(layer.intermediate.intermediate_act_fn),
        output=is_w8a8(layer.output.dense))


def _add_norm(module: nn.Module, fused: bool, x: torch.Tensor | None, codes: Codes | None,
              residual: torch.Tensor) -> tuple[torch.Tensor, Codes | None]:
    """``LayerNorm(dropout(dense(x)) + residual)`` of a ``*SelfOutput`` / ``*Output`` module, from x or
    from x's codes; fused, also the result's codes (one op: add, LayerNorm, quantize)."""
    if not fused:
        return module(x, residual), None
    h = module.dense(x) if codes is None else _project(module.dense, codes, residual.dtype)
    h = module.dropout(h)
    norm = module.LayerNorm
    y, q, scale = ops.add_layernorm_quantize(h.contiguous(), residual.contiguous(), norm.weight, norm.bias,
                                             norm.eps)
    return y, (q, scale)


class FusedSelfAttention:
    """Mixed into the family's ``*SelfAttention``: Q, K and V from the input's codes when the layer passes
    them (all three w8a8: one quantization shared by the three GEMMs), else from the float input; then the
    model's attention implementation. Given ``unpadded``, the input is the real tokens' rows [T, H]: Q, K
    and V are scattered to the padded [B, heads, S, d] (zeros at the pads) and the context is gathered
    back to [T, H]."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, *, codes: Codes | None = None, unpadded: unpad.Unpadded | None = None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        projections = (self.query, self.key, self.value)
        if codes is not None:
            q, k, v = (_project(dense, codes, hidden_states.dtype) for dense in projections)
        else:
            q, k, v = (dense(hidden_states) for dense in projections)
        if unpadded is not None:
            q, k, v = (unpadded.scatter(t) for t in (q, k, v))
        input_shape = q.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        q, k, v = (t.view(*hidden_shape).transpose(1, 2) for t in (q, k, v))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          self.qbert_eager_attention)
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.dropout.p,
                                 scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1)
        return (out.contiguous() if unpadded is None else unpadded.gather(out)), weights


# Hugging Face's name of the attention implementation the one-call layer reproduces, and the keywords a
# layer may receive that it ignores (the encoder hands the layers position_ids; sdpa does not read them).
SDPA = "sdpa"
ATTENTION_IGNORES = frozenset({"position_ids"})


def _hooked(layer: nn.Module) -> bool:
    """Whether forward hooks would see a sub-module of ``layer`` run (hooks of their own or global ones);
    the layer's own hooks see its call either way."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules() if m is not layer)


def _one_call_layer(layer: nn.Module) -> bool:
    """What a one-call forward of ``layer`` needs of the layer itself, whatever its input: a fused layer
    whose pieces are all W8A8, in eval, on sdpa attention, not compiling or tracing."""
    return (isinstance(layer, FusedLayer) and layer.qbert_pieces.one_call and not layer.training
            and layer.attention.self.config._attn_implementation == SDPA
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


class FusedLayer:
    """Mixed into the family's ``*Layer``: returns ``(y, y_q, y_scale)``, the layer output and its codes
    (``y_q``, ``y_scale`` are None when the output add-norm is not fused), and takes the previous layer's
    codes as ``codes``. Given ``unpadded``, ``hidden_states`` (and so every row-wise op) is the real
    tokens' rows [T, H]; only the self-attention pads."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states=None, encoder_attention_mask=None, cache=None, *,
                codes: Codes | None = None, unpadded: unpad.Unpadded | None = None,
                one_call: bool | None = None, **kwargs):
        """``one_call``: whether this forward is one ``w8a8_encoder_layer`` call, as the encoder decided it
        (``_in_one_call``); None: decide here."""
        if one_call is None:
            one_call = encoder_hidden_states is None and cache is None and self._in_one_call(hidden_states, kwargs)
        if one_call:
            return self._one_call(hidden_states, attention_mask, codes, unpadded)
        pieces = self.qbert_pieces
        attention = self.attention
        codes = _codes(hidden_states, codes) if pieces.qkv else None
        context, _ = attention.self(hidden_states, attention_mask, cache=cache, codes=codes,
                                    unpadded=unpadded, **kwargs)
        a, a_codes = _add_norm(attention.output, pieces.attention_output, context, None, hidden_states)
        if pieces.intermediate:
            dense = self.intermediate.dense
            a_q, a_scale = _codes(a, a_codes)
            h_codes = ops.int8_linear_requant(a_q, a_scale, dense.w_q, dense.w_scale, dense.bias, "gelu")
            h = None
        else:
            h, h_codes = self.intermediate(a), None
        y, y_codes = _add_norm(self.output, pieces.output, h, h_codes, a)
        return (y, None, None) if y_codes is None else (y, *y_codes)

    def _in_one_call(self, x: torch.Tensor, kwargs: dict) -> bool:
        """Whether this forward runs as one ``w8a8_encoder_layer`` call (the module docstring says when)."""
        return (_one_call_layer(self) and x.device.type == "cpu" and x.dtype == torch.float32
                and kwargs.keys() <= ATTENTION_IGNORES and not _hooked(self) and not unpad.capturing_outputs())

    def _one_call(self, x: torch.Tensor, attention_mask: torch.Tensor | None, codes: Codes | None,
                  unpadded: unpad.Unpadded | None):
        attention = self.attention.self
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        x_q, x_scale = (None, None) if codes is None else (codes[0].reshape(rows.shape), codes[1].reshape(-1))
        batch, seq = (unpadded.batch, unpadded.seq) if unpadded is not None else shape[:2]
        y, y_q, y_scale = ops.w8a8_encoder_layer(
            rows.contiguous(), x_q, x_scale, layer_params(self), self.attention.output.LayerNorm.eps,
            self.output.LayerNorm.eps, attention.num_attention_heads, attention.scaling, attention_mask,
            None if unpadded is None else unpadded.indices, batch, seq)
        return y.view(shape), y_q.view(shape), y_scale.view(shape[:-1])


@contextmanager
def serial_torch(on: bool) -> Iterator[None]:
    """Within the block, on this thread: torch's own ops serial (``on``), qbert's kernels on qbert's pool
    at the thread count torch had, or (not ``on``) torch's ops at that count again; restored after it.

    Why: torch's ops run on GNU OpenMP, whose workers spin for milliseconds after each parallel region;
    between qbert's kernels (their own pool, ``csrc/cpu/parallel.h``) a spinning OpenMP worker takes a core
    from them. Where every layer is one qbert call, torch's remaining ops (embeddings, masks, pooler) are
    small, and serial they wake no OpenMP worker. Without the compiled extension there is nothing to do."""
    if _ext.load_error():
        yield
        return
    previous = _ext.module().set_serial_torch(on)
    try:
        yield
    finally:
        _ext.module().set_serial_torch(previous)


_serial_state = threading.local()  # .stack: the settings the pre-hooks below replaced, innermost last


def _serial_eligible(owner: nn.Module) -> bool:
    """Whether the forward of ``owner`` (the module holding a fused encoder) runs torch serially: eval, CPU,
    float32, not compiling or tracing, and every layer of its fused encoders one qbert call."""
    encoders = [m for m in owner.children() if isinstance(m, FusedEncoder)]
    if owner.training or not encoders:
        return False
    for encoder in encoders:
        for layer in encoder.layer:
            if not _one_call_layer(layer):
                return False
            norm = layer.output.LayerNorm.weight
            if norm.device.type != "cpu" or norm.dtype != torch.float32:
                return False
    return True


def _serial_torch_enter(owner: nn.Module, args) -> None:
    """Forward pre-hook of a fused encoder's owner (the embeddings, masks and pooler run around the
    encoder): turns serial torch on for its forward when ``_serial_eligible``."""
    if torch.compiler.is_compiling():
        return
    stack = _serial_state.__dict__.setdefault("stack", [])
    stack.append(None)  # popped by the forward hook even if what follows raises
    if _serial_eligible(owner) and not _ext.load_error():
        stack[-1] = _ext.module().set_serial_torch(True)


def _serial_torch_exit(owner: nn.Module, args, output) -> None:
    """Forward hook (always called, also when the forward raises): restores what the pre-hook replaced."""
    if torch.compiler.is_compiling():
        return
    previous = _serial_state.stack.pop()
    if previous is not None:
        _ext.module().set_serial_torch(previous)


def _hook_serial_torch(owner: nn.Module) -> None:
    if _serial_torch_enter not in owner._forward_pre_hooks.values():
        owner.register_forward_pre_hook(_serial_torch_enter)
        owner.register_forward_hook(_serial_torch_exit, always_call=True)


class FusedEncoder:
    """Mixed into the family's ``*Encoder``: runs the layers, handing each fused layer's output codes to
    the next layer; a padded batch runs on its real tokens (``unpad.plan``), unpadded once before the
    first layer and padded back once after the last (zeros at the pad positions)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states=None, encoder_attention_mask=None, cache=None, use_cache=None,
                **kwargs):
        args = (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache, use_cache)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._forward(*args, [False] * len(self.layer), **kwargs)
        # Decided once per layer here and handed to the layers.
        one_call = [encoder_hidden_states is None and cache is None and isinstance(layer, FusedLayer)
                    and layer._in_one_call(hidden_states, kwargs) for layer in self.layer]
        with serial_torch(all(one_call)):
            return self._forward(*args, one_call, **kwargs)

    def _forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache,
                 use_cache, one_call: list[bool], **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        unpadded = unpad.plan(hidden_states, attention_mask, self.config._attn_implementation)
        if unpadded is not None:
            hidden_states = unpadded.gather(hidden_states)
        codes = None
        for layer, layer_one_call in zip(self.layer, one_call):
            if isinstance(layer, FusedLayer):
                hidden_states, q, scale = layer(hidden_states, attention_mask, encoder_hidden_states,
                                                encoder_attention_mask=encoder_attention_mask,
                                                cache=cache, codes=codes, unpadded=unpadded,
                                                one_call=layer_one_call, **kwargs)
                codes = None if q is None else (q, scale)
                continue
            if unpadded is not None:  # a Hugging Face layer: its attention needs the padded input
                hidden_states = unpadded.scatter(hidden_states)
            hidden_states = layer(hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, cache=cache, **kwargs)
            if unpadded is not None:
                hidden_states = unpadded.gather(hidden_states)
            codes = None
        if unpadded is not None:
            hidden_states = unpadded.scatter(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states,
                                                         cache=cache if use_cache else None)


_FUSED_CLASSES: dict[tuple[type, type], type] = {}


def _refine(module: nn.Module, mixin: type) -> None:
    """Re-class ``module`` in place as a subclass of its own class with ``mixin``'s forward."""
    base = type(module)
    cls = _FUSED_CLASSES.get((base, mixin))
    if cls is None:
        cls = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"__module__": __name__})
        _FUSED_CLASSES[(base, mixin)] = cls
    module.__class__ = cls


def _eager_attention(module: nn.Module):
    """The eager attention function of the Hugging Face modeling module ``module``'s class comes from."""
    import sys

    return sys.modules[type(module).__module__].eager_attention_forward


def _layer_qualifies(layer: nn.Module, family) -> bool:
    """An encoder layer of the family's classes, without cross-attention, cache or feed-forward chunking,
    with at least one piece that can run on codes."""
    attention = getattr(getattr(layer, "attention", None), "self", None)
    if type(layer).__name__ not in family.fused_layers or type(attention).__name__ not in family.fused_attentions:
        return False
    if layer.is_decoder or layer.add_cross_attention or layer.chunk_size_feed_forward:
        return False
    pieces = _pieces(layer)
    return pieces.qkv or pieces.attention_output or pieces.output


def fuse(model: nn.Module) -> tuple[str, ...]:
    """Install the fused chain in ``model``'s qualifying encoders and layers, in place; returns the names of
    the pieces that now run on int8 codes (``FusedPieces.names``). Layers that do not qualify, and every
    model whose family lists no fused classes, keep the unfused path."""
    family = family_of(model)
    fused: list[str] = []
    for name, encoder in model.named_modules():
        if type(encoder).__name__ not in family.fused_encoders:
            continue
        layers = [(f"{name}.layer.{i}" if name else f"layer.{i}", layer) for i, layer in enumerate(encoder.layer)
                  if _layer_qualifies(layer, family)]
        for layer_name, layer in layers:
            attention = layer.attention.self
            layer.qbert_pieces = _pieces(layer)
            attention.qbert_eager_attention = _eager_attention(attention)
            _refine(attention, FusedSelfAttention)
            _refine(layer, FusedLayer)
            fused.extend(layer.qbert_pieces.names(layer_name))
        if layers:
            _refine(encoder, FusedEncoder)
            if name:
                _hook_serial_torch(model.get_submodule(name.rpartition(".")[0]))
    return tuple(fused)
