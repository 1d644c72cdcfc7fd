"""Pruned models (``qbert.prune.structure``) quantize, save and load: by file, directory and save_pretrained,
through load_quantized and from_pretrained, bit-identical, with the fused W8A8 chain; a tampered pruning
record is refused before anything real is built."""

import json
import os

import pytest
import torch
import transformers

import qbert
from qbert.io import CONFIG_NAME, KEY_CONFIG, WEIGHTS_NAME
from qbert.nn import QLinear
from qbert.nn.fused import FusedLayer
from qbert.prune.structure import (
    RECORD_ATTR,
    encoder_layers,
    pruning_record,
    remove_heads,
    remove_layers,
    remove_neurons,
)
from tests.nn._tiny_models import build, first_output
from tests.nn.test_io import _rewrite
from tests.nn.test_io_hostile import nothing_real  # noqa: F401 (fixture)

PRUNED_LAYERS = 3  # built with one layer more than the tiny default, then one removed
# Heads and neurons removed (indices among the current ones), then a whole layer: layer 1 goes, so the
# record is that of the built layers 0 and 2.
HEADS = {0: [1, 3], 2: [0]}
NEURONS = {0: list(range(0, 128, 3)), 2: [5]}
LAYER = 1
RECORD = {"version": 1, "heads": [2, 3], "intermediate": [85, 127]}
AUTO = {"BertForSequenceClassification": transformers.AutoModelForSequenceClassification,
        "DistilBertModel": transformers.AutoModel}


def _pruned(class_name: str = "BertForSequenceClassification"):
    layers = {"n_layers": PRUNED_LAYERS} if class_name.startswith("DistilBert") else \
        {"num_hidden_layers": PRUNED_LAYERS}
    model = build(class_name, **layers)
    remove_heads(model, HEADS)
    remove_neurons(model, NEURONS)
    remove_layers(model, [LAYER])
    assert pruning_record(model) == RECORD
    return model


def _shapes(model) -> list[tuple[int, int, int]]:
    return [(view.heads, view.intermediate, view.query.out_features) for view in encoder_layers(model)]


def _save_file(model, tmp_path):
    path = tmp_path / WEIGHTS_NAME
    qbert.save_quantized(model, path)
    return path


def _save_directory(model, tmp_path):
    qbert.save_quantized(model, f"{tmp_path / 'saved'}{os.sep}")
    return tmp_path / "saved"


def _save_pretrained(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def _from_pretrained(model, path):
    return AUTO[type(model).__name__].from_pretrained(path)


def _load_quantized(model, path):
    return qbert.load_quantized(path)


ROUTES = [
    pytest.param(_save_file, _load_quantized, id="file-load_quantized"),
    pytest.param(_save_directory, _load_quantized, id="directory-load_quantized"),
    pytest.param(_save_directory, _from_pretrained, id="directory-from_pretrained"),
    pytest.param(_save_pretrained, _load_quantized, id="save_pretrained-load_quantized"),
    pytest.param(_save_pretrained, _from_pretrained, id="save_pretrained-from_pretrained"),
]


@pytest.mark.parametrize("class_name,mode", [
    pytest.param("BertForSequenceClassification", "w8a8", id="bert-cls-w8a8"),
    pytest.param("BertForSequenceClassification", "w4a16", id="bert-cls-w4a16"),
    pytest.param("DistilBertModel", "w8a8", id="distilbert-w8a8"),
])
@pytest.mark.parametrize("save,load", ROUTES)
def test_a_pruned_quantized_model_round_trips_bit_identically(tmp_path, class_name, mode, save, load):
    model = qbert.quantize(_pruned(class_name), mode)
    loaded = load(model, save(model, tmp_path))
    assert type(loaded) is type(model)
    assert torch.equal(first_output(loaded), first_output(model))
    assert pruning_record(loaded) == RECORD
    assert _shapes(loaded) == _shapes(model)
    def qlinear_shapes(m):
        return {name: (q.in_features, q.out_features) for name, q in m.named_modules()
                if isinstance(q, QLinear)}

    assert qlinear_shapes(loaded) == qlinear_shapes(model)
    fused = [name for name, m in loaded.named_modules() if isinstance(m, FusedLayer)]
    assert fused == [name for name, m in model.named_modules() if isinstance(m, FusedLayer)]
    fusable = mode == "w8a8" and class_name.startswith("Bert")  # the fused W8A8 chain covers the BERT layout
    assert len(fused) == (len(RECORD["heads"]) if fusable else 0), fused


def test_a_pruned_float_directory_quantizes_on_load(tmp_path):
    pruned = _pruned()
    pruned.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, quantization_config=qbert.QbertConfig("w8a8"))
    reference = qbert.quantize(_pruned(), "w8a8")
    assert torch.equal(first_output(loaded), first_output(reference))
    assert loaded.qbert_summary == reference.qbert_summary and pruning_record(loaded) == RECORD


# ---- tampered records: refused on the meta device -------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A pruned w8a8 BertForSequenceClassification saved as a directory (config.json and the weights)."""
    return _save_directory(qbert.quantize(_pruned(), "w8a8"), tmp_path)


def _in_file(directory, record) -> None:
    def change(metadata):
        config = json.loads(metadata[KEY_CONFIG])
        config[RECORD_ATTR] = record
        metadata[KEY_CONFIG] = json.dumps(config)

    _rewrite(directory / WEIGHTS_NAME, change_metadata=change)


def _in_config_json(directory, record) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    config[RECORD_ATTR] = record
    path.write_text(json.dumps(config))


def _load_file(directory):
    return qbert.load_quantized(directory / WEIGHTS_NAME)


def _load_directory_from_pretrained(directory):
    return transformers.AutoModelForSequenceClassification.from_pretrained(directory)


# Where the record is edited, and the loader that reads it from there.
READERS = [
    pytest.param(_in_file, _load_file, "load_quantized: ", id="file-load_quantized"),
    pytest.param(_in_config_json, _load_directory_from_pretrained, "from_pretrained: load_quantized: ",
                 id="config.json-from_pretrained"),
]
QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("record,problem", [
    pytest.param({**RECORD, "heads": [3, 3]}, rf"quantized layer '{QUERY}' is \[in=64, out=32\] but the "
                 r"rebuilt model has Linear\(in_features=64, out_features=48", id="other-counts"),
    pytest.param({**RECORD, "intermediate": [85, 128]},
                 r"quantized layer 'bert.encoder.layer.1.intermediate.dense' is \[in=64, out=127\] but the "
                 r"rebuilt model has Linear\(in_features=64, out_features=128",
                 id="other-neuron-counts"),
    pytest.param({**RECORD, "heads": [2, 5]},
                 r"the config's pruning record \('qbert_pruning'\) does not fit the "
                 r"BertForSequenceClassification it builds: apply_structure: record field 'heads'\[1\] must "
                 r"be an int in 1..4",
                 id="more-heads-than-built"),
    pytest.param({**RECORD, "heads": [2]}, r"record field 'heads' has 1 entries, the model has 2 layers",
                 id="too-few-layers"),
    pytest.param({**RECORD, "version": 2}, r"record field 'version' must be 1, got 2", id="version"),
    pytest.param([2, 3], r"the record must be a dict, got list", id="not-a-dict"),
])
@pytest.mark.parametrize("edit,load,prefix", READERS)
def test_a_tampered_record_is_refused_before_anything_real_is_built(saved, nothing_real, record,  # noqa: F811
                                                                   problem, edit, load, prefix):
    edit(saved, record)
    with pytest.raises(qbert.QuantizedFileError, match=f"{prefix}{saved}.*{problem}"):
        load(saved)
