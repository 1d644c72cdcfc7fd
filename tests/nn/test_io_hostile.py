"""load_quantized on hostile files: each is refused with a QuantizedFileError naming the file and the
problem, before a real (non-meta) layer is built and without touching the network."""

import json
import os
import re
import socket
import struct

import huggingface_hub
import pytest
import torch
from torch import nn

import qbert
from qbert.io import KEY_CHECKSUM, KEY_CONFIG, KEY_FLOAT_DTYPE, KEY_LAYERS, KEY_MODEL_CLASS
from qbert.sparse.attention import ATTENTION_NAME
from tests.nn._tiny_models import VOCAB, build, first_output
from tests.nn.test_io import FILE_NAME, _quantized, _quoted, _rewrite

CLASS_NAME = "BertForSequenceClassification"
# safetensors: an 8-byte little-endian header length, the JSON header, then the tensor data.
HEADER_LENGTH_BYTES = 8


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / FILE_NAME
    qbert.save_quantized(_quantized(CLASS_NAME), path)
    return path


@pytest.fixture
def nothing_real(monkeypatch):
    """From here on, building an nn.Linear or nn.Embedding anywhere but on the meta device fails the test."""
    for cls in (nn.Linear, nn.Embedding):
        def guarded(self, *args, _original=cls.__init__, **kwargs):
            assert torch.get_default_device() == torch.device("meta"), \
                f"load_quantized built a real {type(self).__name__} before refusing the file"
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", guarded)


@pytest.fixture
def no_network(monkeypatch):
    """Hub access allowed by the environment, but every connection or hub download fails the test."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"load_quantized reached the network: {name}{args}")
        return call

    for owner, name in [(socket.socket, "connect"), (socket, "create_connection"), (socket, "getaddrinfo"),
                        (huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                        (huggingface_hub.file_download, "hf_hub_download")]:
        monkeypatch.setattr(owner, name, refuse(name))
    return calls


def _config_change(**fields):
    def change(metadata):
        config = json.loads(metadata[KEY_CONFIG])
        config.update(fields)
        metadata[KEY_CONFIG] = json.dumps(config)
    return change


def _refused(path, problem: str) -> None:
    with pytest.raises(qbert.QuantizedFileError, match=f"(?s)load_quantized: {_quoted(path)}.*{problem}"):
        qbert.load_quantized(path)


def test_the_guard_sees_a_real_build(saved, nothing_real):
    # The refusals below run under nothing_real; this is what it does to a load that builds for real.
    with pytest.raises(AssertionError, match="built a real"):
        qbert.load_quantized(saved)


@pytest.mark.parametrize("key,value", [
    pytest.param("attn_implementation", "kernels-community/flash-attn", id="hub-kernel"),
    pytest.param("_attn_implementation", "flash_attention_2", id="private-key-flash"),
    pytest.param("_attn_implementation_internal", "kernels-community/flash-attn", id="internal-key"),
    pytest.param("attn_implementation", {"": "kernels-community/flash-attn"}, id="per-subconfig-dict"),
    pytest.param("attn_implementation", ATTENTION_NAME, id="block-sparse-without-layouts"),
    pytest.param("experts_implementation", "kernels-community/megablocks", id="experts-kernel"),
])
def test_an_implementation_other_than_the_built_in_ones_is_refused(saved, nothing_real, no_network, key,
                                                                     value):
    _rewrite(saved, change_metadata=_config_change(**{key: value}))
    _refused(saved, rf"config '{key}' is {re.escape(repr(value))}; a file may name only the built-in "
                    rf"implementations eager, sdpa")
    assert no_network == []


def test_a_sparsified_model_is_saved_without_its_block_sparse_attention(tmp_path):
    path = tmp_path / FILE_NAME
    model = qbert.sparsify_attention(build(CLASS_NAME), "sliding_window", block_size=16, window=1)
    qbert.save_quantized(qbert.quantize(model, "w8a8"), path)
    assert model.config._attn_implementation == ATTENTION_NAME
    assert qbert.load_quantized(path).config._attn_implementation == "sdpa"


def test_a_file_naming_block_sparse_attention_says_to_sparsify_after_loading(saved, nothing_real):
    _rewrite(saved, change_metadata=_config_change(attn_implementation=ATTENTION_NAME))
    _refused(saved, r"a file stores no block-sparse layouts: call qbert.sparsify_attention after loading")


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_built_in_implementation_loads(saved, no_network, implementation):
    _rewrite(saved, change_metadata=_config_change(attn_implementation=implementation))
    assert qbert.load_quantized(saved).config._attn_implementation == implementation
    assert no_network == []


@pytest.mark.parametrize("key,value", [
    pytest.param("auto_map", {"AutoModel": "modeling_evil.EvilModel"}, id="auto-map"),
    pytest.param("trust_remote_code", True, id="trust-remote-code"),
    pytest.param("custom_pipelines", {"evil": {"impl": "evil.Pipeline"}}, id="custom-pipelines"),
    pytest.param("code_revision", "main", id="code-revision"),
    pytest.param("_auto_class", "AutoModel", id="auto-class"),
])
def test_remote_code_fields_are_refused(saved, nothing_real, no_network, key, value):
    _rewrite(saved, change_metadata=_config_change(**{key: value}))
    _refused(saved, rf"the config carries remote-code fields \['{key}'\]")
    assert no_network == []


@pytest.mark.parametrize("class_name,problem", [
    pytest.param("GPT2Model", r"'GPT2Model' \(model_type 'gpt2'\) is not of a family qbert supports: "
                 r"bert, roberta, distilbert, albert, electra", id="other-family"),
    pytest.param("XLMRobertaModel", r"'XLMRobertaModel' \(model_type 'xlm-roberta'\) is not of a family",
                 id="untested-encoder"),
    pytest.param("AutoModel", "'AutoModel' is not a transformers model class", id="auto-class"),
    pytest.param("BertConfig", "'BertConfig' is not a transformers model class", id="a-config-class"),
    pytest.param("RobertaForSequenceClassification", r"the config's model_type 'bert' does not match the "
                 r"model class RobertaForSequenceClassification \('roberta'\)", id="class-vs-model-type"),
])
def test_a_model_class_outside_the_families_or_the_config_is_refused(saved, nothing_real, class_name,
                                                                     problem):
    _rewrite(saved, change_metadata=lambda m: m.update({KEY_MODEL_CLASS: class_name}))
    _refused(saved, problem)


def test_a_config_model_type_other_than_the_class_is_refused(saved, nothing_real):
    _rewrite(saved, change_metadata=_config_change(model_type="roberta"))
    _refused(saved, rf"model_type 'roberta' does not match the model class {CLASS_NAME} \('bert'\)")


@pytest.mark.parametrize("fields,problem", [
    pytest.param({"vocab_size": -5}, "'vocab_size' is -5: a size must be a positive int", id="negative"),
    pytest.param({"num_attention_heads": 0}, "'num_attention_heads' is 0: a size must be a positive int",
                 id="zero"),
    pytest.param({"vocab_size": "1000"}, "'vocab_size' is '1000': a size must be a positive int",
                 id="string"),
    pytest.param({"hidden_size": 64.0}, "'hidden_size' is 64.0: a size must be a positive int", id="float"),
    pytest.param({"num_hidden_layers": True}, "'num_hidden_layers' is True: a size must be a positive int",
                 id="bool"),
    pytest.param({"vocab_size": 400_000_000}, r"'vocab_size' is 400000000: larger than every dimension of "
                 rf"the stored tensors \(the largest is {VOCAB}\)", id="huge-vocab"),
    pytest.param({"num_labels": VOCAB + 1}, f"'num_labels' is {VOCAB + 1}: larger than every dimension",
                 id="label-count"),  # transformers makes an id2label entry per label, before any tensor
    pytest.param({"hidden_dropout_prob": "high"}, "'hidden_dropout_prob' is 'high': expected a number",
                 id="not-a-number"),
    pytest.param({"is_decoder": "no"}, "'is_decoder' is 'no': expected a bool", id="not-a-bool"),
    pytest.param({"hidden_act": 3}, "'hidden_act' is 3: expected a string", id="not-a-string"),
    pytest.param({"pad_token_id": 0.5}, "'pad_token_id' is 0.5: expected an int", id="not-an-int"),
])
def test_config_fields_of_the_wrong_type_are_refused(saved, nothing_real, fields, problem):
    _rewrite(saved, change_metadata=_config_change(**fields))
    _refused(saved, f"config field {problem}")


@pytest.mark.parametrize("fields,problem", [
    pytest.param({"vocab_size": VOCAB - 1}, r"tensor 'bert.embeddings.word_embeddings.weight' is "
                 r"\[1000, 64\] torch.float32 in the file, but the model rebuilt from the metadata expects "
                 r"\[999, 64\]", id="vocab-off-by-one"),
    pytest.param({"max_position_embeddings": VOCAB}, r"tensor 'bert.embeddings.position_embeddings.weight' "
                 r"is \[512, 64\].*expects \[1000, 64\]", id="position-table"),
    pytest.param({"num_hidden_layers": 3}, r"missing \[.*'bert.encoder.layer.2.attention.self.query.weight'",
                 id="more-layers"),
    pytest.param({"num_hidden_layers": 1}, "quantized layer 'bert.encoder.layer.1.attention.self.query' is "
                 "not a module of the rebuilt", id="fewer-layers"),
    pytest.param({"hidden_size": 65}, "the config cannot build BertForSequenceClassification: ValueError: "
                 r"The hidden size \(65\) is not a multiple of the number of attention heads",
                 id="indivisible"),
])
def test_a_config_that_does_not_match_the_stored_tensors_is_refused_on_the_meta_device(saved, nothing_real,
                                                                                        fields, problem):
    _rewrite(saved, change_metadata=_config_change(**fields))
    _refused(saved, problem)


def _layers_edit(old: str, new: str):
    """Replace the first ``old`` in the JSON of ``qbert.layers`` (the first layer's entry) by ``new``."""
    return lambda metadata: metadata.update({KEY_LAYERS: metadata[KEY_LAYERS].replace(old, new, 1)})


@pytest.mark.parametrize("change,problem", [
    pytest.param(lambda m: m.update({KEY_CONFIG: "[]"}), "'qbert.config' must be a JSON object, got list",
                 id="config-not-an-object"),
    pytest.param(lambda m: m.update({KEY_LAYERS: "5"}),
                 "'qbert.layers' must be a JSON list of layer entries, got 5", id="layers-not-a-list"),
    pytest.param(lambda m: m.update({KEY_LAYERS: "[5]"}), "malformed layer entry 5.*must be a JSON object",
                 id="entry-not-an-object"),
    pytest.param(_layers_edit('"in_features": 64', '"in_features": "64"'),
                 "'in_features' must be a positive int", id="in-features-string"),
    pytest.param(_layers_edit('"out_features": 64', '"out_features": -64'),
                 "'out_features' must be a positive int", id="out-features-negative"),
    pytest.param(_layers_edit('"names": ["bert.encoder.layer.0.attention.self.query"]', '"names": "bert"'),
                 "'names' must be a non-empty list of module names", id="names-not-a-list"),
    pytest.param(_layers_edit('"bias": true', '"bias": 1'), "'bias' must be true or false",
                 id="bias-not-a-bool"),
    pytest.param(_layers_edit('"bias_dtype": "float32"', '"bias_dtype": "float64"'),
                 "'bias_dtype' must be one of float32, float16, bfloat16", id="bias-dtype"),
    pytest.param(lambda m: m.update({KEY_FLOAT_DTYPE: "float64"}), "float dtype 'float64' is not one of",
                 id="float-dtype"),
])
def test_malformed_metadata_is_refused(saved, nothing_real, change, problem):
    _rewrite(saved, change_metadata=change)
    _refused(saved, problem)


@pytest.mark.parametrize("change,problem", [
    pytest.param(lambda t: t.update({"evil.weight": torch.zeros(4)}), r"unexpected \['evil.weight'\]",
                 id="unexpected-tensor"),
    pytest.param(lambda t: t.pop("classifier.bias"), r"missing \['classifier.bias'\]", id="missing-tensor"),
    pytest.param(lambda t: t.update({"bert.pooler.dense.w_scale": t["bert.pooler.dense.w_scale"].double()}),
                 r"tensor 'bert.pooler.dense.w_scale' is \[64\] F64 in the file, but the model rebuilt from "
                 r"the metadata expects \[64\] torch.float32", id="wrong-dtype"),
    pytest.param(lambda t: t.update({"classifier.weight": torch.zeros(VOCAB, 64)}),
                 r"tensor 'classifier.weight' is \[1000, 64\].*expects \[2, 64\]", id="wrong-shape"),
])
def test_tensors_that_do_not_match_the_rebuilt_model_are_refused(saved, nothing_real, change, problem):
    _rewrite(saved, change_tensors=change)
    _refused(saved, problem)


def test_a_tied_tensor_stored_under_both_names_is_refused(tmp_path, request):
    path = tmp_path / FILE_NAME
    qbert.save_quantized(_quantized("BertForMaskedLM"), path)
    request.getfixturevalue("nothing_real")
    name, alias = "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"
    _rewrite(path, change_tensors=lambda t: t.update({alias: t[name].clone()}))
    _refused(path, rf"tied tensors stored twice \[\['{name}', '{alias}'\]\]")


def test_a_directory_without_a_qbert_save_is_refused_naming_it(tmp_path):
    _refused(tmp_path, "is a directory without model.safetensors: it is not a qbert quantized model directory")


def test_a_missing_file_is_refused_naming_it(tmp_path):
    _refused(tmp_path / FILE_NAME, "no such file")


def test_a_file_that_is_not_regular_is_refused_naming_it(tmp_path):
    fifo = tmp_path / FILE_NAME
    os.mkfifo(fifo)  # opening it to read would wait for a writer
    _refused(fifo, "is not a regular file")


def _flip_a_data_byte(path) -> None:
    data = bytearray(path.read_bytes())
    (header_length,) = struct.unpack("<Q", data[:HEADER_LENGTH_BYTES])
    data[HEADER_LENGTH_BYTES + header_length] ^= 0xFF  # the first byte of the tensor data
    path.write_bytes(bytes(data))


def test_flipped_data_bytes_fail_the_checksum(saved):
    _flip_a_data_byte(saved)
    _refused(saved, r"checksum mismatch: the tensor data hashes to sha256:[0-9a-f]{64}, the file records "
                    r"sha256:[0-9a-f]{64}; the file is corrupt")


@pytest.mark.parametrize("change,problem", [
    pytest.param(lambda m: m.pop(KEY_CHECKSUM), r"lacks the metadata \['qbert.checksum'\]", id="missing"),
    pytest.param(lambda m: m.update({KEY_CHECKSUM: "md5:1234"}), "'qbert.checksum' is 'md5:1234', expected "
                 "'sha256:' and 64 hex digits", id="malformed"),
])
def test_a_version_3_file_needs_a_checksum(saved, nothing_real, change, problem):
    _rewrite(saved, change_metadata=change)
    _refused(saved, problem)


def test_a_load_never_reaches_the_network(saved, no_network):
    model = _quantized(CLASS_NAME)
    assert torch.equal(first_output(qbert.load_quantized(saved)), first_output(model))
    assert no_network == []
