"""A model family: the module names that are task heads, and those to keep in float for other reasons.

Patterns are fnmatch globs over the dotted module names of ``model.named_modules()`` (``*`` also matches
dots). A pattern names a subtree: it matches a module when it matches the module's name or the name of
any of its ancestors, so ``"cls"`` covers ``cls.predictions.transform.dense``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """name: the family; model_types: the ``config.model_type`` values it covers;
    heads: task-head patterns (left in float unless ``include_head=True``);
    keep_float: patterns always left in float, with the reason in the family's module docstring.

    The fused W8A8 chain (``qbert.nn.fused``) re-classes modules by class name, all with the BERT layout
    of transformers 5: fused_encoders: encoder classes (a ``layer`` ModuleList); fused_layers: their layer
    classes (``attention.self``, ``attention.output``, ``intermediate``, ``output``); fused_attentions:
    the self-attention classes (``query``, ``key``, ``value``, ``attention_head_size``, ``scaling``)."""

    name: str
    model_types: tuple[str, ...]
    heads: tuple[str, ...]
    keep_float: tuple[str, ...] = ()
    fused_encoders: tuple[str, ...] = ()
    fused_layers: tuple[str, ...] = ()
    fused_attentions: tuple[str, ...] = ()


def ancestry(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]`` (the root module, named ``""``, has no ancestry)."""
    parts = name.split(".") if name else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def first_match(name: str, patterns: tuple[str, ...] | list[str]) -> str | None:
    """The first pattern that matches ``name`` or one of its ancestors, else None."""
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in ancestry(name)):
            return pattern
    return None
