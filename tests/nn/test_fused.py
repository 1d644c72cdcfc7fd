"""The fused W8A8 chain (qbert.nn.fused) against the unfused path it replaces."""

import collections
import copy

import pytest
import torch

import qbert
from qbert.nn.fused import FusedEncoder, FusedLayer, FusedSelfAttention
from qbert.nn.unpad import unpadding
from qbert.ops import _registry
from tests.nn import _tiny_models as tiny

FUSED_FAMILIES = ("bert", "minilm", "roberta", "electra")
# Tier: same math in float, relative to the output's largest magnitude. The fused chain's LayerNorm is
# add_layernorm_quantize, whose reference rounds the exact (float64) LayerNorm once, where the unfused
# path runs torch's float32 LayerNorm; and inductor fuses and reorders the float ops between the int8
# kernels. Where an activation rounds differently by an ulp, its per-token requantization can move a
# code by one step (about 1e-4 of the output's range here).
SAME_MATH_TOLERANCE = 1e-3


def _assert_same_math(out: torch.Tensor, ref: torch.Tensor) -> None:
    error = (out - ref).abs().max().item()
    assert error <= SAME_MATH_TOLERANCE * ref.abs().max().item(), error


def _real_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """A last hidden state of ``tiny.inputs()`` with its pad positions zeroed: the fused encoder runs
    unpadded and leaves zeros there (qbert.nn.unpad), the unfused path the pad tokens' outputs."""
    return hidden * tiny.inputs()["attention_mask"][..., None].to(hidden.dtype)


def _pair(family: str, **overrides):
    model = tiny.build(tiny.BASE_MODELS[family], family, **overrides)
    fused = qbert.quantize(copy.deepcopy(model), "w8a8")
    unfused = qbert.quantize(copy.deepcopy(model), "w8a8", fuse=False)
    return fused, unfused


@pytest.fixture
def op_calls(monkeypatch):
    """Counts every qbert op dispatch by op name."""
    calls = collections.Counter()
    original = _registry.Op.__call__

    def counting(self, *args, **kwargs):
        calls[self.name] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_registry.Op, "__call__", counting)
    return calls


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fuse_installs_the_chain_in_every_layer(family):
    fused, unfused = _pair(family)
    pieces = ("attention.self", "attention.output", "intermediate", "output")
    expected = {f"encoder.layer.{i}.{piece}" for i in range(fused.config.num_hidden_layers) for piece in pieces}
    assert set(fused.qbert_summary.fused) == expected
    assert unfused.qbert_summary.fused == ()
    layer, plain = fused.encoder.layer[0], unfused.encoder.layer[0]
    assert isinstance(fused.encoder, FusedEncoder) and isinstance(layer, FusedLayer)
    assert isinstance(layer.attention.self, FusedSelfAttention)
    # Still the Hugging Face classes (their output capture hooks them), with the same parameters.
    assert isinstance(layer, type(plain)) and isinstance(layer.attention.self, type(plain.attention.self))
    assert fused.state_dict().keys() == unfused.state_dict().keys()


@pytest.mark.parametrize("family", ["distilbert", "albert"])
def test_other_families_stay_unfused(family):
    fused, unfused = _pair(family)
    assert fused.qbert_summary.fused == ()
    torch.testing.assert_close(tiny.first_output(fused), tiny.first_output(unfused), rtol=0, atol=0)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_equals_unfused_on_the_reference(family):
    # Tier: same math (SAME_MATH_TOLERANCE): GEMM + bias then GELU then quantize are the same ops; the
    # LayerNorms round differently in the last bit.
    fused, unfused = _pair(family)
    with qbert.use_backend("reference"):
        _assert_same_math(tiny.first_output(fused), _real_tokens(tiny.first_output(unfused)))


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_matches_unfused_on_the_default_backend(family):
    # Tier: same math in float. The cpu LayerNorm sums in another order than torch's, which can move a
    # code by one step; the outputs stay within float32 noise of each other after 2-3 layers.
    fused, unfused = _pair(family)
    out, ref = tiny.first_output(fused), _real_tokens(tiny.first_output(unfused))
    cosine = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
    assert cosine > 0.9999, cosine


def test_fused_chain_quantizes_once_per_producer(op_calls):
    fused, unfused = _pair("bert")
    layers = fused.config.num_hidden_layers
    op_calls.clear()  # quantizing the weights called quantize_per_token
    tiny.first_output(fused)
    # On the CPU in eager mode each layer is one op (w8a8_encoder_layer); its reference is the chain op by op.
    assert op_calls["w8a8_encoder_layer"] == layers
    assert op_calls["w8a8_linear"] == 1  # the pooler
    assert sum(op_calls.values()) == layers + 1
    op_calls.clear()
    with qbert.use_backend("reference"):
        tiny.first_output(fused)
    # Per layer: Q, K, V and FFN down read codes (int8_linear), the attention output projection quantizes
    # the attention context (w8a8_linear), FFN up requantizes, two add-norms emit codes; the first layer
    # quantizes the embeddings' output once for its Q, K and V.
    assert op_calls["w8a8_encoder_layer"] == layers
    assert op_calls["int8_linear"] == 4 * layers
    assert op_calls["w8a8_linear"] == layers + 1  # + the pooler
    assert op_calls["int8_linear_requant"] == layers
    assert op_calls["add_layernorm_quantize"] == 2 * layers
    assert op_calls["quantize_per_token"] == 1
    op_calls.clear()
    tiny.first_output(unfused)
    assert op_calls["w8a8_linear"] == 6 * layers + 1 and op_calls["int8_linear"] == 0


def test_tanh_gelu_leaves_the_intermediate_unfused():
    fused, unfused = _pair("bert", hidden_act="gelu_new")
    assert not any(name.endswith("intermediate") for name in fused.qbert_summary.fused)
    assert any(name.endswith("attention.output") for name in fused.qbert_summary.fused)
    with qbert.use_backend("reference"):
        _assert_same_math(tiny.first_output(fused), _real_tokens(tiny.first_output(unfused)))


def test_int8_input_to_a_layer_is_an_error():
    fused, _ = _pair("bert")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int8"):
        fused.encoder.layer[0].output.dense(torch.zeros(2, tiny.FFN, dtype=torch.int8))


def test_fused_model_saves_and_loads(tmp_path):
    fused, _ = _pair("bert")
    path = tmp_path / "fused.safetensors"
    qbert.save_quantized(fused, path)
    loaded = qbert.load_quantized(path)
    assert isinstance(loaded.encoder.layer[0], FusedLayer)
    assert torch.equal(tiny.first_output(loaded), tiny.first_output(fused))


def test_inference_mode():
    fused, unfused = _pair("bert")
    with torch.inference_mode(), qbert.use_backend("reference"):
        inputs = tiny.inputs()
        _assert_same_math(fused(**inputs)[0], _real_tokens(unfused(**inputs)[0]))


def test_only_w8a8_layers_are_fused():
    model = tiny.build("BertModel", "bert")
    assert qbert.quantize(copy.deepcopy(model), "w8a16").qbert_summary.fused == ()
    # Layer 0's query in float: its Q, K and V each run their own layer; the rest of the chain is fused.
    partial = qbert.quantize(copy.deepcopy(model), "w8a8", skip=("encoder.layer.0.attention.self.query",))
    assert "encoder.layer.0.attention.self" not in partial.qbert_summary.fused
    assert {"encoder.layer.0.output", "encoder.layer.1.attention.self"} <= set(partial.qbert_summary.fused)
    unfused = qbert.quantize(copy.deepcopy(model), "w8a8", fuse=False,
                             skip=("encoder.layer.0.attention.self.query",))
    with qbert.use_backend("reference"):
        _assert_same_math(tiny.first_output(partial), _real_tokens(tiny.first_output(unfused)))


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_hidden_states_and_attentions_are_captured(family):
    fused, unfused = _pair(family)
    for model in (fused, unfused):
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
    with torch.no_grad(), qbert.use_backend("reference"):
        out = fused(**tiny.inputs(), output_hidden_states=True, output_attentions=True)
        ref = unfused(**tiny.inputs(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == fused.config.num_hidden_layers + 1
    assert len(out.attentions) == fused.config.num_hidden_layers
    for got, want in zip(out.hidden_states + out.attentions, ref.hidden_states + ref.attentions, strict=True):
        _assert_same_math(got, want)


def test_decoder_layers_stay_unfused():
    fused, _ = _pair("bert", is_decoder=True)
    assert fused.qbert_summary.fused == ()


COMPILED_MODES = ("w8a8", "w8a16", "w4a16", "w3a16", "w2a16", "w4a8", "w3a8", "w2a8")


@pytest.mark.slow
@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_compiled_fullgraph_equals_eager(mode):
    # Tier: float. Inductor may fuse and reorder the float ops around the int8 kernels. The compiled
    # model runs padded (qbert.nn.unpad), the eager fused one unpadded: they agree on the real tokens.
    model = qbert.quantize(tiny.build("BertModel", "bert"), mode)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():
        eager, out = model(**tiny.inputs())[0], compiled(**tiny.inputs())[0]
    _assert_same_math(_real_tokens(out), _real_tokens(eager))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_compiled_fused_chain_of_other_families(family):
    fused, _ = _pair(family)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="inductor")
    with torch.no_grad():
        _assert_same_math(_real_tokens(compiled(**tiny.inputs())[0]), fused(**tiny.inputs())[0])


def test_export_sees_the_chain():
    # The codes are values in the graph: torch.export records every fused op and replays them exactly.
    # Exported, the encoder runs padded (T is data-dependent; qbert.nn.unpad): compare with the padded path.
    fused, _ = _pair("bert")
    inputs = tiny.inputs()
    program = torch.export.export(fused, (), inputs)
    ops_in_graph = {str(node.target) for node in program.graph.nodes}
    assert {"qbert.add_layernorm_quantize.default", "qbert.int8_linear.default",
            "qbert.int8_linear_requant.default"} <= ops_in_graph
    with torch.no_grad(), unpadding(False):
        assert torch.equal(program.module()(**inputs)[0], fused(**inputs)[0])


def _op_by_op(model):
    """A no-op forward hook on every layer's FFN up-projection: hooks on a layer's sub-modules must see
    them run, so each layer runs op by op."""
    return [layer.intermediate.dense.register_forward_hook(lambda *_: None) for layer in model.encoder.layer]


@pytest.mark.parametrize("family", FUSED_FAMILIES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_one_call_layers_equal_the_op_by_op_chain(family, padded, op_calls):
    # Tier: padded (the batch has a mask), exact: the one-call layer runs the chain's cpu kernels and sdpa in
    # the chain's order. Unpadded, same math in float: its attention (varlen_attention) runs on each
    # sequence's real tokens alone, the chain's (sdpa) on the padded shape (tests/nn/test_unpad.py).
    fused, _ = _pair(family)
    layers = fused.config.num_hidden_layers
    with unpadding(not padded):
        op_calls.clear()
        one_call = tiny.first_output(fused)
        assert op_calls["w8a8_encoder_layer"] == layers
        handles = _op_by_op(fused)
        op_calls.clear()
        chain = tiny.first_output(fused)
        assert op_calls["w8a8_encoder_layer"] == 0 and op_calls["int8_linear"] == 4 * layers
    for handle in handles:
        handle.remove()
    if padded:
        torch.testing.assert_close(one_call, chain, rtol=0, atol=0)
    else:
        _assert_same_math(one_call, chain)


def test_a_hooked_sub_module_sees_its_call():
    fused, _ = _pair("bert")
    seen = []
    fused.encoder.layer[1].attention.output.dense.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    tiny.first_output(fused)
    assert len(seen) == 1


def test_training_mode_runs_op_by_op(op_calls):
    # Dropout is live in training: the one-call layer has none, so a training forward runs op by op.
    fused, _ = _pair("bert")
    fused.train()
    with torch.no_grad():
        fused(**tiny.inputs())
    assert op_calls["w8a8_encoder_layer"] == 0 and op_calls["int8_linear"] > 0
