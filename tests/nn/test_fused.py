"""The fused W8A8 chain (qbert.nn.fused) against the unfused path it replaces."""

import collections
import copy

import pytest
import torch

import qbert
from qbert.nn.codes import attach, int8_of
from qbert.nn.fused import QAddNorm, QIntermediate, QLayerNorm
from qbert.ops import _registry
from tests.nn import _tiny_models as tiny

FUSED_FAMILIES = ("bert", "minilm", "roberta", "electra")


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
    layers = fused.config.num_hidden_layers
    expected = {"embeddings.LayerNorm"}
    for i in range(layers):
        expected |= {f"encoder.layer.{i}.attention.output", f"encoder.layer.{i}.intermediate",
                     f"encoder.layer.{i}.output"}
    assert set(fused.qbert_summary.fused) == expected
    assert unfused.qbert_summary.fused == ()
    layer = fused.encoder.layer[0]
    assert isinstance(layer.attention.output, QAddNorm) and isinstance(layer.output, QAddNorm)
    assert isinstance(layer.intermediate, QIntermediate) and isinstance(fused.embeddings.LayerNorm, QLayerNorm)
    assert fused.state_dict().keys() == unfused.state_dict().keys()


@pytest.mark.parametrize("family", ["distilbert", "albert"])
def test_other_families_stay_unfused(family):
    fused, unfused = _pair(family)
    assert fused.qbert_summary.fused == ()
    torch.testing.assert_close(tiny.first_output(fused), tiny.first_output(unfused), rtol=0, atol=0)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_equals_unfused_on_the_reference(family):
    # Tier: exact. On the reference backend both paths compute the same float32 ops in the same order:
    # LayerNorm then quantize, GEMM + bias then GELU then quantize; only where they happen differs.
    fused, unfused = _pair(family)
    with qbert.use_backend("reference"):
        assert torch.equal(tiny.first_output(fused), tiny.first_output(unfused))


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_matches_unfused_on_the_default_backend(family):
    # Tier: same math in float. The cpu LayerNorm sums in another order than torch's, which can move a
    # code by one step; the outputs stay within float32 noise of each other after 2-3 layers.
    fused, unfused = _pair(family)
    out, ref = tiny.first_output(fused), tiny.first_output(unfused)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
    assert cosine > 0.9999, cosine


def test_fused_chain_quantizes_once_per_producer(op_calls):
    fused, unfused = _pair("bert")
    layers = fused.config.num_hidden_layers
    op_calls.clear()  # quantizing the weights called quantize_per_token
    tiny.first_output(fused)
    # Per layer: Q, K, V and FFN down read codes (int8_linear), the attention output projection quantizes
    # the attention context (w8a8_linear), FFN up requantizes; two add-norms per layer, one for embeddings.
    assert op_calls["int8_linear"] == 4 * layers
    assert op_calls["w8a8_linear"] == layers + 1  # + the pooler, whose input is a slice
    assert op_calls["int8_linear_requant"] == layers
    assert op_calls["add_layernorm_quantize"] == 2 * layers + 1
    assert op_calls["quantize_per_token"] == 0
    op_calls.clear()
    tiny.first_output(unfused)
    assert op_calls["w8a8_linear"] == 6 * layers + 1 and op_calls["int8_linear"] == 0


def test_tanh_gelu_leaves_the_intermediate_unfused():
    fused, unfused = _pair("bert", hidden_act="gelu_new")
    assert not any(name.endswith("intermediate") for name in fused.qbert_summary.fused)
    assert any(name.endswith("attention.output") for name in fused.qbert_summary.fused)
    with qbert.use_backend("reference"):
        assert torch.equal(tiny.first_output(fused), tiny.first_output(unfused))


def test_codes_are_dropped_when_the_carrier_changes_in_place():
    x = torch.randn(3, 8)
    q, scale = qbert.ops.quantize_per_token(x)
    attach(x, q, scale, x.dtype)
    assert int8_of(x).q is q
    x.mul_(2)
    assert int8_of(x) is None
    assert int8_of(x[:2]) is None  # a view is another tensor: it carries nothing


def test_codes_attached_to_themselves_hold_no_cycle():
    q, scale = qbert.ops.quantize_per_token(torch.randn(3, 8))
    attach(q, q, scale, torch.float16)
    codes = int8_of(q)
    assert codes.q is q and codes.dtype == torch.float16
    assert q._qbert_int8.q is None


def test_int8_input_without_scales_is_an_error():
    fused, _ = _pair("bert")
    with pytest.raises(ValueError, match="got int8 x without per-token scales"):
        fused.encoder.layer[0].output.dense(torch.zeros(2, tiny.FFN, dtype=torch.int8))


def test_fused_model_saves_and_loads(tmp_path):
    fused, _ = _pair("bert")
    path = tmp_path / "fused.safetensors"
    qbert.save_quantized(fused, path)
    loaded = qbert.load_quantized(path)
    assert isinstance(loaded.encoder.layer[0].intermediate, QIntermediate)
    assert torch.equal(tiny.first_output(loaded), tiny.first_output(fused))


def test_inference_mode():
    # Inference tensors have no version counter: the codes are trusted while the carrier is the same tensor.
    fused, unfused = _pair("bert")
    with torch.inference_mode(), qbert.use_backend("reference"):
        inputs = tiny.inputs()
        assert torch.equal(fused(**inputs)[0], unfused(**inputs)[0])


def test_only_w8a8_layers_are_fused():
    model = tiny.build("BertModel", "bert")
    assert qbert.quantize(copy.deepcopy(model), "w8a16").qbert_summary.fused == ()
    # Layer 0's query in float: its embeddings LayerNorm has no int8 consumer and stays a LayerNorm.
    partial = qbert.quantize(copy.deepcopy(model), "w8a8", skip=("encoder.layer.0.attention.self.query",))
    assert "embeddings.LayerNorm" not in partial.qbert_summary.fused
    assert "encoder.layer.0.output" in partial.qbert_summary.fused
