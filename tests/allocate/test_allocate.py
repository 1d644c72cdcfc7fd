"""allocate() on a tiny BERT: budgets, ties, the rank rules, the plan it writes and applies."""

from __future__ import annotations

import pytest
import torch

import qbert
from qbert.allocate import (
    MB,
    AllocationError,
    Budget,
    InfeasibleBudget,
    allocate,
    default_ties,
    measure_latency,
    quantizable_modules,
    uniform_size,
)
from qbert.nn import QLinear, linear_bytes, linear_format
from qbert.nn.plan import Plan
from tests.nn import _tiny_models as T

W2, W3, W4 = (linear_format(f"w{b}a16") for b in (2, 3, 4))
QKV = {"bert": ("attention.self.query", "attention.self.key", "attention.self.value"),
       "distilbert": ("attention.q_lin", "attention.k_lin", "attention.v_lin")}


@pytest.fixture
def model():
    return T.build("BertForSequenceClassification")


def _sensitivity(model, formats=(W2, W3, W4), seed=0):
    """Random positive Omega, falling with the width, per quantizable layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in quantizable_modules(model):
        base = torch.rand(1, generator=g).item() + 0.01
        out[name] = {f: base * 4.0 ** (-f.weight_bits) for f in formats}
    return out


def test_quantizable_modules_and_ties(model):
    names = quantizable_modules(model)
    assert len(names) == 6 * T.LAYERS + 1 and "bert.pooler.dense" in names and "classifier" not in names
    ties = default_ties(model)
    assert ties == [[f"bert.encoder.layer.{i}.{c}" for c in QKV["bert"]] for i in range(T.LAYERS)]


@pytest.mark.parametrize("family_class", ["DistilBertForMaskedLM", "AlbertForMaskedLM", "RobertaModel",
                                          "ElectraForPreTraining"])
def test_default_ties_cover_every_family(family_class):
    model = T.build(family_class)
    ties = default_ties(model)
    expected = T.LAYERS if family_class != "AlbertForMaskedLM" else 1  # ALBERT: one shared layer
    assert len(ties) == expected
    names = set(quantizable_modules(model))
    assert all(len(t) == 3 and set(t) <= names for t in ties)


@pytest.mark.parametrize("method", ["milp", "dp"])
def test_mixed_at_the_size_of_uniform_3_bits(model, method):
    budget = Budget(megabytes=uniform_size(model, W3) / MB)
    plan = allocate(model, _sensitivity(model), budget, ties=default_ties(model), method=method)
    assert plan.meta["bytes"] <= uniform_size(model, W3) == plan.meta["budget_bytes"]
    uniform_cost = sum(s[W3] for s in _sensitivity(model).values())
    assert plan.meta["objective"] <= uniform_cost
    for tie in default_ties(model):
        assert len({plan.layers[n] for n in tie}) == 1
    assert set(plan.layers) == set(quantizable_modules(model))
    assert plan.meta["method"] == method and plan.meta["budget"] == budget.describe()


def test_milp_and_dp_agree_and_bits_budget(model):
    sensitivity = _sensitivity(model, seed=3)
    budget = Budget(bits_per_weight=3.2)
    plans = [allocate(model, sensitivity, budget, method=m) for m in ("milp", "dp")]
    assert plans[0].layers == plans[1].layers
    assert plans[0].meta["bits_per_weight"] <= 3.2


def test_plan_round_trips_and_applies(model, tmp_path):
    plan = allocate(model, _sensitivity(model), Budget(bits_per_weight=3), ties=default_ties(model))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    qbert.quantize(model, loaded)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, QLinear)}
    assert {name: layer.format for name, layer in layers.items()} == plan.layers
    assert sum(r.total for r in linear_bytes(model) if r.names[0] in plan.layers) == plan.meta["bytes"]
    with torch.no_grad():
        assert torch.isfinite(model(**T.inputs()).logits).all()


def test_an_impossible_budget_names_the_smallest_size(model):
    smallest = uniform_size(model, W2)
    with pytest.raises(InfeasibleBudget, match=f"smallest achievable size {smallest} bytes .*bits/weight"):
        allocate(model, _sensitivity(model), Budget(megabytes=(smallest - 1) / MB))


@pytest.mark.parametrize("method,expect_high", [("rank", True), ("reverse", False)])
def test_rank_rules_give_the_higher_width_to_one_half(model, method, expect_high):
    sensitivity = _sensitivity(model, formats=(W2, W3))
    scores = {name: float(i) for i, name in enumerate(sensitivity)}  # later layers more sensitive
    plan = allocate(model, sensitivity, None, method=method, scores=scores)
    names = list(sensitivity)
    high = [n for n in names if plan.layers[n] == W3]
    assert len(high) == len(names) // 2
    top = sorted(names, key=scores.get, reverse=expect_high)[: len(names) // 2]
    assert set(high) == set(top)
    assert plan.meta["bytes"] < uniform_size(model, W3) and plan.meta["budget"] is None


def test_rank_default_score_and_ties(model):
    sensitivity = _sensitivity(model, formats=(W2, W3))
    plan = allocate(model, sensitivity, None, method="rank", ties=default_ties(model))
    gain = {n: s[W2] - s[W3] for n, s in sensitivity.items()}
    assert plan.meta["scores"] == gain
    for tie in default_ties(model):
        assert len({plan.layers[n] for n in tie}) == 1
    assert sum(plan.layers[n] == W3 for n in sensitivity) <= len(sensitivity) // 2


def test_latency_budget(model):
    names = quantizable_modules(model)[:2]
    sensitivity = {n: {W2: 2.0, W4: 1.0} for n in names}
    latency = {names[0]: {W2: 1.0, W4: 3.0}, names[1]: {W2: 1.0, W4: 5.0}}
    plan = allocate(model, sensitivity, Budget(megabytes=1, latency_us=4.0), latency=latency)
    assert plan.layers == {names[0]: W4, names[1]: W2} and plan.meta["latency_us"] == 4.0
    with pytest.raises(AllocationError, match="no latency table"):
        allocate(model, sensitivity, Budget(megabytes=1, latency_us=4.0))


def test_measure_latency_times_each_shape_once(model):
    names = quantizable_modules(model)[:4]  # Q, K, V (one shape) and the attention output
    latency = measure_latency(model, names, [W4], tokens=4, warmup=0, repeats=1, progress=False)
    assert set(latency) == set(names) and all(v[W4] > 0 for v in latency.values())
    assert latency[names[0]][W4] == latency[names[1]][W4] == latency[names[2]][W4]


@pytest.mark.parametrize("call,match", [
    (lambda m, s: allocate(m, s, Budget(bits_per_weight=3), method="greedy"), "unknown allocation method 'greedy'"),
    (lambda m, s: allocate(m, s, None), "method 'milp' needs a Budget"),
    (lambda m, s: allocate(m, s, Budget(bits_per_weight=3), method="rank"), "takes no budget"),
    (lambda m, s: allocate(m, {}, Budget(bits_per_weight=3)), "sensitivity is empty"),
    (lambda m, s: allocate(m, {"classifier.x": s[next(iter(s))]}, Budget(bits_per_weight=3)),
     "'classifier.x' is no module"),
    (lambda m, s: allocate(m, {"bert.encoder": s[next(iter(s))]}, Budget(bits_per_weight=3)),
     "a BertEncoder, not an nn.Linear"),
    (lambda m, s: allocate(m, s, Budget(bits_per_weight=3), ties=[["bert.encoder.layer.0.attention.self.query",
                                                                  "bert.encoder.layer.0.intermediate.dense"]]),
     r"\[64, 64\] and .*intermediate.dense' \[128, 64\] have different shapes"),
    (lambda m, s: allocate(m, s, Budget(bits_per_weight=3), ties=[["bert.pooler.dense", "classifier"]]),
     "'classifier' has no sensitivity"),
    (lambda m, s: allocate(m, s, Budget(bits_per_weight=3), ties=[["bert.pooler.dense"]]), "at least two"),
    (lambda m, s: allocate(m, s, Budget(bits_per_weight=3), ties=default_ties(m) + default_ties(m)[:1]),
     "appears in two ties"),
    (lambda m, s: allocate(m, s, None, method="rank"), "exactly two candidate formats"),
], ids=["method", "no-budget", "rank-budget", "empty", "unknown", "not-linear", "tie-shapes", "tie-unknown",
        "tie-single", "tie-twice", "rank-three"])
def test_errors_name_the_constraint(model, call, match):
    with pytest.raises(AllocationError, match=match):
        call(model, _sensitivity(model))
