"""Importance scores (qbert.prune.scores) on tiny random float64 classifiers, checked against independent
computations: weight gradients for the Taylor gates, finite differences for the layer gates, the exact
Hessian for the Hutchinson head / neuron traces."""

import math

import pytest
import torch
from torch import nn

from qbert.hessian import hessian_mode, module_weights
from qbert.hessian.trace import rademacher
from qbert.prune import (
    PruneError,
    encoder_layers,
    head_importance,
    layer_importance,
    neuron_importance,
)
from tests.nn import _tiny_models as tiny

# Tier: same math in float64 (a gate's gradient against the weight gradient it equals by the chain rule).
FLOAT64 = {"rtol": 1e-10, "atol": 1e-14}
# Central differences of a float64 loss: truncation ~ step^2 * higher derivatives, roundoff ~ eps * loss /
# step for the first derivative and / step^2 for the second (tiny here: the random classifier's loss
# barely curves in a gate), hence a longer step for the second.
FD_STEP = 1e-3
FD_STEP_SECOND = 3e-2
FD_RTOL = 1e-5
# Hutchinson: the estimate of p probes has standard deviation sqrt(Var(t) / p), Var(t) computed exactly
# from the Hessian; the deviation allowed, in those standard deviations, for a seeded run.
HUTCHINSON_SIGMAS = 4
HUTCHINSON_PROBES = 50
SEED = 3
# On a random tiny encoder the slices' Hessian blocks are dominated by their off-diagonal entries (q-k
# cross terms): one probe's standard deviation is ~1000x a head's trace. A weight decay term adds c I to
# the Hessian (c n_u to each trace, no variance), so that the statistical check is sharp.
WEIGHT_DECAY = 1e-3
FLOAT32_ROUNDING = 2.0**-20  # BlockHVP accumulates H z in float32 (2^-24 per operation), with headroom
PIECES = ("query", "key", "value", "out", "up", "down")
# A Hessian small enough to form exactly: hidden 8, two heads of size 4, eight FFN neurons, two layers.
SMALL = {"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 8}


def _model(class_name="BertForSequenceClassification", family=None, **overrides) -> nn.Module:
    return tiny.build(class_name, family, **overrides).double()


def _batches(count: int = 2) -> list[dict]:
    """Two classification batches: the real inputs, and the same sequences shifted by one token."""
    base = tiny.inputs()
    batches = []
    for b in range(count):
        ids = torch.roll(base["input_ids"], b, dims=1)
        batches.append({"input_ids": ids, "attention_mask": base["attention_mask"],
                        "labels": torch.tensor([b % 2, 1 - b % 2])})
    return batches


def _loss(model, batch):
    return model(**batch).loss


def _weight_gradients(model, names, batch):
    """d loss / d W for the modules named (a plain backward in eval mode)."""
    weights = module_weights(model, names)
    with hessian_mode(model, weights.values()):
        grads = torch.autograd.grad(_loss(model, batch), list(weights.values()))
    return dict(zip(names, grads))


@pytest.mark.parametrize(("class_name", "family"), [("BertForSequenceClassification", None),
                                                    ("DistilBertForSequenceClassification", None)])
def test_taylor_head_scores_are_summed_absolute_gate_gradients(class_name, family):
    # Scaling head h's slice of o's input by xi_h is scaling its columns of Wo by xi_h, so
    # dL/dxi_h = sum over those columns of (dL/dWo * Wo).
    model = _model(class_name, family)
    views = encoder_layers(model)
    batches = _batches()
    expected = [torch.zeros(view.heads, dtype=torch.float64) for view in views]
    for batch in batches:
        grads = _weight_gradients(model, [view.names["out"] for view in views], batch)
        for view, total in zip(views, expected):
            product = grads[view.names["out"]] * view.out.weight.detach()
            total += product.reshape(view.hidden, view.heads, view.head_size).sum((0, 2)).abs()
    scores = head_importance(model, batches, _loss, normalize=False, progress=False)
    for got, want in zip(scores, expected, strict=True):
        torch.testing.assert_close(got, want, **FLOAT64)
    normalized = head_importance(model, batches, _loss, progress=False)  # taylor: normalized by default
    for got, want in zip(normalized, expected):
        torch.testing.assert_close(got, want / want.norm(), **FLOAT64)


def test_taylor_neuron_scores_are_summed_absolute_gate_gradients():
    model = _model()
    views = encoder_layers(model)
    batches = _batches()
    expected = [torch.zeros(view.intermediate, dtype=torch.float64) for view in views]
    for batch in batches:
        grads = _weight_gradients(model, [view.names["down"] for view in views], batch)
        for view, total in zip(views, expected):
            total += (grads[view.names["down"]] * view.down.weight.detach()).sum(0).abs()
    scores = neuron_importance(model, batches, normalize=False, progress=False)  # default loss: model.loss
    for got, want in zip(scores, expected, strict=True):
        torch.testing.assert_close(got, want, **FLOAT64)


def _gated_loss(model, batch, layer: int, gate: float) -> float:
    """The loss with layer ``layer``'s output y replaced by x + gate (y - x)."""
    module = encoder_layers(model)[layer].layer
    handle = module.register_forward_hook(lambda _, args, output: args[0] + gate * (output - args[0]))
    try:
        with torch.no_grad():
            return _loss(model, batch).item()
    finally:
        handle.remove()


def test_layer_scores_match_finite_differences_of_the_gate():
    model = _model("BertForSequenceClassification", "minilm")  # three layers
    batches = _batches()
    layers = len(encoder_layers(model))
    first = torch.zeros(layers, dtype=torch.float64)
    second = torch.zeros(layers, dtype=torch.float64)
    for batch in batches:
        for layer in range(layers):
            up, down = (_gated_loss(model, batch, layer, 1 + s * FD_STEP) for s in (1, -1))
            first[layer] += abs(up - down) / (2 * FD_STEP)
            up, mid, down = (_gated_loss(model, batch, layer, 1 + s * FD_STEP_SECOND) for s in (1, 0, -1))
            second[layer] += (up - 2 * mid + down) / FD_STEP_SECOND**2 / len(batches)  # of the mean loss
    taylor = layer_importance(model, batches, _loss, normalize=False, progress=False)
    torch.testing.assert_close(taylor, first, rtol=FD_RTOL, atol=0)
    torch.testing.assert_close(layer_importance(model, batches, _loss, progress=False), first / first.norm(),
                               rtol=FD_RTOL, atol=0)
    hessian = layer_importance(model, batches, _loss, method="hessian", progress=False)
    torch.testing.assert_close(hessian, second, rtol=FD_RTOL, atol=0)


def _exact_hessian(model, names, batches, loss_fn) -> torch.Tensor:
    """The Hessian of the mean loss over ``batches`` in the flattened, concatenated weights of ``names``."""
    weights = list(module_weights(model, names).values())
    sizes = [w.numel() for w in weights]
    identity = torch.eye(sum(sizes), dtype=torch.float64)
    total = torch.zeros_like(identity)
    with hessian_mode(model, weights):
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), weights, create_graph=True)
            # Row k of H is H e_k: all unit vectors at once (a vmap over the double backward).
            directions = [d.reshape(-1, *w.shape) for d, w in zip(identity.split(sizes, dim=1), weights)]
            products = torch.autograd.grad(grads, weights, grad_outputs=directions, is_grads_batched=True)
            total += torch.cat([p.flatten(1) for p in products], dim=1) / len(batches)
    return total


def _owners(view, pieces: dict[str, str], units: int) -> list[torch.Tensor]:
    """For each piece's weight, flattened: the unit owning each entry (rows: blocks of rows; columns:
    blocks of columns)."""
    owners = []
    for piece, layout in pieces.items():
        out_features, in_features = view.modules[piece].weight.shape
        if layout == "rows":
            owner = (torch.arange(out_features) // (out_features // units))[:, None].expand(-1, in_features)
        else:
            owner = (torch.arange(in_features) // (in_features // units))[None, :].expand(out_features, -1)
        owners.append(owner.flatten())
    return owners


UNITS = {
    "heads": (head_importance, {"query": "rows", "key": "rows", "value": "rows", "out": "columns"},
              lambda view: view.heads),
    "neurons": (neuron_importance, {"up": "rows", "down": "columns"}, lambda view: view.intermediate),
}


def _decayed_loss(model, batch):
    """The task loss plus WEIGHT_DECAY / 2 * ||W||^2 over every layer's six linear weights: Hessian + c I."""
    weights = [view.modules[piece].weight for view in encoder_layers(model) for piece in PIECES]
    return _loss(model, batch) + WEIGHT_DECAY / 2 * sum(w.pow(2).sum() for w in weights)


@pytest.mark.parametrize("unit", list(UNITS))
def test_hessian_scores_estimate_the_exact_slice_traces(unit):
    importance, pieces, units_of = UNITS[unit]
    model = _model(**SMALL)
    views = encoder_layers(model)
    batches = _batches()
    names = [view.names[piece] for view in views for piece in pieces]  # the order the probes are drawn in
    hessian = _exact_hessian(model, names, batches, _decayed_loss)
    # The same Rademacher probes as the estimator (one generator, drawn per weight in this order).
    generator = torch.Generator().manual_seed(SEED)
    weights = module_weights(model, names)
    samples = torch.zeros(hessian.shape[0], dtype=torch.float64)
    magnitude = torch.zeros_like(samples)
    for _ in range(HUTCHINSON_PROBES):
        z = torch.cat([rademacher(w, generator).double().flatten() for w in weights.values()])
        samples += z * (hessian @ z) / HUTCHINSON_PROBES
        magnitude += (hessian.abs() @ z.abs()) / HUTCHINSON_PROBES
    # The layer and the unit owning each flattened coordinate, in the order of ``names``.
    unit_of = torch.cat([o for view in views for o in _owners(view, pieces, units_of(view))])
    layer_of = torch.cat([torch.full_like(o, layer) for layer, view in enumerate(views)
                          for o in _owners(view, pieces, units_of(view))])
    scores = importance(model, batches, _decayed_loss, method="hessian", probes=HUTCHINSON_PROBES, seed=SEED,
                        progress=False)
    for layer, view in enumerate(views):
        owners = _owners(view, pieces, units_of(view))
        for u in range(units_of(view)):
            inside = (layer_of == layer) & (unit_of == u)
            block = hessian[inside][:, inside]
            squares = sum(view.modules[p].weight.detach().pow(2).flatten()[o == u].sum().item()
                          for p, o in zip(pieces, owners))
            factor = squares / inside.sum().item()  # ||W_u||^2 / n_u
            score = scores[layer][u].item()
            # Same probes: the estimator's arithmetic exactly, up to BlockHVP's float32 products.
            assert score == pytest.approx(samples[inside].sum().item() * factor, rel=0,
                                          abs=FLOAT32_ROUNDING * magnitude[inside].sum().item() * factor)
            # Within Hutchinson's error of the exact trace. One joint probe's sample z_u^T (H z)_u has
            # Var = 2 (||H_uu||_F^2 - sum diag^2) + ||H_u,rest||_F^2 (Rademacher z).
            variance = (2 * (block.pow(2).sum() - block.diagonal().pow(2).sum())
                        + hessian[inside][:, ~inside].pow(2).sum()).item()
            error = HUTCHINSON_SIGMAS * math.sqrt(variance / HUTCHINSON_PROBES) * factor
            assert score == pytest.approx(block.diagonal().sum().item() * factor, rel=0, abs=error), (layer, u)
            assert error < abs(score) / 10  # the decay term makes the check sharp


def test_a_head_with_zero_weights_scores_zero():
    model = _model(**SMALL)
    view = encoder_layers(model)[0]
    rows = slice(view.head_size, 2 * view.head_size)  # head 1
    with torch.no_grad():
        for piece in ("query", "key", "value"):
            view.modules[piece].weight[rows] = 0
        view.out.weight[:, rows] = 0
    hessian = head_importance(model, _batches(1), _loss, method="hessian", probes=4, progress=False)
    taylor = head_importance(model, _batches(1), _loss, normalize=False, progress=False)
    assert hessian[0][1].item() == 0 and taylor[0][1].item() == 0
    assert hessian[0][0].item() != 0 and taylor[0][0].item() != 0


def test_hessian_scores_are_seeded_and_not_normalized_by_default():
    model = _model(**SMALL)
    batches = _batches(1)
    first = head_importance(model, batches, _loss, method="hessian", probes=3, seed=7, progress=False)
    again = head_importance(model, batches, _loss, method="hessian", probes=3, seed=7, progress=False)
    other = head_importance(model, batches, _loss, method="hessian", probes=3, seed=8, progress=False)
    normalized = head_importance(model, batches, _loss, method="hessian", probes=3, seed=7, normalize=True,
                                 progress=False)
    for a, b, c, n in zip(first, again, other, normalized):
        assert torch.equal(a, b) and not torch.equal(a, c)
        torch.testing.assert_close(n, a / a.norm(), **FLOAT64)


def test_scoring_restores_the_model():
    model = _model()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    attention = model.config._attn_implementation
    head_importance(model, _batches(1), _loss, method="hessian", probes=2, progress=False)
    layer_importance(model, _batches(1), _loss, method="hessian", progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation == attention
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: head_importance(m, _batches(1), method="fisher"), r"method must be one of \['taylor', 'hessian'\]"),
    (lambda m: neuron_importance(m, _batches(1), method="hessian", probes=0), "probes must be a positive int"),
    (lambda m: layer_importance(m, [], _loss), "needs calibration batches"),
    (lambda m: head_importance(m, None), "needs calibration batches"),
], ids=["method", "probes", "empty", "none"])
def test_bad_arguments(call, match):
    with pytest.raises(PruneError, match=match):
        call(_model(**SMALL))


def test_albert_is_refused():
    with pytest.raises(PruneError, match="ALBERT"):
        head_importance(tiny.build("AlbertForSequenceClassification"), _batches(1), progress=False)
