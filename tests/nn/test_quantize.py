import copy

import pytest
import torch
from torch import nn

import qbert
from qbert.models import FAMILIES, generic_family, model_type_of
from qbert.models._family import first_match
from qbert.nn import FORMATS, QLinear
from qbert.nn.qat import prepare_qat
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


# --- no silent no-ops or wrong modes: every refusal happens before the model is changed ---

GPT2_SIZES = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64}
FAMILY_LIST = ", ".join(sorted(FAMILIES))


def _gpt2() -> nn.Module:
    # GPT-2's attention and MLP projections are transformers' Conv1D, not nn.Linear; lm_head is its head.
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_SIZES)).eval()


def _no_linear() -> nn.Module:
    return nn.Sequential(nn.Embedding(8, 16), nn.LayerNorm(16))


def _module_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize("make,kwargs,why", [
    pytest.param(_gpt2, {}, r"every nn.Linear stays in float: 'head' for 1 \(lm_head\); its other modules with "
                 r"weights, which qbert does not quantize: Conv1D, Embedding, LayerNorm", id="gpt2"),
    pytest.param(_gpt2, {"include_head": True, "skip": ("lm_head",)},
                 r"every nn.Linear stays in float: 'skip: lm_head' for 1 \(lm_head\)", id="gpt2-head-skipped"),
    pytest.param(_no_linear, {}, "it has no nn.Linear layer; its other modules with weights, which qbert does not "
                 "quantize: Embedding, LayerNorm", id="no-linear"),
    pytest.param(lambda: nn.Sequential(nn.ReLU()), {}, r"it has no nn.Linear layer\. ", id="no-weights"),
    pytest.param(lambda: build("BertForSequenceClassification"), {"skip": ("bert",)},
                 r"every nn.Linear stays in float: 'skip: bert' for 13 \(bert.encoder.layer.0.attention.self.query, "
                 r"bert.encoder.layer.0.attention.self.key, bert.encoder.layer.0.attention.self.value, \.\.\.\); "
                 r"'head' for 1 \(classifier\)", id="body-skipped-head-kept"),
    pytest.param(lambda: build("BertModel"), {"include_head": True, "skip": ("*",)},
                 r"every nn.Linear stays in float: 'skip: \*' for 13 ", id="all-skipped"),
    pytest.param(lambda: build("BertModel"), {"mode": {}}, "the plan lists no layers", id="empty-plan"),
])
def test_zero_quantizable_layers_is_an_error_naming_why(make, kwargs, why):
    model = make()
    before = _module_types(model)
    kwargs = {"mode": "w8a8", **kwargs}
    with pytest.raises(ValueError, match=f"quantize: zero layers could be quantized in {type(model).__name__}: "
                                         f"{why}") as info:
        qbert.quantize(model, **kwargs)
    message = str(info.value)
    assert "qbert quantizes the modules of exact type nn.Linear outside the task heads" in message
    assert f"supported families (config.model_type): {FAMILY_LIST}" in message
    assert _module_types(model) == before and not hasattr(model, "qbert_summary")


def test_prepare_qat_refuses_zero_layers_too():
    with pytest.raises(ValueError, match="prepare_qat: zero layers could be quantized in GPT2LMHeadModel"):
        qbert.nn.prepare_qat(_gpt2(), "w8a8")


def _quantized_twice(mode: str) -> nn.Module:
    return qbert.quantize(_TwoNamesForOneLinear(), mode)


def _with_a_qlinear() -> nn.Module:  # no qbert_summary: a QLinear placed by hand
    model = _TwoNamesForOneLinear()
    model.out = QLinear.from_linear(model.out, "w8a16")
    return model


def _converted() -> nn.Module:
    return qbert.nn.convert(qbert.nn.prepare_qat(_TwoNamesForOneLinear(), "w3a8"))


def _marker_only() -> nn.Module:  # qbert_summary without QLinear layers (e.g. a float model's attribute copied)
    model = _TwoNamesForOneLinear()
    model.qbert_summary = qbert.quantize(_TwoNamesForOneLinear(), "w2a16").qbert_summary
    return model


@pytest.mark.parametrize("make,mode,recorded", [
    pytest.param(lambda: _quantized_twice("w8a8"), "w8a8", "'w8a8', 2 QLinear layers", id="same-mode"),
    pytest.param(lambda: _quantized_twice("w8a8"), "w4a16", "'w8a8', 2 QLinear layers", id="other-mode"),
    pytest.param(lambda: _quantized_twice("w4a16"), {"out": "w8a8"}, "'w4a16 g128 asym', 2 QLinear", id="plan"),
    pytest.param(_with_a_qlinear, "w8a8", "'w8a16', 1 QLinear layers", id="qlinear-no-marker"),
    pytest.param(_converted, "w8a8", "'w3a8 g128 asym', 2 QLinear layers", id="qat-converted"),
    pytest.param(_marker_only, "w8a8", "'w2a16 g128 asym', 0 QLinear layers", id="marker-only"),
])
@pytest.mark.parametrize("caller", ["quantize", "prepare_qat"])
def test_an_already_quantized_model_is_refused(make, mode, recorded, caller):
    model = make()
    before = [(name, type(m).__name__, getattr(m, "format", None)) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match=f"{caller}: _TwoNamesForOneLinear is already quantized \\(mode "
                                         f"{recorded}.*quantize the float model instead"):
        getattr(qbert.nn, caller)(model, mode)
    assert [(name, type(m).__name__, getattr(m, "format", None)) for name, m in model.named_modules()] == before


def test_a_model_prepared_for_qat_is_refused():
    model = qbert.nn.prepare_qat(_TwoNamesForOneLinear(), "w4a16")
    with pytest.raises(ValueError, match=r"quantize: _TwoNamesForOneLinear is prepared for QAT \(FakeQuantLinear "
                                         r"layers, w4a16 g128 asym\); qbert.nn.convert\(model\) quantizes it"):
        qbert.quantize(model, "w8a8")
    assert not [m for m in model.modules() if isinstance(m, QLinear)]


BAD_OPTIONS = [
    ({"symmetric": "no"}, "symmetric", "bool or None", "str 'no'"),
    ({"symmetric": 1}, "symmetric", "bool or None", "int 1"),
    ({"group_size": True}, "group_size", "int or None", "bool True"),
    ({"group_size": 64.0}, "group_size", "int or None", "float 64.0"),
    ({"group_size": "64"}, "group_size", "int or None", "str '64'"),
    ({"row_groups": 2.0}, "row_groups", "int or None", "float 2.0"),
    ({"row_groups": False}, "row_groups", "int or None", "bool False"),
    ({"include_head": "yes"}, "include_head", "bool", "str 'yes'"),
    ({"include_head": None}, "include_head", "bool", "NoneType None"),
    ({"fuse": 0}, "fuse", "bool", "int 0"),
    ({"fuse": "false"}, "fuse", "bool", "str 'false'"),
    ({"skip": None}, "skip", r"a sequence \(tuple or list\) of str patterns", "NoneType None"),
    ({"skip": {"out"}}, "skip", r"a sequence \(tuple or list\) of str patterns", r"set \{'out'\}"),
    ({"skip": ("out", 3)}, r"skip\[1\]", "str", "int 3"),
    ({"mode": 8}, "mode", (r"a mode name \(str\), a LinearFormat, a qbert.Plan or a mapping of module "
                           r"name -> format"), "int 8"),
    ({"mode": None}, "mode", r"a mode name \(str\), a LinearFormat, .* -> format", "NoneType None"),
]


@pytest.mark.parametrize("kwargs,option,wanted,got", BAD_OPTIONS,
                         ids=[f"{key}-{type(value).__name__}" for kwargs, *_ in BAD_OPTIONS
                              for key, value in kwargs.items()])
def test_option_types_are_checked(kwargs, option, wanted, got):
    model = _TwoNamesForOneLinear()
    kwargs = {"mode": "w4a16", **kwargs}
    with pytest.raises(TypeError, match=f"quantize: {option} must be {wanted}, got {got}"):
        qbert.quantize(model, **kwargs)
    assert type(model.first) is nn.Linear and type(model.out) is nn.Linear


@pytest.mark.parametrize("kwargs,match", [
    ({"symmetric": "no"}, "linear_format: symmetric must be bool or None, got str 'no'"),
    ({"group_size": 32.0}, "linear_format: group_size must be int or None, got float 32.0"),
    ({"row_groups": True}, "linear_format: row_groups must be int or None, got bool True"),
    ({"mode": 4}, r"linear_format: mode must be a mode name \(str\) or a LinearFormat, got int 4"),
], ids=["symmetric", "group_size", "row_groups", "mode"])
def test_linear_format_checks_option_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        qbert.nn.linear_format(**{"mode": "w4a16", **kwargs})


@pytest.mark.parametrize("quantize", [qbert.quantize, prepare_qat], ids=["quantize", "prepare_qat"])
def test_a_skip_pattern_that_matches_no_module_is_refused(quantize):
    model = _TwoNamesForOneLinear()
    with pytest.raises(ValueError, match=r"skip pattern 'blokc' matches no module of _TwoNamesForOneLinear "
                                         r"\(module names look like first, block"):
        quantize(model, "w8a8", skip=("block", "blokc"))
    assert not any(isinstance(m, QLinear) for m in model.modules())
