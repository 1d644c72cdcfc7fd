"""Budgets and selection (qbert.prune.select): the lowest-scoring units go, the FLOP budget is solved
optimally (checked by brute force), summaries count what the model lost, bad budgets are refused."""

import copy
import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

import qbert
from qbert.prune import (
    PruneError,
    encoder_layers,
    head_importance,
    layer_flops,
    prune_ffn,
    prune_heads,
    prune_layers,
    remove_neurons,
)
from tests.nn import _tiny_models as tiny

SEQ = 16  # tokens at which FLOPs are counted in these tests
# solve_milp is optimal up to 1e-6 of the largest per-layer cost range (qbert.allocate.solvers); the
# scores here are O(1).
MILP_COST_TOLERANCE = 1e-6


def _model(family: str = "bert", class_name: str | None = None) -> nn.Module:
    return tiny.build(class_name or tiny.BASE_MODELS[family], family).double()


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(model: nn.Module) -> int:
    return sum(layer_flops(view, SEQ) for view in encoder_layers(model))


def _scores(sizes, seed: int = 0) -> list[torch.Tensor]:
    """Distinct random scores, some negative, one tensor per layer."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g, dtype=torch.float64) for size in sizes]


def _expected_lowest(scores, count: int, min_per_layer: int) -> dict[int, list[int]]:
    """Walk all units in ascending score order, taking each unless its layer would fall below the minimum."""
    order = sorted((s.item(), layer, j) for layer, row in enumerate(scores) for j, s in enumerate(row))
    removed: dict[int, list[int]] = {}
    for _, layer, j in order:
        if sum(map(len, removed.values())) == count:
            break
        if len(scores[layer]) - len(removed.get(layer, [])) > min_per_layer:
            removed.setdefault(layer, []).append(j)
    return {layer: sorted(indices) for layer, indices in removed.items()}


def test_count_removes_the_lowest_heads_subject_to_min_per_layer():
    model = _model()
    # Layer 0's heads all score lowest, so min_per_layer=2 stops at two of them and the third comes
    # from layer 1.
    scores = [torch.tensor([0.1, 0.4, 0.2, 0.3]), torch.tensor([0.9, 0.5, 0.8, 0.7])]
    summary = prune_heads(model, count=3, scores=scores, min_per_layer=2, seq_len=SEQ, progress=False)
    assert summary.removed == {0: [0, 2], 1: [1]} == _expected_lowest(scores, 3, 2)
    assert [view.heads for view in encoder_layers(model)] == [2, 3]
    assert summary.unit == "head" and summary.method == "given" and summary.count == 3


@pytest.mark.parametrize("seed", range(3))
def test_count_and_fraction_match_the_walk(seed):
    scores = _scores([tiny.HEADS] * tiny.LAYERS, seed)
    model = _model()
    summary = prune_heads(model, count=5, scores=scores, seq_len=SEQ, progress=False)
    assert summary.removed == _expected_lowest(scores, 5, 1)
    total = tiny.HEADS * tiny.LAYERS
    fraction = 0.3  # 2.4 of 8 heads: the nearest count is 2
    summary = prune_heads(_model(), fraction=fraction, scores=scores, seq_len=SEQ, progress=False)
    assert summary.count == round(fraction * total) == 2
    assert summary.removed == _expected_lowest(scores, 2, 1)


def test_summary_counts_the_model_before_and_after():
    model = _model("bert", "BertForSequenceClassification")
    views = encoder_layers(model)
    h, d = views[0].hidden, views[0].head_size
    parameters, flops = _parameters(model), _flops(model)
    summary = prune_heads(model, count=3, scores=_scores([tiny.HEADS] * tiny.LAYERS), seq_len=SEQ,
                          progress=False)
    assert (summary.parameters_before, summary.flops_before, summary.seq_len) == (parameters, flops, SEQ)
    assert summary.parameters_after == _parameters(model)
    assert summary.flops_after == _flops(model)
    # A head: d rows of Wq, Wk, Wv with their biases and d columns of Wo.
    assert parameters - summary.parameters_after == 3 * (3 * (h * d + d) + h * d)
    text = summary.describe()
    assert "pruned 3 heads (given scores)" in text and f"{parameters:,} -> {summary.parameters_after:,}" in text


def _brute_force_heads(scores, sizes, head_flops_of, max_flops, min_per_layer):
    """The least total removed score over every subset of heads whose encoder FLOPs fit."""
    best = math.inf
    for subsets in itertools.product(*(
            [c for k in range(size - min_per_layer + 1) for c in itertools.combinations(range(size), k)]
            for size in sizes)):
        kept = [size - len(s) for size, s in zip(sizes, subsets)]
        if sum(head_flops_of(layer, k) for layer, k in enumerate(kept)) <= max_flops:
            best = min(best, sum(scores[layer][j].item() for layer, s in enumerate(subsets) for j in s))
    return best


@pytest.mark.parametrize("min_per_layer", [1, 2])
@pytest.mark.parametrize("seed", range(2))
def test_max_flops_is_optimal(seed, min_per_layer):
    model = _model()
    views = encoder_layers(model)
    sizes = [view.heads for view in views]
    scores = _scores(sizes, seed)
    full = _flops(model)
    per_head = layer_flops(views[0], SEQ) - layer_flops(dataclasses.replace(views[0], heads=sizes[0] - 1), SEQ)
    max_flops = full - 2.5 * per_head  # at least three heads must go

    def flops_of(layer, kept):
        return layer_flops(dataclasses.replace(views[layer], heads=kept), SEQ)

    best = _brute_force_heads(scores, sizes, flops_of, max_flops, min_per_layer)
    summary = prune_heads(model, max_flops=max_flops, scores=scores, min_per_layer=min_per_layer,
                          seq_len=SEQ, progress=False)
    cost = sum(scores[layer][j].item() for layer, indices in summary.removed.items() for j in indices)
    assert cost == pytest.approx(best, abs=MILP_COST_TOLERANCE)
    assert summary.flops_after == _flops(model) <= max_flops
    assert summary.count >= 3 and all(view.heads >= min_per_layer for view in encoder_layers(model))


def test_max_flops_at_the_current_total_removes_only_negative_scores():
    # Removing a negatively scored head lowers the objective, so it goes even with FLOPs to spare.
    scores = [torch.tensor([0.5, -0.2, 0.3, 0.1]), torch.tensor([0.4, 0.6, 0.7, 0.8])]
    model = _model()
    summary = prune_heads(model, max_flops=_flops(model), scores=scores, seq_len=SEQ, progress=False)
    assert summary.removed == {0: [1]}


def _brute_force_ffn(scores, sizes, allowed, flops_of, max_flops):
    best = math.inf
    for kept in itertools.product(*allowed):
        if sum(flops_of(layer, k) for layer, k in enumerate(kept)) <= max_flops:
            best = min(best, sum(torch.sort(scores[layer]).values[:size - k].sum().item()
                                 for layer, (size, k) in enumerate(zip(sizes, kept))))
    return best


def test_prune_ffn_keeps_multiples():
    multiple = 16
    model = _model()
    remove_neurons(model, {0: [3, 4, 5]})  # layer 0: 125 neurons, so it loses at least 125 mod 16 = 13
    views = encoder_layers(model)
    sizes = [view.intermediate for view in views]
    assert sizes == [tiny.FFN - 3, tiny.FFN]
    scores = _scores(sizes)
    summary = prune_ffn(copy.deepcopy(model), count=13 + 2 * multiple, scores=scores, multiple_of=multiple,
                        seq_len=SEQ, progress=False)
    assert summary.count == 13 + 2 * multiple
    kept = {layer: size - len(summary.removed.get(layer, [])) for layer, size in enumerate(sizes)}
    assert all(k % multiple == 0 for k in kept.values())
    # Each layer loses its lowest-scoring neurons.
    for layer, indices in summary.removed.items():
        assert indices == sorted(torch.sort(scores[layer], stable=True).indices[:len(indices)].tolist())
    # fraction 0.3 of 253 neurons = 75.9: the nearest reachable count is 13 + 4 * 16 = 77.
    summary = prune_ffn(copy.deepcopy(model), fraction=0.3, scores=scores, multiple_of=multiple, progress=False)
    assert summary.count == 77
    with pytest.raises(PruneError, match=r"count=20 is not reachable with multiple_of=16: removable counts are "
                                         r"13 \+ multiples of 16 \(e.g. 13 or 29\)"):
        prune_ffn(copy.deepcopy(model), count=20, scores=scores, multiple_of=multiple, progress=False)
    # Under a FLOP budget: the optimum over every choice of kept multiples.
    allowed = [[k for k in range(size, 0, -1) if k % multiple == 0] for size in sizes]
    max_flops = _flops(model) * 0.6

    def flops_of(layer, kept):
        return layer_flops(dataclasses.replace(views[layer], intermediate=kept), SEQ)

    best = _brute_force_ffn(scores, sizes, allowed, flops_of, max_flops)
    pruned = copy.deepcopy(model)
    summary = prune_ffn(pruned, max_flops=max_flops, scores=scores, multiple_of=multiple, seq_len=SEQ,
                        progress=False)
    assert all(view.intermediate % multiple == 0 for view in encoder_layers(pruned))
    cost = sum(scores[layer][j].item() for layer, indices in summary.removed.items() for j in indices)
    assert cost == pytest.approx(best, abs=MILP_COST_TOLERANCE)
    assert summary.flops_after <= max_flops


def test_prune_layers_removes_the_lowest_layers():
    model = _model("minilm", "BertForSequenceClassification")  # three layers
    parameters = _parameters(model)
    layer_size = sum(p.numel() for p in encoder_layers(model)[0].layer.parameters())
    summary = prune_layers(model, count=2, scores=torch.tensor([0.3, 0.1, 0.2]), seq_len=SEQ, progress=False)
    assert summary.removed == [1, 2] and len(encoder_layers(model)) == 1
    assert summary.parameters_before - summary.parameters_after == 2 * layer_size == parameters - _parameters(model)
    assert summary.flops_after == _flops(model) and "removed layers [1, 2]" in summary.describe()
    summary = prune_layers(_model("minilm"), fraction=0.4, scores=[0.3, 0.1, 0.2], progress=False)
    assert summary.removed == [1]  # 1.2 of 3 layers: one


def test_scoring_on_batches():
    model = _model("bert", "BertForSequenceClassification")
    batches = [dict(tiny.inputs(), labels=torch.tensor([0, 1]))]
    scores = head_importance(model, batches, progress=False)
    summary = qbert.prune_heads(model, batches, count=2, seq_len=SEQ, progress=False)
    assert summary.method == "taylor" and summary.removed == _expected_lowest(scores, 2, 1)
    summary = qbert.prune_layers(model, batches, count=1, method="hessian", progress=False)
    assert summary.method == "hessian" and len(encoder_layers(model)) == 1


HEAD_SCORES = [torch.ones(tiny.HEADS), torch.ones(tiny.HEADS)]


def _smallest_flops() -> int:
    views = encoder_layers(_model())
    return sum(layer_flops(dataclasses.replace(view, heads=1), SEQ) for view in views)


BAD = [
    ("no budget", {}, r"give exactly one budget of count, fraction, max_flops, max_latency_us; got none"),
    ("two budgets", {"count": 1, "fraction": 0.5}, r"got count=1, fraction=0.5"),
    ("negative count", {"count": -1}, r"count must be a non-negative int, got -1"),
    ("float count", {"count": 1.0}, r"count must be a non-negative int, got 1.0"),
    ("too many", {"count": 7}, (r"count=7 is out of range: 0..6 of the 8 heads can be removed \(every layer "
                                r"keeps at least min_per_layer=1\)")),
    ("fraction 0", {"fraction": 0}, r"fraction must be a number in \(0, 1\), got 0"),
    ("fraction 1", {"fraction": 1.0}, r"fraction must be a number in \(0, 1\), got 1.0"),
    ("fraction big", {"fraction": 0.9}, (r"fraction=0.9 asks for 7.2 of 8 heads, but at most 6 can be "
                                         r"removed .* fraction <= 0.75")),
    ("max_flops 0", {"max_flops": 0}, r"max_flops must be a positive finite number, got 0"),
    ("max_flops low", {"max_flops": 1000}, r"max_flops=1,000 is below the smallest feasible total "
                                            + f"{_smallest_flops():,} FLOPs at seq_len={SEQ}"),
    ("min_per_layer 0", {"count": 1, "min_per_layer": 0}, r"min_per_layer must be an int in 1..4 .*got 0"),
    ("min_per_layer 5", {"count": 1, "min_per_layer": 5}, r"min_per_layer must be an int in 1..4 .*got 5"),
    ("seq_len", {"count": 1, "seq_len": 0}, r"seq_len must be a positive int, got 0"),
    ("method", {"count": 1, "method": "fisher"}, r"method must be one of"),
    ("layers", {"count": 1, "scores": HEAD_SCORES[:1]}, r"scores has 1 entries, the encoder has 2 layers"),
    ("length", {"count": 1, "scores": [torch.ones(3), torch.ones(4)]},
     r"scores\[0\] has shape \[3\], layer 0 has 4 heads \(expected \[4\]\)"),
    ("nan", {"count": 1, "scores": [torch.ones(4), torch.tensor([1, math.nan, 1, 1])]},
     r"scores\[1\] holds non-finite values"),
    ("tensor", {"count": 1, "scores": torch.ones(2, 4)}, r"scores must be a sequence of one 1-D tensor per layer"),
    ("no data", {"count": 1, "scores": None}, r"scoring needs calibration batches"),
    ("both", {"count": 1, "batches": [{}]}, r"scores= replaces the calibration data"),
]


@pytest.mark.parametrize(("kwargs", "match"), [(kw, m) for _, kw, m in BAD], ids=[name for name, _, _ in BAD])
def test_bad_head_budgets(kwargs, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"scores": HEAD_SCORES, "seq_len": SEQ, "progress": False} | kwargs
    batches = kwargs.pop("batches", None)
    with pytest.raises(PruneError, match=match):
        prune_heads(model, batches, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: prune_ffn(m, count=1, scores=[torch.ones(tiny.FFN)] * 2, multiple_of=0),
     r"multiple_of must be a positive int, got 0"),
    (lambda m: prune_ffn(m, count=1, scores=[torch.ones(tiny.FFN)] * 2, min_per_layer=tiny.FFN, multiple_of=3),
     r"layer 0 has 128 neurons: no count in min_per_layer=128..128 is a multiple of multiple_of=3"),
    (lambda m: prune_layers(m, count=2, scores=[1.0, 2.0]),
     r"count=2 is out of range: 0..1 of the 2 layers can be removed \(at least one layer stays\)"),
    (lambda m: prune_layers(m, fraction=0.8, scores=[1.0, 2.0]), r"at most 1 can be removed"),
    (lambda m: prune_layers(m, count=1, scores=[1.0, 2.0, 3.0]),
     r"scores has shape \[3\], the encoder has 2 layers \(expected \[2\]\)"),
    (lambda m: prune_layers(m, count=1), r"scoring needs calibration batches"),
], ids=["multiple_of", "no multiple", "layers count", "layers fraction", "layer scores", "layers no data"])
def test_bad_ffn_and_layer_budgets(call, match):
    with pytest.raises(PruneError, match=match):
        call(_model())
