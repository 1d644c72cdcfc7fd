"""Latency budgets for pruning (qbert.prune.latency and the max_latency_us budget of qbert.prune.select):
the table times copies of each layer at its candidate counts and leaves the model alone, the selection under
a latency table is optimal (checked by brute force on a synthetic table, since measured times are noisy),
and every misuse is refused."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import qbert
from qbert.nn.formats import linear_format
from qbert.prune import (
    LatencyTable,
    PruneError,
    encoder_layers,
    measure_layer_latency,
    prune_ffn,
    prune_heads,
    remove_heads,
    single_layer_encoder,
)
from tests.nn import _tiny_models as tiny

QUICK = {"batch": 1, "seq_len": 8, "warmup": 0, "repeats": 1, "progress": False}
MILP_COST_TOLERANCE = 1e-6  # as in test_select: solve_milp's guarantee for O(1) scores


def _model(family: str = "bert") -> nn.Module:
    return tiny.build(tiny.BASE_MODELS[family], family)


def _hidden(out) -> torch.Tensor:
    """The hidden states a layer (a tensor, or a tuple led by it) or an encoder (a ModelOutput) returns."""
    return out if isinstance(out, torch.Tensor) else out[0]


# ---- single_layer_encoder ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_single_layer_encoder_runs_a_copy_of_one_layer(family):
    model = _model(family)
    x = torch.randn(2, 5, tiny.HIDDEN)
    encoder = single_layer_encoder(model, 1)
    layer = encoder_layers(model)[1].layer
    assert len(next(iter(encoder.children()))) == 1
    assert all(p.data_ptr() != q.data_ptr() for p in encoder.parameters() for q in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(_hidden(encoder(x)), _hidden(layer(x)), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_single_layer_encoder_keeps_the_first_units(family):
    model = _model(family)
    expected = copy.deepcopy(model)
    remove_heads(expected, {0: [2, 3]})
    qbert.prune.remove_neurons(expected, {0: list(range(100, tiny.FFN))})
    x = torch.randn(2, 5, tiny.HIDDEN)
    encoder = single_layer_encoder(model, 0, heads=2, intermediate=100)
    assert encoder_layers(model)[0].heads == tiny.HEADS  # the model is untouched
    layer = encoder_layers(expected)[0].layer
    with torch.no_grad():
        got, want = _hidden(encoder(x)), _hidden(layer(x))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"index": 2}, "layer 2 out of range"),
    ({"index": 0, "heads": 0}, r"heads must be an int in 1\.\.4"),
    ({"index": 0, "intermediate": tiny.FFN + 1}, r"intermediate must be an int in 1\.\.128"),
    ({"index": 0, "heads": True}, "heads must be an int"),
])
def test_single_layer_encoder_refuses_bad_requests(kwargs, match):
    with pytest.raises(PruneError, match=match):
        single_layer_encoder(_model(), **kwargs)


# ---- measure_layer_latency -----------------------------------------------------------------------------

def test_the_table_covers_every_count_and_interpolates_between_timed_ones():
    model = _model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    table = measure_layer_latency(model, "neuron", points=3, **QUICK)
    assert table.unit == "neuron" and table.sizes == (tiny.FFN,) * tiny.LAYERS
    for layer in range(tiny.LAYERS):
        timed = table.timed[layer]
        assert len(timed) == 3 and (timed[0], timed[-1]) == (1, tiny.FFN) and 1 < timed[1] < tiny.FFN
        assert len(table.us[layer]) == tiny.FFN
        assert all(t > 0 for t in table.us[layer])
        values = [table.latency_us(layer, k) for k in timed]
        np.testing.assert_allclose(table.us[layer], np.interp(np.arange(1, tiny.FFN + 1), timed, values),
                                   rtol=1e-12)
    # Both layers have one shape, so they share their timed points.
    assert table.us[0] == table.us[1]
    assert table.total_us([tiny.FFN] * tiny.LAYERS) == pytest.approx(2 * table.us[0][-1])
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(type(m) is not qbert.nn.QLinear for m in model.modules())


def test_heads_are_all_timed_when_few():
    table = measure_layer_latency(_model("distilbert"), "head", **QUICK)
    assert table.timed == ((1, 2, 3, 4),) * tiny.LAYERS
    assert table.format == "float" and table.device == "cpu" and table.threads == torch.get_num_threads()


def test_layers_of_different_shapes_are_timed_apart():
    model = _model()
    remove_heads(model, {1: [0]})
    table = measure_layer_latency(model, "neuron", points=2, **QUICK)
    assert table.timed == ((1, tiny.FFN),) * tiny.LAYERS
    assert table.us[0] != table.us[1]  # two shapes, timed separately (equal medians are not plausible)


def test_a_format_times_the_quantized_layers():
    model = _model()
    table = measure_layer_latency(model, "head", format="w8a8", **QUICK)
    assert table.format == linear_format("w8a8").describe()
    assert table.describe().startswith(table.format)
    assert all(type(m) is nn.Linear for name, m in model.named_modules() if name.endswith("query"))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"unit": "layer"}, PruneError, "unit must be one of"),
    ({"unit": "head", "batch": 0}, PruneError, "batch must be a positive int"),
    ({"unit": "head", "seq_len": 1.5}, PruneError, "seq_len must be a positive int"),
    ({"unit": "head", "points": 1}, PruneError, r"points must be an int >= 2"),
    ({"unit": "head", "warmup": -1}, PruneError, "warmup must be a non-negative int"),
    ({"unit": "head", "format": "w5a16"}, ValueError, "w5a16"),
])
def test_bad_measurements_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        measure_layer_latency(_model(), **({"progress": False} | kwargs))


def test_a_quantized_model_cannot_be_timed_for_pruning():
    model = qbert.quantize(_model(), "w8a8", progress=False)
    with pytest.raises(PruneError, match="prune before quantize"):
        measure_layer_latency(model, "head", **QUICK)


# ---- selection under a latency budget ------------------------------------------------------------------

def _table(unit: str, sizes, us) -> LatencyTable:
    """A synthetic table: us[l][k - 1] microseconds for layer l keeping k units."""
    return LatencyTable(unit, tuple(sizes), tuple(tuple(row) for row in us), tuple(tuple(range(1, s + 1))
                        for s in sizes), batch=1, seq_len=8, format="float", device="cpu", threads=1)


def _uneven_head_table(seed: int) -> LatencyTable:
    """Per-layer latencies that rise with the head count at different, irregular rates: the cheapest
    heads to remove by score are not the ones that save the most time."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(tiny.LAYERS, tiny.HEADS, generator=g, dtype=torch.float64) * 100 + 10
    return _table("head", [tiny.HEADS] * tiny.LAYERS, torch.cumsum(steps, 1).tolist())


def _scores(sizes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, generator=g, dtype=torch.float64) for size in sizes]


@pytest.mark.parametrize("min_per_layer", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_max_latency_is_optimal(seed, min_per_layer):
    table = _uneven_head_table(seed)
    scores = _scores([tiny.HEADS] * tiny.LAYERS, seed)
    fewest, full = table.total_us([min_per_layer] * tiny.LAYERS), table.total_us(table.sizes)
    limit = (fewest + full) / 2
    best = math.inf
    for kept in itertools.product(range(min_per_layer, tiny.HEADS + 1), repeat=tiny.LAYERS):
        if table.total_us(kept) <= limit:
            cost = sum(torch.sort(s).values[:tiny.HEADS - k].sum().item() for s, k in zip(scores, kept))
            best = min(best, cost)
    model = _model()
    summary = prune_heads(model, scores=scores, max_latency_us=limit, latency=table, min_per_layer=min_per_layer,
                          progress=False)
    kept = [view.heads for view in encoder_layers(model)]
    cost = sum(scores[layer][j].item() for layer, indices in summary.removed.items() for j in indices)
    assert cost == pytest.approx(best, abs=MILP_COST_TOLERANCE)
    assert summary.latency_us_after == pytest.approx(table.total_us(kept)) and summary.latency_us_after <= limit
    assert summary.latency_us_before == pytest.approx(table.total_us(table.sizes))
    assert summary.latency == table.describe() and "encoder latency" in summary.describe()


def test_max_latency_on_ffn_neurons_keeps_multiples():
    sizes = [tiny.FFN] * tiny.LAYERS
    us = [[10.0 + (3.0 if layer else 1.0) * k for k in range(1, tiny.FFN + 1)] for layer in range(tiny.LAYERS)]
    table = _table("neuron", sizes, us)
    limit = 0.5 * table.total_us(sizes)
    model = _model()
    summary = prune_ffn(model, scores=_scores(sizes, 0), max_latency_us=limit, latency=table, multiple_of=32,
                        progress=False)
    kept = [view.intermediate for view in encoder_layers(model)]
    assert all(k % 32 == 0 for k in kept) and table.total_us(kept) <= limit
    assert summary.flops_after < summary.flops_before
    # The slower layer (3 us per neuron) gives up more neurons for the same scores' worth.
    assert kept[1] < kept[0]


def test_a_latency_budget_that_is_met_removes_nothing():
    table = _uneven_head_table(0)
    model = _model()
    summary = prune_heads(model, scores=_scores([tiny.HEADS] * tiny.LAYERS, 0),
                          max_latency_us=table.total_us(table.sizes), latency=table, progress=False)
    assert summary.count == 0 and summary.latency_us_after == summary.latency_us_before


def test_a_measured_table_drives_a_real_prune():
    # At the fastest total the table allows, every layer takes its fastest count (timings are noisy at
    # this size, so which count that is is read from the table, not assumed to be 1).
    model = _model()
    table = measure_layer_latency(model, "head", **QUICK)
    fastest = [min(range(1, tiny.HEADS + 1), key=lambda k, layer=layer: table.latency_us(layer, k))
               for layer in range(tiny.LAYERS)]
    summary = prune_heads(model, scores=_scores([tiny.HEADS] * tiny.LAYERS, 1),
                          max_latency_us=table.total_us(fastest), latency=table, progress=False)
    kept = [view.heads for view in encoder_layers(model)]
    assert summary.latency_us_after == pytest.approx(table.total_us(kept)) == pytest.approx(table.total_us(fastest))
    assert summary.count == tiny.LAYERS * tiny.HEADS - sum(kept)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_latency_us": 100.0}, "a max_latency_us budget needs latency="),
    ({"count": 1, "latency": "table"}, "latency= is used only by a max_latency_us budget"),
    ({"max_latency_us": 0, "latency": "table"}, "max_latency_us must be a positive finite number"),
    ({"max_latency_us": math.inf, "latency": "table"}, "max_latency_us must be a positive finite number"),
    ({"max_latency_us": 1.0, "latency": "table"}, "is below the smallest feasible total"),
    ({"max_latency_us": 1e9, "max_flops": 1e9, "latency": "table"}, "give exactly one budget"),
    ({"max_latency_us": 1e9, "latency": "neuron table"}, "measured for neurons, not heads"),
])
def test_bad_latency_budgets_are_refused(kwargs, match):
    tables = {"table": _uneven_head_table(0),
              "neuron table": _table("neuron", [tiny.FFN] * tiny.LAYERS, [[1.0] * tiny.FFN] * tiny.LAYERS)}
    if "latency" in kwargs:
        kwargs = kwargs | {"latency": tables[kwargs["latency"]]}
    model = _model()
    with pytest.raises(PruneError, match=match):
        prune_heads(model, scores=_scores([tiny.HEADS] * tiny.LAYERS, 0), progress=False, **kwargs)
    assert [view.heads for view in encoder_layers(model)] == [tiny.HEADS] * tiny.LAYERS


def test_a_table_from_before_an_earlier_prune_is_refused():
    model = _model()
    table = _uneven_head_table(0)
    remove_heads(model, {0: [1]})
    with pytest.raises(PruneError, match=r"measured for layers of \[4, 4\] heads; the encoder now has \[3, 4\]"):
        prune_heads(model, scores=_scores([3, 4], 0), max_latency_us=1e9, latency=table, progress=False)
