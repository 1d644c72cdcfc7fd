"""Unpadded execution of the fused encoder: the token-wise ops run on the real tokens only.

A padded batch of B sequences of length S holds T <= B*S real tokens. Every op of an encoder layer except
attention is row-wise (the int8 GEMMs, per-token quantization, LayerNorm, GELU: row t of the output
depends on row t of the input alone), so it can run on the T real rows, gathered once:

    hidden [B, S, H] -> gather -> [T, H] -> every layer: Q, K, V, attention output, FFN on [T, .]
      attention, a layer run op by op: scatter q, k, v to [B, heads, S, d] (zeros at the pads) -> the
                 model's attention implementation with the mask unchanged -> gather the context to [T, H]
      attention, a layer run as one call (``qbert.ops.w8a8_encoder_layer``: CPU, eager, sdpa): each
                 sequence's real rows attend to each other alone, no mask, no pad positions computed
    -> scatter once at the end -> [B, S, H], zeros at the pad positions

The real tokens are the keys the mask lets every query attend to. Run op by op, the unpadded forward
equals the padded one bitwise for each real token: the row-wise ops see the same rows, and in attention a
padded key gets probability exactly 0 either way (its score is masked to -inf, or to the dtype's minimum
plus a finite ``q . k``, whose exponential underflows to 0), so a zero key / value in place of the pad
token's adds exact zeros. Run as one call, attention computes the same softmax over the same keys without
the pad positions (on real text with ~30% padding that skips about half of attention's work), which is the
same math but not the same bits: the kernel blocks the keys differently, and a requantized code can move
by one step (fidelity to the float model is unchanged; tests/nn/test_unpad.py). The pad positions of the output are zeros, where the padded path leaves the (meaningless)
output of the pad tokens; poolers that use the mask (sentence-transformers' mean, max, CLS-at-first-real-
token and last-token pooling) read only real tokens. A head reading a pad position (a token-level head,
whose labels collators set to -100 there; a ``*Pooler`` on position 0 of a left-padded batch) reads zeros.

``plan`` decides, once per encoder forward, and runs the padded path, by design, when:
  - ``unpadding(False)`` is in effect (the switch, for tests and for callers that want the pad outputs);
  - the mask is None (no padding: Hugging Face passes None then under eager and sdpa), holds no padding,
    or hides every token;
  - the mask is not a plain bidirectional key-padding mask: anything but a 4-D ``[B | 1, 1 | heads,
    S | 1, S]`` tensor whose entries do not depend on head or query, float (0: attend, at most the
    dtype's minimum or -inf: masked) or, under any attention implementation but the eager one (which adds
    the mask to the scores), boolean (True: attend). A custom 4-D mask, an additive bias, a bool mask
    under eager, a flash-attention 2-D mask or a flex-attention ``BlockMask`` keeps every token;
  - Hugging Face is capturing per-layer outputs (``output_hidden_states``, ``output_attentions``, by
    keyword or from the config): they must be the padded per-layer tensors;
  - under ``torch.compile`` / ``torch.export`` (``torch.compiler.is_compiling()``), ``torch.jit`` tracing,
    or CUDA-graph capture: T is data-dependent, and these need static shapes.
Forward hooks a caller puts on the layers (or their sub-modules) see the [T, H] rows on the unpadded path.
Deciding costs one host synchronization (the count T), once per forward. The output capture is read from
transformers' own collector (``transformers.utils.output_capturing``), which is set from the keywords and
the config alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

MASK_DIMS = 4  # [batch, heads, query, key], the mask Hugging Face hands its encoders under eager and sdpa

EAGER = "eager"  # Hugging Face's name of the eager attention implementation (it adds the mask)

_ENABLED: ContextVar[bool] = ContextVar("qbert_unpadding", default=True)


@contextlib.contextmanager
def unpadding(enabled: bool) -> Iterator[None]:
    """Within the block, fused encoders unpad (``True``, the default) or always run padded (``False``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"unpadding: enabled must be a bool, got {type(enabled).__name__}")
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


@dataclass(frozen=True)
class Unpadded:
    """The real tokens of a padded [batch, seq] batch: ``indices`` [T] (int64, ascending) into its flattened
    ``batch * seq`` positions."""

    indices: torch.Tensor
    batch: int
    seq: int

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] -> [T, ...], the real tokens' rows."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.indices)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [batch, seq, ...], zeros at the pad positions."""
        padded = x.new_zeros(self.batch * self.seq, *x.shape[1:]).index_copy_(0, self.indices, x)
        return padded.view(self.batch, self.seq, *x.shape[1:])


def real_tokens(mask: torch.Tensor | None, batch: int, seq: int,
                attn_implementation: str) -> torch.Tensor | None:
    """[batch, seq] bool, True at the real tokens, when ``mask`` is a plain bidirectional key-padding
    mask (see the module docstring) for a [batch, seq] input under ``attn_implementation``; None for any
    other mask. The eager implementation adds the mask to the scores, so a bool mask is none there."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != MASK_DIMS:
        return None
    rows, _, queries, keys = mask.shape
    if rows not in (1, batch) or queries not in (1, seq) or keys != seq:
        return None
    first = mask[:, :1, :1, :]  # the keys query 0 of head 0 attends to
    if not bool((mask == first).all()):  # depends on the head or the query: not key padding
        return None
    if mask.dtype == torch.bool and attn_implementation != EAGER:
        valid = first
    elif mask.dtype.is_floating_point:
        valid = first == 0
        if not bool((valid | (first <= torch.finfo(mask.dtype).min)).all()):  # an additive bias
            return None
    else:
        return None
    return valid.reshape(rows, seq).expand(batch, seq)


def capturing_outputs() -> bool:
    """Whether Hugging Face's output capture (``output_hidden_states`` / ``output_attentions``, which
    collect every layer's output through hooks) is recording in this forward."""
    from transformers.utils.output_capturing import _active_collector

    return bool(_active_collector.get())


def _static_shapes_required(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def plan(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
         attn_implementation: str) -> Unpadded | None:
    """The real tokens of the encoder input ``hidden_states`` [batch, seq, hidden] under the mask the
    encoder received and the model's attention implementation, or None where the encoder runs padded (the
    cases in the module docstring)."""
    if _static_shapes_required(hidden_states) or not _ENABLED.get() or attention_mask is None:
        return None
    if capturing_outputs():
        return None
    batch, seq = hidden_states.shape[:2]
    valid = real_tokens(attention_mask, batch, seq, attn_implementation)
    if valid is None:
        return None
    indices = valid.flatten().nonzero().squeeze(1)
    if indices.numel() in (0, batch * seq):
        return None
    return Unpadded(indices, batch, seq)
