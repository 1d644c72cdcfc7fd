import copy

import pytest
import torch
from torch import nn

import qbert
from qbert.models import FAMILIES, generic_family, model_type_of
from qbert.models._family import first_match
from qbert.nn import FORMATS, QLinear
from tests.nn._tiny_models import BASE_MODELS, HEAD_MODELS, build, first_output, linear_names, sqnr_db

# Quality tier: the last hidden state of a quantized tiny random-init encoder against the fp32 model, by
# weight bits (lowest measured over the families: 42 dB at 8 bits, 21 at 4, 14.5 at 3, 8 at 2; ALBERT and
# ELECTRA are the lowest); the bounds leave a margin of >= 3 dB.
MIN_MODEL_SQNR_DB = {8: 25, 4: 15, 3: 10, 2: 5}
ALBERT_LAYERS = 4


def _head_linears(model: nn.Module) -> set[str]:
    heads = FAMILIES[model_type_of(model)].heads
    return {name for name in linear_names(model) if first_match(name, heads) is not None}


@pytest.mark.parametrize("class_name", HEAD_MODELS + ["BertModel"])
def test_family_heads_are_the_modules_outside_the_base_model(class_name):
    # The family glue agrees with the Hugging Face structure: heads are exactly the Linear layers that
    # are not part of model.base_model.
    model = build(class_name)
    generic_heads = generic_family(model).heads
    outside_base = {name for name in linear_names(model) if first_match(name, generic_heads) is not None}
    assert _head_linears(model) == outside_base


@pytest.mark.parametrize("class_name", HEAD_MODELS)
def test_swaps_every_body_linear_and_leaves_heads(class_name):
    model = build(class_name)
    heads = _head_linears(model)
    assert heads, "every tested head model has a Linear head"
    body = linear_names(model) - heads
    head_modules = {name: model.get_submodule(name) for name in heads}
    tied = model.get_output_embeddings() is not None

    assert qbert.quantize(model, "w8a8") is model
    assert linear_names(model, QLinear) == body
    assert linear_names(model) == heads
    assert all(model.get_submodule(name) is module for name, module in head_modules.items())
    if tied:  # the MLM decoder is a head and stays tied to the word embeddings
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    summary = model.qbert_summary
    assert (summary.mode, summary.family) == ("w8a8", model.config.model_type)
    assert set(summary.swapped) == body
    assert summary.kept_float == {name: "head" for name in heads}


@pytest.mark.parametrize("class_name", HEAD_MODELS)
def test_include_head_swaps_every_linear(class_name):
    model = build(class_name)
    every_linear = linear_names(model)
    qbert.quantize(model, "w8a16", include_head=True)
    assert linear_names(model) == set()
    assert linear_names(model, QLinear) == every_linear
    assert all(m.mode == "w8a16" for m in model.modules() if isinstance(m, QLinear))
    first_output(model, class_name)  # the fully quantized model runs


@pytest.mark.parametrize("mode", list(FORMATS))
@pytest.mark.parametrize("family", list(BASE_MODELS))
def test_last_hidden_state_sqnr(family, mode):
    # Tier: quality. Fixed seeds, eval mode, a padded batch.
    model = build(BASE_MODELS[family], family)
    expected = first_output(model)
    every_linear = linear_names(model)
    qbert.quantize(model, mode)
    assert linear_names(model, QLinear) == every_linear  # a base model has no heads
    assert sqnr_db(expected, first_output(model)) >= MIN_MODEL_SQNR_DB[FORMATS[mode].weight_bits]


@pytest.mark.parametrize("groups", [1, 2], ids=lambda g: f"{g}_groups")
def test_albert_keeps_one_shared_set_of_weights(groups):
    model = build("AlbertModel", num_hidden_layers=ALBERT_LAYERS, num_hidden_groups=groups)
    shared_linears = {id(m) for m in model.modules() if type(m) is nn.Linear}
    float_numel = sum(p.numel() for p in model.parameters())
    qbert.quantize(model, "w8a8")

    qlinears = [m for m in model.modules() if isinstance(m, QLinear)]  # modules() yields each object once
    assert len(qlinears) == len(shared_linears)
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    # One weight per QLinear: the parameters left are exactly the float ones outside the Linear layers.
    linear_numel = sum(q.w_q.numel() + (q.bias.numel() if q.bias is not None else 0) for q in qlinears)
    assert sum(p.numel() for p in model.parameters()) + linear_numel == float_numel
    # The sharing structure is unchanged: each group's layer runs num_hidden_layers / groups times.
    calls = {g: 0 for g in range(groups)}
    for g, group in enumerate(model.encoder.albert_layer_groups):
        query = group.albert_layers[0].attention.query
        assert isinstance(query, QLinear)
        query.register_forward_hook(lambda *args, g=g: calls.__setitem__(g, calls[g] + 1))
    first_output(model)
    assert calls == {g: ALBERT_LAYERS // groups for g in range(groups)}


class _TwoNamesForOneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.block = nn.Sequential(nn.ReLU(), self.first)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(self.block(self.first(x)))


def test_a_linear_with_two_names_becomes_one_qlinear():
    model = qbert.quantize(_TwoNamesForOneLinear(), "w8a8")
    assert isinstance(model.first, QLinear) and model.block[1] is model.first
    assert set(model.qbert_summary.swapped) == {"first", "block.1", "out"}
    assert model.qbert_summary.family == "generic"
    model(torch.randn(3, 16))


def test_a_shared_linear_stays_float_if_any_name_is_skipped():
    model = qbert.quantize(_TwoNamesForOneLinear(), "w8a8", skip=("block",))
    assert type(model.first) is nn.Linear and model.block[1] is model.first
    assert model.qbert_summary.kept_float == {"first": "skip: block", "block.1": "skip: block"}


@pytest.mark.parametrize("skip,kept", [
    pytest.param(("*.attention.*",), {f"encoder.layer.{i}.attention.{p}" for i in range(2)
                                      for p in ("self.query", "self.key", "self.value", "output.dense")},
                 id="glob"),
    pytest.param(("encoder.layer.0",), {f"encoder.layer.0.{p}" for p in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")}, id="subtree"),
])
def test_skip_patterns(skip, kept):
    model = build("BertModel")
    every_linear = linear_names(model)
    qbert.quantize(model, "w8a8", skip=skip)
    assert linear_names(model) == kept
    assert linear_names(model, QLinear) == every_linear - kept
    assert model.qbert_summary.kept_float == {name: f"skip: {skip[0]}" for name in kept}


def test_quantized_copy_leaves_the_original_alone():
    model = build("BertModel")
    before = linear_names(model)
    qbert.quantize(copy.deepcopy(model), "w8a8")
    assert linear_names(model) == before


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown quantization mode 'w4a4'; known modes: w8a8, w8a16, w4a16"):
        qbert.quantize(_TwoNamesForOneLinear(), "w4a4")


def test_skip_must_not_be_a_string():
    with pytest.raises(TypeError, match=r"skip must be a sequence of patterns.*skip=\('out',\)"):
        qbert.quantize(_TwoNamesForOneLinear(), "w8a8", skip="out")


def test_a_bare_linear_cannot_be_swapped_in_place():
    with pytest.raises(TypeError, match="use qbert.nn.QLinear.from_linear"):
        qbert.quantize(nn.Linear(4, 4))
