"""Structured pruning surgery (qbert.prune.structure) on tiny random encoders of every supported family."""

import copy
import json

import pytest
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import qbert
from qbert.prune.structure import (
    PruneError,
    apply_structure,
    encoder_layers,
    layer_flops,
    layer_parameters,
    pruning_record,
    remove_heads,
    remove_layers,
    remove_neurons,
)
from tests.nn import _tiny_models as tiny

FAMILIES = ("bert", "minilm", "roberta", "electra", "distilbert")
FUSED_FAMILIES = ("bert", "minilm", "roberta", "electra")
# Tier: same math in float64. Not bitwise: a pruned GEMM sums fewer terms than the masked one (which adds
# exact zeros), so its blocking and summation order differ; that moves results by a few ulps (~1e-16
# relative), well inside this tolerance after two or three layers.
FLOAT64 = {"rtol": 1e-12, "atol": 1e-12}
# Tier: quality, as tests/nn/test_quantize.py (model-level SQNR against the float model).
MIN_MODEL_SQNR_DB = {"w8a8": 25, "w4a16": 15}
# Tier: same math in float, as tests/nn/test_fused.py (fused chain against the unfused path).
SAME_MATH_TOLERANCE = 1e-3
FLOP_SEQ = 7  # tokens of the sequence the FLOP counter runs


def _model(family: str, dtype=torch.float64) -> nn.Module:
    return tiny.build(tiny.BASE_MODELS[family], family).to(dtype)


def _out(model: nn.Module) -> torch.Tensor:
    return tiny.first_output(model)


def _request(model: nn.Module) -> tuple[dict, dict]:
    """Heads and neurons to remove: a different number in the first and the last layer."""
    views = encoder_layers(model)
    last = len(views) - 1
    heads = {0: [1], last: [0, 2, 3]}
    neurons = {0: [0, 5, 17], last: list(range(0, views[last].intermediate, 2))}
    return heads, neurons


def _head_columns(heads, head_size: int) -> list[int]:
    return [j * head_size + t for j in heads for t in range(head_size)]


def _zero_input_columns(module: nn.Module, columns: list[int]):
    """Masks ``columns`` of the module's input (a forward pre-hook)."""
    def hook(_, args):
        x = args[0].clone()
        x[..., columns] = 0
        return (x, *args[1:])
    return module.register_forward_pre_hook(hook)


def _masked(model: nn.Module, heads: dict, neurons: dict) -> nn.Module:
    """A copy of ``model`` with those heads masked at the input of o and those neurons at the input of down."""
    masked = copy.deepcopy(model)
    views = encoder_layers(masked)
    for layer, indices in heads.items():
        _zero_input_columns(views[layer].out, _head_columns(indices, views[layer].head_size))
    for layer, indices in neurons.items():
        _zero_input_columns(views[layer].down, list(indices))
    return masked


class _Skip(nn.Module):
    """An encoder layer replaced by the identity."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Wrapper(nn.Module):
    """A task model around the encoder that shares its config (as benchmarks' MeanPoolClassifier)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert, self.config = bert, bert.config
        self.classifier = nn.Linear(bert.config.hidden_size, 2)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("class_name", "family", "prefix"), [
    ("BertForSequenceClassification", "bert", "bert.encoder.layer"),
    ("RobertaForMaskedLM", "roberta", "roberta.encoder.layer"),
    ("DistilBertForQuestionAnswering", "distilbert", "distilbert.transformer.layer"),
])
def test_views_name_every_piece(class_name, family, prefix):
    model = tiny.build(class_name, family)
    views = encoder_layers(model)
    assert [view.index for view in views] == list(range(tiny.LAYERS))
    for view in views:
        assert view.name == f"{prefix}.{view.index}" and model.get_submodule(view.name) is view.layer
        assert (view.heads, view.head_size, view.intermediate, view.hidden) == (
            tiny.HEADS, tiny.HIDDEN // tiny.HEADS, tiny.FFN, tiny.HIDDEN)
        for piece in ("query", "key", "value", "out", "up", "down"):
            assert model.get_submodule(view.names[piece]) is getattr(view, piece) is view.modules[piece]
            assert view.names[piece].startswith(view.name + ".")


def test_a_wrapper_shares_the_encoders_config():
    wrapper = _Wrapper(_model("bert"))
    assert encoder_layers(wrapper)[0].names["out"] == "bert.encoder.layer.0.attention.output.dense"
    remove_heads(wrapper, {1: [2]})
    assert pruning_record(wrapper) == pruning_record(wrapper.bert) == {
        "version": 1, "heads": [tiny.HEADS, tiny.HEADS - 1], "intermediate": [tiny.FFN] * tiny.LAYERS}


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zeroed_heads_and_neurons_keeps_outputs(family):
    model = _model(family)
    heads, neurons = _request(model)
    views = encoder_layers(model)
    with torch.no_grad():
        for layer, indices in heads.items():
            columns = _head_columns(indices, views[layer].head_size)
            views[layer].out.weight[:, columns] = 0
            for piece in ("query", "key", "value"):
                views[layer].modules[piece].weight[columns] = 0
                views[layer].modules[piece].bias[columns] = 0
        for layer, indices in neurons.items():
            views[layer].up.weight[indices] = 0
            views[layer].up.bias[indices] = 0
            views[layer].down.weight[:, indices] = 0
    expected = _out(model)
    remove_heads(model, heads)
    remove_neurons(model, neurons)
    torch.testing.assert_close(_out(model), expected, **FLOAT64)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_masked(family, attention):
    model = _model(family)
    model.set_attn_implementation(attention)
    heads, neurons = _request(model)
    masked = _masked(model, heads, neurons)
    remove_heads(model, heads)
    remove_neurons(model, neurons)
    views = encoder_layers(model)
    assert [view.heads for view in views[:1] + views[-1:]] == [tiny.HEADS - 1, tiny.HEADS - 3]
    assert model.config._attn_implementation == attention
    torch.testing.assert_close(_out(model), _out(masked), **FLOAT64)


def test_a_gate_of_zero_is_a_removed_head():
    # A head whose gate is zero (its slice of o's input scaled by 0) contributes nothing: pruning it
    # changes nothing, and the remaining heads keep their order (remove layer 1's head 0, then head 1 of
    # the three left, which was head 2).
    model = _model("bert")
    gated = _masked(model, {1: [0, 2]}, {})
    remove_heads(model, {1: [0]})
    remove_heads(model, {1: [1]})
    torch.testing.assert_close(_out(model), _out(gated), **FLOAT64)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_layer_is_the_identity(family):
    model = _model(family)
    skipped = copy.deepcopy(model)
    layers = encoder_layers(skipped)
    owner = skipped.get_submodule(layers[0].name.rpartition(".")[0])
    owner[0] = _Skip()
    remove_layers(model, [0])
    torch.testing.assert_close(_out(model), _out(skipped), **FLOAT64)
    remaining = len(layers) - 1
    field = "n_layers" if family == "distilbert" else "num_hidden_layers"
    assert getattr(model.config, field) == remaining == len(encoder_layers(model))
    assert len(pruning_record(model)["heads"]) == remaining
    if family == "distilbert":
        assert model.transformer.n_layers == remaining
    else:
        assert [view.attention.layer_idx for view in encoder_layers(model)] == list(range(remaining))


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts(family):
    model = _model(family)
    views = encoder_layers(model)
    h, d = views[0].hidden, views[0].head_size
    heads, neurons = _request(model)
    before = _count(model)
    remove_heads(model, heads)
    remove_neurons(model, neurons)
    removed_heads = sum(map(len, heads.values()))
    removed_neurons = sum(map(len, neurons.values()))
    per_head = 3 * (h * d + d) + d * h  # q/k/v rows and biases, o columns
    per_neuron = 2 * h + 1  # a row of up with its bias, a column of down
    assert before - _count(model) == removed_heads * per_head + removed_neurons * per_neuron
    for view in encoder_layers(model):
        by_hand = sum(p.numel() for module in view.modules.values() for p in module.parameters())
        assert layer_parameters(view) == by_hand
        width, n = view.heads * d, view.intermediate
        assert by_hand == 3 * (h * width + width) + (width * h + h) + (h * n + n) + (n * h + h)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_layer_flops_count_the_matmuls(family):
    # The hand count: torch's FLOP counter (2 per multiply-accumulate of every mm / bmm) over one layer's
    # eager forward on one sequence.
    model = _model(family)
    model.set_attn_implementation("eager")
    heads, neurons = _request(model)
    remove_heads(model, heads)
    remove_neurons(model, neurons)
    for view in encoder_layers(model):
        x = torch.randn(1, FLOP_SEQ, view.hidden, dtype=torch.float64)
        with FlopCounterMode(display=False) as counter:
            view.layer(x)
        assert layer_flops(view, FLOP_SEQ) == counter.get_total_flops()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_record_follows_every_remove(family):
    model = _model(family)
    assert pruning_record(model) is None
    remove_heads(model, {0: [3], 1: torch.tensor([0, 1])})  # tensors of indices are accepted
    assert pruning_record(model) == {"version": 1, "heads": [3, 2], "intermediate": [tiny.FFN] * 2}
    remove_neurons(model, {1: range(10)})
    assert pruning_record(model) == {"version": 1, "heads": [3, 2], "intermediate": [tiny.FFN, tiny.FFN - 10]}
    remove_layers(model, [0])
    expected = {"version": 1, "heads": [2], "intermediate": [tiny.FFN - 10]}
    assert pruning_record(model) == expected
    assert json.loads(model.config.to_json_string())["qbert_pruning"] == expected
    restored = type(model.config).from_dict(json.loads(model.config.to_json_string()))
    assert restored.qbert_pruning == expected
    # The record returned is a copy.
    pruning_record(model)["heads"][0] = 1
    assert pruning_record(model) == expected


def _pruned(family: str) -> nn.Module:
    model = _model(family)
    heads, neurons = _request(model)
    remove_heads(model, heads)
    remove_neurons(model, neurons)
    remove_layers(model, [1])
    return model


def _shapes(model: nn.Module) -> dict:
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_structure_rebuilds_the_pruned_model(family):
    pruned = _pruned(family)
    fresh = type(pruned)(copy.deepcopy(pruned.config)).to(torch.float64).eval()
    assert apply_structure(fresh) is fresh
    assert _shapes(fresh) == _shapes(pruned)
    fresh.load_state_dict(pruned.state_dict())
    # Tier: exact: the same values in the same shapes through the same ops.
    torch.testing.assert_close(_out(fresh), _out(pruned), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_apply_structure_on_the_meta_device(family):
    pruned = _pruned(family)
    with torch.device("meta"):
        fresh = type(pruned)(copy.deepcopy(pruned.config)).to(torch.float64)
    apply_structure(fresh)
    assert _shapes(fresh) == _shapes(pruned)
    assert all(tensor.is_meta for tensor in fresh.state_dict().values())


def test_apply_structure_keeps_flags_and_takes_an_explicit_record():
    pruned = _pruned("bert")
    fresh = type(pruned)(transformers.BertConfig(**{**tiny._COMMON, "num_hidden_layers": 1})).train()
    fresh.encoder.layer[0].attention.self.query.weight.requires_grad_(False)
    apply_structure(fresh, pruning_record(pruned))
    assert fresh.config.qbert_pruning == pruning_record(pruned)
    assert _shapes(fresh) == _shapes(pruned)
    query = fresh.encoder.layer[0].attention.self.query
    assert query.training and not query.weight.requires_grad and query.bias.requires_grad
    assert query.weight.dtype == torch.float32
    assert apply_structure(fresh) is fresh and _shapes(fresh) == _shapes(pruned)  # already that shape


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_apply_structure_without_a_record_changes_nothing(family):
    model = _model(family)
    shapes = _shapes(model)
    assert apply_structure(model) is model and _shapes(model) == shapes


def test_pruning_keeps_dtype_device_and_flags():
    model = _model("bert").train()
    model.encoder.layer[0].attention.self.value.bias.requires_grad_(False)
    remove_heads(model, {0: [0]})
    remove_neurons(model, {0: [0]})
    value, down = model.encoder.layer[0].attention.self.value, model.encoder.layer[0].output.dense
    for linear in (value, down):
        assert type(linear) is nn.Linear and linear.training and linear.weight.dtype == torch.float64
        assert linear.weight.device.type == "cpu" and linear.weight.requires_grad
    assert not value.bias.requires_grad and down.bias.requires_grad


REFUSED_REMOVALS = [
    pytest.param(remove_heads, {2: [0]}, r"layer 2 out of range: the encoder has 2 layers \(0..1\)", id="layer"),
    pytest.param(remove_heads, {-1: [0]}, "layer -1 out of range", id="negative-layer"),
    pytest.param(remove_heads, {0: [4]}, r"layer 0: head 4 out of range: there are 4 heads \(0..3\)", id="head"),
    pytest.param(remove_heads, {0: [1, 1]}, "layer 0: head 1 listed twice", id="head-twice"),
    pytest.param(remove_heads, {0: [0, 1, 2, 3]}, "removing all 4 heads .* use remove_layers", id="every-head"),
    pytest.param(remove_heads, {0: 1}, "expected an iterable of head indices, got 1", id="not-iterable"),
    pytest.param(remove_heads, {0: [1.0]}, "a head index must be an int index, got 1.0", id="float-head"),
    pytest.param(remove_heads, {True: [0]}, "a layer index must be an int index, got True", id="bool-layer"),
    pytest.param(remove_heads, [0], "expected a mapping layer index -> head indices, got list", id="not-mapping"),
    pytest.param(remove_neurons, {1: [tiny.FFN]}, "neuron 128 out of range: there are 128 neurons",
                 id="neuron"),
    pytest.param(remove_neurons, {1: range(tiny.FFN)}, "removing all 128 neurons .* use remove_layers",
                 id="every-neuron"),
    pytest.param(remove_layers, [0, 1], "removing all 2 layers leaves no encoder", id="every-layer"),
    pytest.param(remove_layers, [2], r"layer 2 out of range: there are 2 layers \(0..1\)", id="layer-range"),
    pytest.param(remove_layers, [1, 1], "layer 1 listed twice", id="layer-twice"),
]


@pytest.mark.parametrize(("remove", "request_", "match"), REFUSED_REMOVALS)
def test_refused_removals_change_nothing(remove, request_, match):
    model = _model("bert")
    shapes = _shapes(model)
    with pytest.raises(PruneError, match=match):
        remove(model, request_)
    assert _shapes(model) == shapes and pruning_record(model) is None


def test_a_refusal_in_a_later_layer_leaves_the_earlier_ones():
    model = _model("bert")
    shapes = _shapes(model)
    with pytest.raises(PruneError, match="layer 1: head 9 out of range"):
        remove_heads(model, {0: [1], 1: [9]})
    assert _shapes(model) == shapes


@pytest.mark.parametrize("remove", [
    lambda m: remove_heads(m, {0: [0]}), lambda m: remove_neurons(m, {0: [0]}), lambda m: remove_layers(m, [0]),
    lambda m: apply_structure(m, {"version": 1, "heads": [4, 4], "intermediate": [128, 128]}),
], ids=["heads", "neurons", "layers", "apply"])
def test_quantized_models_are_refused(remove):
    model = qbert.quantize(_model("bert", torch.float32), "w8a8")
    with pytest.raises(PruneError, match=r"encoder.layer.0.attention.self.query is a QLinear, not a plain "
                                         r"nn.Linear: prune before quantize / prepare_qat"):
        remove(model)


def test_other_families_are_refused():
    with pytest.raises(PruneError, match="ALBERT shares one layer across every depth"):
        remove_heads(_model("albert"), {0: [0]})
    with pytest.raises(PruneError, match="ALBERT"):
        encoder_layers(_model("albert"))
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10))
    with pytest.raises(PruneError, match=r"model_type 'gpt2' is not supported; supported families: "
                                         r"\['bert', 'distilbert', 'electra', 'roberta'\]"):
        remove_neurons(gpt2, {0: [0]})
    with pytest.raises(PruneError, match="no Hugging Face config .* in Linear"):
        encoder_layers(nn.Linear(2, 2))


GOOD = {"version": 1, "heads": [3, 1], "intermediate": [125, 64]}
BAD_RECORDS = [
    pytest.param([1, 2], "the record must be a dict, got list", id="not-dict"),
    pytest.param({**GOOD, "version": 2}, "record field 'version' must be 1, got 2", id="version"),
    pytest.param({k: v for k, v in GOOD.items() if k != "heads"}, "exactly the fields", id="missing"),
    pytest.param({**GOOD, "layers": [0]}, "exactly the fields", id="unknown"),
    pytest.param({**GOOD, "heads": [3]}, "'heads' has 1 entries, the model has 2 layers", id="length"),
    pytest.param({**GOOD, "heads": "31"}, "'heads' must be a list, got str", id="not-list"),
    pytest.param({**GOOD, "heads": [0, 1]}, r"'heads'\[0\] must be an int in 1..4 \(the built size\), got 0",
                 id="zero"),
    pytest.param({**GOOD, "heads": [3, 5]}, r"'heads'\[1\] must be an int in 1..4", id="too-many"),
    pytest.param({**GOOD, "intermediate": [125, 64.0]}, r"'intermediate'\[1\] must be an int in 1..128",
                 id="float"),
    pytest.param({**GOOD, "heads": [True, 1]}, r"'heads'\[0\] must be an int", id="bool"),
]


@pytest.mark.parametrize(("record", "match"), BAD_RECORDS)
def test_bad_records_are_refused(record, match):
    model = _model("bert")
    shapes = _shapes(model)
    with pytest.raises(PruneError, match=match):
        apply_structure(model, record)
    assert _shapes(model) == shapes


def test_apply_structure_cannot_grow_a_layer():
    model = _model("bert")
    remove_heads(model, {0: [0, 1]})
    with pytest.raises(PruneError, match="encoder.layer.0 has 2 heads and 128 neurons, the record asks for 3 "
                                         "and 128: apply the record to a model freshly built"):
        apply_structure(model, {**GOOD, "heads": [3, 4], "intermediate": [128, 128]})


def test_layer_flops_needs_a_positive_seq_len():
    with pytest.raises(PruneError, match="seq_len must be a positive int, got 0"):
        layer_flops(encoder_layers(_model("bert"))[0], 0)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("mode", ["w8a8", "w4a16"])
def test_pruned_models_quantize(family, mode):
    model = _model(family, torch.float32)
    heads, neurons = _request(model)
    remove_heads(model, heads)
    remove_neurons(model, neurons)
    expected = _out(model)
    quantized = qbert.quantize(copy.deepcopy(model), mode)
    assert tiny.sqnr_db(expected, _out(quantized)) >= MIN_MODEL_SQNR_DB[mode]
    if mode == "w8a8" and family in FUSED_FAMILIES:
        pieces = ("attention.self", "attention.output", "intermediate", "output")
        assert set(quantized.qbert_summary.fused) == {
            f"encoder.layer.{i}.{piece}" for i in range(tiny.LAYERS) for piece in pieces}
        unfused = qbert.quantize(copy.deepcopy(model), mode, fuse=False)
        with qbert.use_backend("reference"):
            fused_out, unfused_out = _out(quantized), _out(unfused)
        assert (fused_out - unfused_out).abs().max() <= SAME_MATH_TOLERANCE * unfused_out.abs().max()
