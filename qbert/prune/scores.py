"""Importance of attention heads, FFN neurons and whole layers on calibration data.

Loss: ``loss_fn(model, batch) -> scalar`` on batches of tensors, as in ``qbert.hessian``; by default the
model's own ``.loss`` (``qbert.allocate.calibration.model_loss``: batches with ``labels``). Every score
runs inside ``qbert.hessian.hessian_mode``: eval mode (no dropout, so the loss is a fixed function of the
weights), eager attention (double backward) and only the weights studied requiring gradients.

``taylor`` (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): a gate xi of ones scales
each unit's contribution, and the first-order estimate of the loss change of setting xi_u to 0 gives

    I_u = sum_b |dL_b / dxi_u|          (L_b the loss of batch b)

Heads: xi_h scales head h's d columns of the input of the output projection o (its attention output);
neurons: xi_i scales input i of the down projection (the activated neuron); layers: the layer's output
becomes x + g (layer(x) - x), so g = 0 removes it exactly (the residual stream passes through).

``hessian`` (HAWQ-V2's estimate of the loss change of a perturbation dW, the gradient term dropped at
trained weights and the constant 1/2 left out as in ``qbert.hessian.sensitivity``): removing a unit sets
its weight slice W_u to zero, dW = -W_u, so

    I_u = Tr(H_u) / n_u * ||W_u||^2

with H_u the Hessian block of the mean loss over the batches in the slice's n_u weights. A head's slice:
its d rows of Wq, Wk, Wv and its d columns of Wo (n_u = 4 d h); a neuron's: its row of Wup and its column
of Wdown (n_u = 2 h). Tr(H_u) comes from Hutchinson's estimator with Rademacher probes z over every
layer's q/k/v/o (or up/down) weights together, one joint Hessian-vector product per probe
(``BlockHVP(joint=True)``): Tr(H_u) ~ mean_j sum_{k in u} z_jk (H z_j)_k, unbiased since E[z_k z_l] = 0
for k != l. The slices of a unit whose weights are zero score 0. A layer's gate g is a single number, so
its block is exact: I_l = d^2 L / dg_l^2 at g = 1 (dg = -1, ||dg||^2 = 1), one double backward per layer
and batch. A negative trace (non-convex curvature) is kept as it is, as in HAWQ-V2.

normalize: each layer's head (neuron) scores divided by their L2 norm, as in Michel et al.'s code (layer
scores: the vector over layers); by default on for ``taylor`` and off for ``hessian``, whose scores are
estimated loss changes and so already comparable across layers. A layer whose scores are all 0 keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qbert.allocate.calibration import model_loss
from qbert.hessian.hvp import Batch, BlockHVP, LossFn, hessian_mode, module_weights, to_device
from qbert.hessian.trace import rademacher
from qbert.prune.structure import LayerView, PruneError, encoder_layers

TAYLOR = "taylor"
HESSIAN = "hessian"
METHODS = (TAYLOR, HESSIAN)
DEFAULT_PROBES = 100  # Hutchinson probes, as qbert.hessian.hutchinson_traces
# How a piece's weight [out, in] holds the units' slices: ROWS, unit u owns a contiguous block of rows
# (q/k/v: d rows per head; up: one row per neuron); COLUMNS, the same block of columns (o; down).
ROWS, COLUMNS = "rows", "columns"
HEAD_SLICES = {"query": ROWS, "key": ROWS, "value": ROWS, "out": COLUMNS}
NEURON_SLICES = {"up": ROWS, "down": COLUMNS}


def check_method(method: str, caller: str) -> None:
    if method not in METHODS:
        raise PruneError(f"{caller}: method must be one of {list(METHODS)}, got {method!r}")


def calibration_batches(batches: Iterable[Batch] | None, caller: str) -> list[Batch]:
    """The batches as a list; none at all is a PruneError."""
    found = [] if batches is None else list(batches)
    if not found:
        raise PruneError(f"{caller}: scoring needs calibration batches (dicts of tensors for loss_fn), got none")
    return found


def _checked(method: str, probes: int, caller: str) -> None:
    check_method(method, caller)
    if method == HESSIAN and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
        raise PruneError(f"{caller}: probes must be a positive int, got {probes!r}")


def _normalized(scores: torch.Tensor, normalize: bool | None, method: str) -> torch.Tensor:
    if normalize is None:
        normalize = method == TAYLOR
    norm = torch.linalg.vector_norm(scores)
    return scores / norm if normalize and norm > 0 else scores


def _taylor(model: nn.Module, batches: list[Batch], loss_fn: LossFn, gates: list[torch.Tensor],
            install: Callable[[int, torch.Tensor], torch.utils.hooks.RemovableHandle], desc: str,
            progress: bool) -> list[torch.Tensor]:
    """sum_b |dL_b / d gate| for each gate, ``install(i, gate)`` hooking gate i into the model."""
    totals = [torch.zeros(g.shape, dtype=torch.float64) for g in gates]
    device = next(model.parameters()).device
    with hessian_mode(model, ()):
        handles = [install(i, gate) for i, gate in enumerate(gates)]
        try:
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                loss = loss_fn(model, to_device(batch, device))
                for total, grad in zip(totals, torch.autograd.grad(loss, gates)):
                    total += grad.detach().abs().double().cpu()
        finally:
            for handle in handles:
                handle.remove()
    return totals


def _gate_input(module: nn.Module, gate: torch.Tensor, width: int) -> torch.utils.hooks.RemovableHandle:
    """Scales the module's input by ``gate``, each entry repeated over ``width`` consecutive features."""
    def hook(_, args):
        return (args[0] * gate.repeat_interleave(width), *args[1:])
    return module.register_forward_pre_hook(hook)


def _gate_layer(layer: nn.Module, gates: torch.Tensor, index: int) -> torch.utils.hooks.RemovableHandle:
    """The layer's output y becomes x + g (y - x), x its input hidden states, g = gates[index]."""
    def hook(_, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        gate = gates[index]
        if isinstance(output, tuple):
            return (x + gate * (output[0] - x), *output[1:])
        return x + gate * (output - x)
    return layer.register_forward_hook(hook, with_kwargs=True)


def _ones(view: LayerView, size: int) -> torch.Tensor:
    weight = view.out.weight
    return torch.ones(size, dtype=weight.dtype, device=weight.device, requires_grad=True)


def _slice_sums(tensor: torch.Tensor, layout: str, units: int) -> torch.Tensor:
    """Sum of ``tensor`` (a weight-shaped [out, in] tensor) over each unit's slice (float64, CPU)."""
    t = tensor.detach().double().cpu()
    if layout == ROWS:
        return t.reshape(units, -1).sum(1)
    return t.reshape(t.shape[0], units, -1).sum((0, 2))


def _hutchinson_slices(model: nn.Module, views: list[LayerView], batches: list[Batch], loss_fn: LossFn,
                       slices: dict[str, str], units_of: Callable[[LayerView], int], *, probes: int,
                       seed: int, desc: str, progress: bool) -> list[torch.Tensor]:
    """Tr(H_u) / n_u * ||W_u||^2 per unit of each layer (module docstring, ``hessian``)."""
    names = [view.names[piece] for view in views for piece in slices]
    weights = module_weights(model, names)
    traces = [torch.zeros(units_of(view), dtype=torch.float64) for view in views]
    generator = torch.Generator().manual_seed(seed)
    with hessian_mode(model, weights.values()):
        products = BlockHVP(model, weights, batches, loss_fn, joint=True)
        for _ in tqdm(range(probes), desc=desc, unit="probe", disable=not progress):
            z = {name: rademacher(weight, generator) for name, weight in weights.items()}
            hz = products(z)
            for view, trace in zip(views, traces):
                for piece, layout in slices.items():
                    name = view.names[piece]
                    trace += _slice_sums(z[name] * hz[name], layout, units_of(view))
    scores = []
    for view, trace in zip(views, traces):
        units = units_of(view)
        squares = sum(_slice_sums(view.modules[piece].weight.pow(2), layout, units)
                      for piece, layout in slices.items())
        size = sum(view.modules[piece].weight.numel() for piece in slices) // units  # n_u
        scores.append(trace / probes / size * squares)
    return scores


@dataclass(frozen=True)
class _Unit:
    """Heads or neurons: how many a layer has, the Linear whose input the Taylor gate scales (each gate
    entry over ``width(view)`` consecutive features) and the weight slices of the Hessian score."""

    name: str
    count: Callable[[LayerView], int]
    gated: Callable[[LayerView], nn.Module]
    width: Callable[[LayerView], int]
    slices: dict[str, str]


_HEADS = _Unit("head", lambda view: view.heads, lambda view: view.out, lambda view: view.head_size, HEAD_SLICES)
_NEURONS = _Unit("neuron", lambda view: view.intermediate, lambda view: view.down, lambda view: 1, NEURON_SLICES)


def _unit_importance(unit: _Unit, caller: str, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn | None,
                     method: str, normalize: bool | None, probes: int, seed: int,
                     progress: bool) -> list[torch.Tensor]:
    _checked(method, probes, caller)
    views = encoder_layers(model)
    batches = calibration_batches(batches, caller)
    loss_fn = model_loss if loss_fn is None else loss_fn
    desc = f"{unit.name} importance ({method})"
    if method == TAYLOR:
        gates = [_ones(view, unit.count(view)) for view in views]
        scores = _taylor(model, batches, loss_fn, gates,
                         lambda i, gate: _gate_input(unit.gated(views[i]), gate, unit.width(views[i])), desc,
                         progress)
    else:
        scores = _hutchinson_slices(model, views, batches, loss_fn, unit.slices, unit.count, probes=probes,
                                    seed=seed, desc=desc, progress=progress)
    return [_normalized(s, normalize, method) for s in scores]


def head_importance(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn | None = None, *,
                    method: str = TAYLOR, normalize: bool | None = None, probes: int = DEFAULT_PROBES,
                    seed: int = 0, progress: bool = True) -> list[torch.Tensor]:
    """Importance of every attention head (module docstring): one float64 CPU tensor of length
    ``heads`` per encoder layer, in layer order.

    method: ``"taylor"`` (gate on the input of o, summed over batches) or ``"hessian"`` (Tr(H_h)/n_h *
    ||W_h||^2 over the head's q/k/v/o slices, ``probes`` Rademacher probes drawn from ``seed``).
    normalize: divide each layer's scores by their L2 norm; None: for taylor only."""
    return _unit_importance(_HEADS, "head_importance", model, batches, loss_fn, method, normalize, probes, seed,
                            progress)


def neuron_importance(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn | None = None, *,
                      method: str = TAYLOR, normalize: bool | None = None, probes: int = DEFAULT_PROBES,
                      seed: int = 0, progress: bool = True) -> list[torch.Tensor]:
    """Importance of every FFN intermediate neuron (module docstring): one float64 CPU tensor of length
    ``intermediate`` per encoder layer. As ``head_importance``, with the gate on the input of the down
    projection and the slices row i of Wup and column i of Wdown."""
    return _unit_importance(_NEURONS, "neuron_importance", model, batches, loss_fn, method, normalize, probes,
                            seed, progress)


def _gate_curvature(model: nn.Module, views: Sequence[LayerView], batches: list[Batch], loss_fn: LossFn,
                    progress: bool) -> torch.Tensor:
    """d^2 L / dg_l^2 at g = 1 for each layer's gate, L the mean loss over the batches."""
    gates = _ones(views[0], len(views))
    curvature = torch.zeros(len(views), dtype=torch.float64)
    device = gates.device
    with hessian_mode(model, ()):
        handles = [_gate_layer(view.layer, gates, view.index) for view in views]
        try:
            for batch in tqdm(batches, desc="layer importance (hessian)", unit="batch", disable=not progress):
                loss = loss_fn(model, to_device(batch, device))
                (grad,) = torch.autograd.grad(loss, gates, create_graph=True)
                for layer in range(len(views)):
                    (row,) = torch.autograd.grad(grad[layer], gates, retain_graph=True)
                    curvature[layer] += row[layer].item()
        finally:
            for handle in handles:
                handle.remove()
    return curvature / len(batches)


def layer_importance(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn | None = None, *,
                     method: str = TAYLOR, normalize: bool | None = None, progress: bool = True) -> torch.Tensor:
    """Importance of every encoder layer (module docstring): a float64 CPU tensor of length ``layers``.

    The layer's output becomes x + g_l (layer(x) - x). method ``"taylor"``: sum_b |dL_b / dg_l|;
    ``"hessian"``: d^2 L / dg_l^2 at g = 1, exact (L the mean loss over the batches).
    normalize: divide by the vector's L2 norm (the ranking is unchanged); None: for taylor only."""
    check_method(method, "layer_importance")
    views = encoder_layers(model)
    batches = calibration_batches(batches, "layer_importance")
    loss_fn = model_loss if loss_fn is None else loss_fn
    if method == TAYLOR:
        gates = [_ones(view, 1) for view in views]
        scores = torch.cat(_taylor(model, batches, loss_fn, gates,
                                   lambda i, gate: _gate_layer(views[i].layer, gate, 0),
                                   "layer importance (taylor)", progress))
    else:
        scores = _gate_curvature(model, views, batches, loss_fn, progress)
    return _normalized(scores, normalize, method)


__all__ = ["DEFAULT_PROBES", "METHODS", "head_importance", "layer_importance", "neuron_importance"]
