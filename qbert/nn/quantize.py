"""qbert.quantize: swap the ``nn.Linear`` layers of a model for ``QLinear`` in place."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qbert.models import family_of
from qbert.models._family import first_match
from qbert.nn.formats import linear_format
from qbert.nn.qlinear import QLinear

SUMMARY_ATTR = "qbert_summary"


@dataclass(frozen=True)
class QuantizeSummary:
    """What one ``qbert.quantize`` call did; set on the model as ``model.qbert_summary``.

    swapped: names of the modules now QLinear (a shared layer lists every name it is reachable by).
    kept_float: name -> why that ``nn.Linear`` stayed in float (``"head"``, ``"skip: <pattern>"``, ...).
    """

    mode: str
    family: str
    swapped: tuple[str, ...]
    kept_float: dict[str, str] = field(default_factory=dict)


def _linear_aliases(model: nn.Module) -> dict[int, tuple[nn.Linear, list[str]]]:
    """Every ``nn.Linear`` (exact type; subclasses may change forward) by identity, with all its names."""
    found: dict[int, tuple[nn.Linear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear:
            found.setdefault(id(module), (module, []))[1].append(name)
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def quantize(model: nn.Module, mode: str = "w8a8", skip: tuple[str, ...] | list[str] = (),
             include_head: bool = False) -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` layers for ``qbert.nn.QLinear`` in place and return ``model``.

    mode: ``"w8a8"`` (dynamic per-token int8 activations x per-channel int8 weights) or ``"w8a16"``
        (per-channel int8 weights, float activations); see ``qbert.nn.formats``.
    skip: fnmatch globs over module names (``model.named_modules()``) to leave in float; a pattern that
        matches a module also covers everything below it (``"bert.encoder.layer.0"``).
    include_head: also quantize the task heads (classifier, QA, MLM heads, ...). Heads come from the
        family glue in ``qbert.models``; tied MLM decoders are heads, so they stay float by default.

    A Linear reachable under several names (shared weights, e.g. ALBERT's shared layer reused by
    construction, or one module registered twice) becomes ONE QLinear placed at every name, so the
    sharing survives; it stays float if any of its names is a head or skipped. Only modules whose type is
    exactly ``nn.Linear`` are swapped (subclasses may rely on their own forward).

    Tested on random-init BERT, MiniLM (a BertModel), RoBERTa, DistilBERT, ALBERT and ELECTRA models from
    transformers. Other modules work generically (every nn.Linear is a candidate; for a Hugging Face model
    of another type, the children outside ``model.base_model`` are treated as heads) but are untested.

    The result is recorded in ``model.qbert_summary`` (a ``QuantizeSummary``).
    """
    fmt = linear_format(mode)
    if isinstance(skip, str):
        raise TypeError(f"quantize: skip must be a sequence of patterns, got the string {skip!r} "
                        f"(write skip=({skip!r},))")
    if type(model) is nn.Linear:
        raise TypeError("quantize: the model itself is an nn.Linear and cannot be swapped in place; "
                        "use qbert.nn.QLinear.from_linear(linear, mode)")
    family = family_of(model)
    swapped: list[str] = []
    kept_float: dict[str, str] = {}
    for linear, names in _linear_aliases(model).values():
        reason = _keep_float_reason(names, family.heads, family.keep_float, tuple(skip), include_head)
        if reason is not None:
            kept_float.update({name: reason for name in names})
            continue
        qlinear = QLinear.from_linear(linear, fmt.name)
        qlinear.train(linear.training)
        for name in names:
            _set_module(model, name, qlinear)
        swapped.extend(names)
    setattr(model, SUMMARY_ATTR, QuantizeSummary(fmt.name, family.name, tuple(swapped), kept_float))
    return model


def _keep_float_reason(names: list[str], heads: tuple[str, ...], keep_float: tuple[str, ...],
                       skip: tuple[str, ...], include_head: bool) -> str | None:
    for name in names:
        pattern = first_match(name, skip)
        if pattern is not None:
            return f"skip: {pattern}"
        pattern = first_match(name, keep_float)
        if pattern is not None:
            return f"family keeps float: {pattern}"
        if not include_head and first_match(name, heads) is not None:
            return "head"
    return None
