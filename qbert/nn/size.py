"""Exact weight-size accounting of a model's linear layers (float or quantized), for reports and budgets."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qbert.nn.qlinear import QLinear


@dataclass(frozen=True)
class LayerBytes:
    """Bytes of one linear layer's weight (its bias is not counted): codes (the float weight itself for a
    float layer), scales and zero points. ``names`` lists every name of a shared layer."""

    names: tuple[str, ...]
    format: str
    weights: int
    in_features: int
    out_features: int
    codes: int
    scales: int
    zeros: int

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zeros

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total / self.weights


def linear_bytes(model: nn.Module) -> list[LayerBytes]:
    """One ``LayerBytes`` per ``nn.Linear`` / ``QLinear`` of ``model`` (a shared layer counted once),
    in module order."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Linear, QLinear)):
            found.setdefault(id(module), (module, []))[1].append(name)
    layers = []
    for module, names in found.values():
        n, k = module.out_features, module.in_features
        if isinstance(module, QLinear):
            nbytes, fmt = module.weight_nbytes(), module.format.describe()
        else:
            weight = module.weight
            nbytes = {"codes": weight.numel() * weight.element_size(), "scales": 0, "zeros": 0}
            fmt = str(weight.dtype).removeprefix("torch.")
        layers.append(LayerBytes(tuple(names), fmt, n * k, k, n, **nbytes))
    return layers
