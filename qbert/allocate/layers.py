"""Which layers an allocation covers, which are tied together, and what a uniform format costs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from qbert.models import family_of
from qbert.nn.formats import LinearFormat
from qbert.nn.quantize import _keep_float_reason, _linear_aliases

# Child names of the query / key / value projections of one attention block, per family: BERT, RoBERTa,
# ELECTRA, MiniLM and ALBERT use query/key/value; DistilBERT q_lin/k_lin/v_lin.
QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


def linear_layers(model: nn.Module, module_names: Sequence[str]) -> dict[str, nn.Linear]:
    """``name -> nn.Linear`` for each name; unknown names, other module types and two names of one shared
    layer (list it once) are errors."""
    modules = dict(model.named_modules(remove_duplicate=False))
    layers: dict[str, nn.Linear] = {}
    seen: dict[int, str] = {}
    for name in module_names:
        module = modules.get(name)
        if type(module) is not nn.Linear:
            what = "no module" if module is None else f"a {type(module).__name__}, not an nn.Linear"
            raise ValueError(f"{name!r} is {what} in {type(model).__name__}")
        if id(module) in seen:
            raise ValueError(f"{seen[id(module)]!r} and {name!r} are one shared layer; list it once")
        seen[id(module)] = name
        layers[name] = module
    return layers


def quantizable_modules(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` layers that ``qbert.quantize(model, mode)`` swaps by default (task heads and the
    family's float layers excluded), one name per shared layer (its first), in module order."""
    family = family_of(model)
    return [names[0] for _, names in _linear_aliases(model).values()
            if _keep_float_reason(names, family.heads, family.keep_float, (), False) is None]


def default_ties(model: nn.Module) -> list[list[str]]:
    """The query / key / value projections of every attention block, one group each (``QKV_NAMES``): the
    layers that read the same input and are usually fused, so they share one format."""
    ties = []
    for name, module in model.named_modules():
        for children in QKV_NAMES:
            if all(type(getattr(module, child, None)) is nn.Linear for child in children):
                ties.append([f"{name}.{child}" if name else child for child in children])
    return ties


def weights_of(layers: dict[str, nn.Linear]) -> int:
    return sum(layer.weight.numel() for layer in layers.values())


def layer_bytes(layer: nn.Linear, fmt: LinearFormat) -> int:
    """Exact bytes of ``layer``'s weight in ``fmt`` (codes + scales + zeros; the bias is not counted)."""
    return sum(fmt.nbytes(layer.out_features, layer.in_features).values())


def uniform_size(model: nn.Module, fmt: LinearFormat, module_names: Sequence[str] | None = None) -> int:
    """Exact bytes of the layers ``module_names`` (default: ``quantizable_modules(model)``) all in ``fmt``.

    "Mixed 2/3 bits at the size of uniform 3 bits" is
    ``Budget(megabytes=uniform_size(model, linear_format("w3a16")) / MB)``.
    """
    names = quantizable_modules(model) if module_names is None else module_names
    return sum(layer_bytes(layer, fmt) for layer in linear_layers(model, names).values())
