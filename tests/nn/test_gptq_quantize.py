"""qbert.quantize(..., rounding="gptq", calibration=...) on a tiny random BERT (qbert.nn.gptq)."""

import copy

import pytest
import torch
from torch import nn

import qbert
import qbert.nn.gptq as nn_gptq
from qbert.nn import QLinear, Rounding, linear_format
from qbert.nn.plan import Plan
from qbert.nn.qat import fake_quantize_weight
from qbert.quant.gptq import GPTQError, gptq_quantize, input_hessian, reconstruction_error
from tests.nn import _tiny_models as tiny
from tests.nn.test_fused import SAME_MATH_TOLERANCE

# One encoder layer keeps every GPTQ run to a few forwards: stages Q/K/V, attention output, FFN up, FFN
# down, pooler.
LAYERS = 1
CALIBRATION_BATCHES, CALIBRATION_SEED = 2, 1  # held-out inputs are tiny.inputs() (seed 0)
FORMAT = linear_format("w4a16")
PREFIX = "encoder.layer.0"
QKV = tuple(f"{PREFIX}.attention.self.{part}" for part in ("query", "key", "value"))
ATTENTION_OUT = f"{PREFIX}.attention.output.dense"
FFN_UP, FFN_DOWN = f"{PREFIX}.intermediate.dense", f"{PREFIX}.output.dense"
HESSIAN_RTOL = 1e-10  # one H accumulated batch by batch vs all tokens at once: float64 summation order


def _model(class_name: str = "BertModel") -> nn.Module:
    return tiny.build(class_name, "bert", num_hidden_layers=LAYERS)


def _calibration() -> list[dict[str, torch.Tensor]]:
    """Batches of token ids with padding, other than the held-out inputs."""
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    batches = []
    for _ in range(CALIBRATION_BATCHES):
        mask = torch.ones(tiny.BATCH, tiny.SEQ, dtype=torch.long)
        mask[1, tiny.SEQ - tiny.PADDED:] = 0
        batches.append({"input_ids": torch.randint(0, tiny.VOCAB, (tiny.BATCH, tiny.SEQ), generator=g),
                        "attention_mask": mask})
    return batches


def _gptq(model: nn.Module, mode=FORMAT, **options) -> nn.Module:
    return qbert.quantize(model, mode, rounding=options.pop("rounding", "gptq"), calibration=_calibration(),
                          progress=False, **options)


def _record_hessians(monkeypatch) -> dict[str, torch.Tensor]:
    """Wrap the gptq_quantize that quantize_sequentially calls: layer name -> the H it was given."""
    seen: dict[str, torch.Tensor] = {}

    def recording(weight, hessian, fmt, **options):
        seen[options["name"]] = hessian.clone()
        return gptq_quantize(weight, hessian, fmt, **options)

    monkeypatch.setattr(nn_gptq, "gptq_quantize", recording)
    return seen


@pytest.fixture(scope="module")
def float_model() -> nn.Module:
    return _model()


@pytest.fixture(scope="module")
def gptq_run(float_model) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the w4a16 GPTQ model, layer name -> the H GPTQ rounded it with)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        hessians = _record_hessians(monkeypatch)
        model = _gptq(copy.deepcopy(float_model))
    return model, hessians


def _float_inputs(model: nn.Module, name: str) -> torch.Tensor:
    """The inputs [tokens, K] of the module ``name`` over the calibration batches (eval, no gradients)."""
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            for batch in _calibration():
                model(**batch)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in captured])


def _codes(layer: QLinear) -> dict[str, torch.Tensor]:
    return {name: buffer for name, buffer in layer.named_buffers()}


def _assert_same_layer(a: QLinear, b: QLinear) -> None:
    assert a.format == b.format
    first, second = _codes(a), _codes(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).pow(2).mean().item()


def test_closer_to_float_than_round_to_nearest(float_model, gptq_run):
    # Tier: quality, on held-out inputs (measured: GPTQ's output MSE is ~0.4 of round to nearest's).
    gptq, _ = gptq_run
    rtn = qbert.quantize(copy.deepcopy(float_model), FORMAT)
    ref = tiny.first_output(float_model)
    assert _mse(tiny.first_output(gptq), ref) < _mse(tiny.first_output(rtn), ref)


def test_first_stage_hessian_is_the_float_models(float_model, gptq_run):
    # Q, K and V read the embeddings' output: their H is that of the float model's inputs (padding tokens
    # included), the same H for all three. GPTQ under the H computed here from all tokens at once gives
    # exactly the layers' codes (tier: exact; the two H differ by float64 summation order only, and no
    # code sits that close to a rounding boundary: measured).
    gptq, hessians = gptq_run
    h = input_hessian(_float_inputs(float_model, QKV[0]))
    for name in QKV:
        torch.testing.assert_close(hessians[name], h, rtol=HESSIAN_RTOL, atol=0)
        linear = float_model.get_submodule(name)
        expected = gptq_quantize(linear.weight, h, FORMAT, name=name)
        layer = gptq.get_submodule(name)
        assert torch.equal(layer.dequantized_weight(), expected.dequantized)
        assert reconstruction_error(linear.weight, layer.dequantized_weight(), h) <= reconstruction_error(
            linear.weight, fake_quantize_weight(linear.weight, FORMAT), h)


def test_every_layer_beats_round_to_nearest_on_its_inputs(float_model, gptq_run):
    # Tier: quality, per layer, under the H of the inputs GPTQ saw (those of the layers quantized before it).
    gptq, hessians = gptq_run
    assert set(hessians) == set(gptq.qbert_summary.swapped)
    for name, h in hessians.items():
        weight = float_model.get_submodule(name).weight
        error = reconstruction_error(weight, gptq.get_submodule(name).dequantized_weight(), h)
        assert error <= reconstruction_error(weight, fake_quantize_weight(weight, FORMAT), h), name


def test_later_stages_see_the_quantized_layers_before_them(float_model, gptq_run):
    # The attention output's H comes from the model whose Q, K and V are already GPTQ-quantized (the same
    # codes: their H is the float model's either way), not from the float model.
    _, hessians = gptq_run
    partial = _gptq(copy.deepcopy(float_model), {name: FORMAT for name in QKV}, fuse=False)
    by_hand = input_hessian(_float_inputs(partial, ATTENTION_OUT))
    torch.testing.assert_close(hessians[ATTENTION_OUT], by_hand, rtol=HESSIAN_RTOL, atol=0)
    of_float_model = input_hessian(_float_inputs(float_model, ATTENTION_OUT))
    assert not torch.allclose(hessians[ATTENTION_OUT], of_float_model, rtol=HESSIAN_RTOL * 1e3, atol=0)


def test_summary_names_the_gptq_layers_and_heads_stay_float():
    model = _model("BertForSequenceClassification")
    original = copy.deepcopy(model)
    skipped = FFN_UP
    quantized = _gptq(model, rounding=Rounding("gptq", act_order=True), skip=(f"bert.{skipped}",))
    summary = quantized.qbert_summary
    assert set(summary.rounding) == set(summary.swapped) and summary.swapped
    assert set(summary.rounding.values()) == {"gptq act_order"}
    assert set(summary.kept_float) == {"classifier", f"bert.{skipped}"}
    assert not set(summary.kept_float) & set(summary.swapped)
    for name in summary.kept_float:
        kept, before = quantized.get_submodule(name), original.get_submodule(name)
        assert type(kept) is nn.Linear and torch.equal(kept.weight, before.weight)
        assert torch.equal(kept.bias, before.bias)
    assert all(isinstance(quantized.get_submodule(name), QLinear) for name in summary.swapped)


def test_fused_chain_installs_for_w8a8_gptq(float_model):
    # Tier: same math (tests/nn/test_fused.py's SAME_MATH_TOLERANCE): the fused chain runs the same codes.
    fused = _gptq(copy.deepcopy(float_model), "w8a8")
    unfused = _gptq(copy.deepcopy(float_model), "w8a8", fuse=False)
    assert fused.qbert_summary.fused and unfused.qbert_summary.fused == ()
    assert fused.qbert_summary.rounding == unfused.qbert_summary.rounding
    for name in fused.qbert_summary.swapped:
        _assert_same_layer(fused.get_submodule(name), unfused.get_submodule(name))
    with qbert.use_backend("reference"):
        out, ref = tiny.first_output(fused), tiny.first_output(unfused)
    assert (out - ref).abs().max().item() <= SAME_MATH_TOLERANCE * ref.abs().max().item()


def _all_linears(model: nn.Module) -> list[str]:
    return sorted(tiny.linear_names(model))


def test_a_plan_chooses_the_rounding_per_layer(float_model):
    layers = {name: FORMAT for name in _all_linears(float_model)}
    chosen = {QKV[0]: Rounding("gptq"), FFN_DOWN: Rounding("gptq", damp=0.1, block_size=32)}
    model = _gptq(copy.deepcopy(float_model), Plan(layers, rounding=chosen), rounding="nearest")
    assert model.qbert_summary.rounding == {QKV[0]: "gptq", FFN_DOWN: "gptq damp=0.1 block_size=32"}
    for name in set(layers) - set(chosen):
        _assert_same_layer(model.get_submodule(name), QLinear.from_linear(float_model.get_submodule(name), FORMAT))
    assert not torch.equal(model.get_submodule(QKV[0]).dequantized_weight(),
                           QLinear.from_linear(float_model.get_submodule(QKV[0]), FORMAT).dequantized_weight())


def test_a_plans_rounding_wins_over_the_argument(float_model):
    layers = {name: FORMAT for name in _all_linears(float_model)}
    model = _gptq(copy.deepcopy(float_model), Plan(layers, rounding={FFN_UP: Rounding("nearest")}))
    assert set(model.qbert_summary.rounding) == set(layers) - {FFN_UP}
    _assert_same_layer(model.get_submodule(FFN_UP), QLinear.from_linear(float_model.get_submodule(FFN_UP), FORMAT))


def test_save_and_load_give_the_same_outputs(gptq_run, tmp_path):
    # Tier: exact: the file holds the codes.
    model, _ = gptq_run
    path = tmp_path / "gptq.safetensors"
    qbert.save_quantized(model, path)
    loaded = qbert.load_quantized(path)
    for name in model.qbert_summary.swapped:
        _assert_same_layer(loaded.get_submodule(name), model.get_submodule(name))
    assert torch.equal(tiny.first_output(loaded), tiny.first_output(model))


def test_training_flags_survive_and_calibration_runs_without_dropout(float_model, gptq_run):
    # Calibration runs in eval mode: a model in train mode (dropout 0.1 in this config) gets exactly the
    # codes of the same model in eval mode, and keeps its training flags.
    assert float_model.config.hidden_dropout_prob > 0
    training = copy.deepcopy(float_model).train()
    quantized = _gptq(training)
    assert all(module.training for module in quantized.modules())
    eval_model, _ = gptq_run
    assert not any(module.training for module in eval_model.modules())
    for name in quantized.qbert_summary.swapped:
        assert isinstance(quantized.get_submodule(name), QLinear)
        _assert_same_layer(quantized.get_submodule(name), eval_model.get_submodule(name))


def _linears_by_name(model: nn.Module) -> dict[str, tuple]:
    """name -> (module identity, training flag, forward pre-hooks) of every linear layer."""
    return {name: (id(module), module.training, len(module._forward_pre_hooks))
            for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, (nn.Linear, QLinear))}


def _assert_unchanged(model: nn.Module, before: dict[str, tuple]) -> None:
    """Every nn.Linear is the original module again (same flags, no calibration hook left), no QLinear, no
    summary."""
    assert _linears_by_name(model) == before
    assert not any(isinstance(module, QLinear) for module in model.modules())
    assert not hasattr(model, "qbert_summary")


IDS = torch.zeros(1, 4, dtype=torch.long)


@pytest.mark.parametrize("options,error,match", [
    ({"rounding": "gptq"}, ValueError, r"quantize: rounding='gptq' needs calibration=batches"),
    ({"rounding": "gptq", "calibration": []}, ValueError, "quantize: calibration has no batches"),
    ({"rounding": "gptq", "calibration": {"input_ids": IDS}}, TypeError,
     r"calibration must be an iterable of batches .*got one dict; wrap it in a list"),
    ({"rounding": "gptq", "calibration": [{"input_ids": IDS}, {}]}, ValueError,
     r"calibration batch 2 has the keys \[\], which BertModel.forward does not take"),
    ({"rounding": "gptq", "calibration": [IDS]}, TypeError,
     r"calibration batch 1 must be a dict of model inputs \(str keys\), got Tensor"),
    ({"calibration": [{"input_ids": IDS}]}, ValueError,
     r"calibration is only used by GPTQ rounding, and no layer has it"),
    ({"rounding": "bogus"}, ValueError,
     r"quantize: rounding must be one of 'nearest', 'gptq' or a qbert.nn.Rounding, got 'bogus'"),
    ({"rounding": Rounding}, ValueError, "quantize: rounding must be one of"),
], ids=["no-calibration", "no-batches", "one-dict", "empty-batch", "not-a-dict", "nearest",
        "bogus", "class"])
def test_bad_calibration_is_an_error_before_the_model_changes(float_model, options, error, match):
    model = copy.deepcopy(float_model)
    before = _linears_by_name(model)
    with pytest.raises(error, match=match):
        qbert.quantize(model, FORMAT, progress=False, **options)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("batch", [{"text": "hello"}, {"input_ids": IDS, "text": "hello"}], ids=["only", "extra"])
def test_a_batch_key_the_model_does_not_take_is_named(float_model, batch):
    # FAILS (qbert.nn.gptq.calibration_batches): transformers 5's BertModel.forward ends in
    # **kwargs: TransformersKwargs, so the unknown-key check never fires for it. {"text": ...} alone gets
    # transformers' "You must specify exactly one of input_ids or inputs_embeds" instead of qbert's message,
    # and {"input_ids": ..., "text": ...} quantizes with "text" silently ignored.
    model = copy.deepcopy(float_model)
    before = _linears_by_name(model)
    match = r"calibration batch 1 has the keys \[.*'text'\], which BertModel.forward does not take \(it takes input_ids"
    with pytest.raises(ValueError, match=match):
        qbert.quantize(model, FORMAT, rounding="gptq", calibration=[batch], progress=False)
    _assert_unchanged(model, before)


def test_an_error_during_gptq_puts_every_linear_back(float_model, monkeypatch):
    # Some layers are rounded to nearest (swapped first) and GPTQ fails on its second layer: all restored.
    calls = []

    def failing(weight, hessian, fmt, **options):
        calls.append(options["name"])
        if len(calls) > 1:
            raise GPTQError(f"gptq: {options['name']}: injected failure")
        return gptq_quantize(weight, hessian, fmt, **options)

    monkeypatch.setattr(nn_gptq, "gptq_quantize", failing)
    model = copy.deepcopy(float_model).train()  # calibration switches to eval mode: the flags come back
    before = _linears_by_name(model)
    layers = {name: FORMAT for name in _all_linears(model)}
    plan = Plan(layers, rounding={name: Rounding("gptq") for name in (*QKV, FFN_DOWN)})
    with pytest.raises(GPTQError, match=rf"^quantize: gptq: {QKV[1]}: injected failure"):
        qbert.quantize(model, plan, calibration=_calibration(), progress=False)
    assert calls == list(QKV[:2])
    _assert_unchanged(model, before)
    assert all(module.training for module in model.modules())
    assert torch.equal(tiny.first_output(model.eval()), tiny.first_output(float_model))


def test_prepare_qat_rounds_to_nearest_only(float_model):
    model = copy.deepcopy(float_model)
    before = _linears_by_name(model)
    plan = Plan({name: FORMAT for name in _all_linears(model)}, rounding={QKV[0]: Rounding("gptq")})
    with pytest.raises(ValueError, match=rf"prepare_qat: the plan names GPTQ rounding for {QKV[0]}; prepare_qat "
                                         r"rounds to nearest only"):
        qbert.nn.prepare_qat(model, plan)
    _assert_unchanged(model, before)
    assert not hasattr(model, "qbert_qat_summary")


@pytest.mark.parametrize("family", sorted(tiny.BASE_MODELS))
def test_every_family_quantizes_closer_to_float_than_round_to_nearest(family):
    """Every supported family, ALBERT's one layer shared by all depths included (its H sums over every
    call of a forward), with its own stages."""
    model = tiny.build(tiny.BASE_MODELS[family], family)
    reference = tiny.first_output(model)
    nearest = qbert.quantize(copy.deepcopy(model), FORMAT)
    gptq = _gptq(copy.deepcopy(model))
    assert set(gptq.qbert_summary.rounding) == set(gptq.qbert_summary.swapped)
    assert _mse(tiny.first_output(gptq), reference) < _mse(tiny.first_output(nearest), reference)
