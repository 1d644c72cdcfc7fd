"""qbert.QbertConfig with transformers: quantize while loading, save_pretrained / from_pretrained round trips,
directory saves and loads in qbert.io, bad configs and directories, and import order (transformers without
qbert: tests/nn/test_hf_without_qbert.py)."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

import qbert
import qbert.hf
from qbert.hf import QbertConfig, QbertHfQuantizer
from qbert.io import (
    CONFIG_NAME,
    KEY_CHECKSUM,
    KEY_LAYERS,
    PLACEHOLDER_SUFFIX,
    SHARDED_INDEX_NAME,
    WEIGHTS_NAME,
)
from qbert.nn import QLinear, linear_format
from tests.nn._tiny_models import build, first_output
from tests.nn.test_io_hostile import nothing_real  # noqa: F401 (fixture)

# Each family, a class with heads, and the Auto class that loads it.
AUTO_CLASSES = {
    "BertModel": "AutoModel",
    "BertForMaskedLM": "AutoModelForMaskedLM",
    "RobertaForSequenceClassification": "AutoModelForSequenceClassification",
    "RobertaForMaskedLM": "AutoModelForMaskedLM",
    "DistilBertForQuestionAnswering": "AutoModelForQuestionAnswering",
    "AlbertForPreTraining": "AutoModelForPreTraining",
    "ElectraForPreTraining": "AutoModelForPreTraining",
}
HEADER_LENGTH_BYTES = 8  # safetensors: an 8-byte little-endian header length, the JSON header, the data
PLAN_LAYERS = {"bert.encoder.layer.0.attention.self.query": "w4a16", "bert.encoder.layer.1.output.dense": "w8a8",
               "classifier": "w2a8"}


def _plan(layers=PLAN_LAYERS) -> qbert.Plan:
    return qbert.Plan({name: linear_format(fmt) for name, fmt in layers.items()})


# (class, family, format, options): every family in w8a8, and the other kinds of format and option.
CASES = [
    pytest.param("BertModel", None, "w8a8", {}, id="bert-w8a8"),
    pytest.param("BertModel", "minilm", "w8a8", {}, id="minilm-w8a8"),
    pytest.param("BertForMaskedLM", None, "w8a8", {"include_head": True}, id="bert-mlm-tied-head-w8a8"),
    pytest.param("RobertaForSequenceClassification", None, "w4a16", {"group_size": 32},
                 id="roberta-cls-w4a16-g32"),
    pytest.param("RobertaForMaskedLM", None, "w8a16", {}, id="roberta-mlm-w8a16"),
    pytest.param("DistilBertForQuestionAnswering", None, "w8a8", {"skip": ["*.ffn.*"]}, id="distilbert-qa-skip"),
    pytest.param("AlbertForPreTraining", None, "w8a8", {}, id="albert-shared-w8a8"),
    pytest.param("ElectraForPreTraining", None, linear_format("w3a8"), {"fuse": False},
                 id="electra-w3a8-unfused"),
    pytest.param("BertForSequenceClassification", None, _plan(), {}, id="bert-cls-plan"),
]


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    """class (and family) -> a directory holding the tiny random-init float model's save_pretrained."""
    made = {}

    def get(class_name: str, family: str | None = None):
        key = (class_name, family)
        if key not in made:
            made[key] = tmp_path_factory.mktemp(f"{class_name}-{family}")
            build(class_name, family).save_pretrained(made[key])
        return made[key]

    return get


def _auto(class_name: str):
    return getattr(transformers, AUTO_CLASSES.get(class_name, class_name))


def _assert_identical(model, reference) -> None:
    """Same class, bit-identical outputs, the same tensors (names, dtypes, values), the same summary."""
    assert type(model) is type(reference)
    assert torch.equal(first_output(model), first_output(reference))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    assert model.qbert_summary == reference.qbert_summary


def _quantized_on_load(float_dirs, class_name, family, fmt, options):
    return _auto(class_name).from_pretrained(float_dirs(class_name, family),
                                             quantization_config=QbertConfig(fmt, **options))


@pytest.mark.parametrize("class_name,family,fmt,options", CASES)
def test_from_pretrained_with_a_qbert_config_equals_quantize(float_dirs, class_name, family, fmt, options):
    loaded = _quantized_on_load(float_dirs, class_name, family, fmt, options)
    reference = qbert.quantize(build(class_name, family), fmt, **options)
    _assert_identical(loaded, reference)
    assert isinstance(loaded.config.quantization_config, QbertConfig)
    assert isinstance(loaded.hf_quantizer, QbertHfQuantizer)


@pytest.mark.parametrize("class_name,family,fmt,options", CASES)
def test_save_pretrained_then_from_pretrained_restores_the_model(float_dirs, tmp_path, class_name, family, fmt,
                                                                 options):
    loaded = _quantized_on_load(float_dirs, class_name, family, fmt, options)
    loaded.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())["quantization_config"]
    assert config["quant_method"] == "qbert"
    assert [e["names"] for e in config["layers"]] == [
        [n for n, m in loaded.named_modules(remove_duplicate=False) if m is q]
        for q in dict.fromkeys(m for m in loaded.modules() if isinstance(m, QLinear))]
    _assert_identical(_auto(class_name).from_pretrained(tmp_path), loaded)


def _header_length(path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
    return length


def test_a_saved_directory_holds_the_packed_codes(float_dirs, tmp_path):
    loaded = _quantized_on_load(float_dirs, "BertModel", None, "w4a16", {"group_size": 32})
    loaded.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    stored = sum(t.numel() * t.element_size() for t in qbert.io.tensors_to_save(loaded).values())
    assert weights.stat().st_size == HEADER_LENGTH_BYTES + _header_length(weights) + stored
    float_stored = (float_dirs("BertModel") / WEIGHTS_NAME).stat().st_size
    assert stored < float_stored
    with safe_open(weights, framework="pt") as f:
        assert f.get_slice("encoder.layer.0.attention.self.query.w_packed").get_dtype() == "I32"


def test_quantizing_on_load_holds_one_float_layer_at_a_time(float_dirs, monkeypatch):
    alive = []
    quantize_one = QbertHfQuantizer._quantize

    def counting(self, model, pending):
        alive.append(sum(not p.linear.weight.is_meta for p in self._waiting.values()))
        quantize_one(self, model, pending)

    monkeypatch.setattr(QbertHfQuantizer, "_quantize", counting)
    model = _quantized_on_load(float_dirs, "BertModel", None, "w8a8", {})
    assert len(alive) == len(model.qbert_summary.swapped) and set(alive) == {1}


@pytest.mark.parametrize("class_name,options", [
    pytest.param("BertForMaskedLM", {}, id="bert-mlm"),
    pytest.param("BertForMaskedLM", {"include_head": True}, id="bert-mlm-quantized-tied-decoder"),
    pytest.param("RobertaForMaskedLM", {}, id="roberta-mlm"),
    pytest.param("AlbertForPreTraining", {}, id="albert-pretraining"),
])
def test_a_save_quantized_file_and_a_save_pretrained_directory_hold_the_same_tensors(float_dirs, tmp_path,
                                                                                    class_name, options):
    model = _quantized_on_load(float_dirs, class_name, None, "w8a8", options)
    file = tmp_path / "model.safetensors"
    qbert.save_quantized(model, file)
    model.save_pretrained(tmp_path / "dir")
    placeholders = {f"{name}{PLACEHOLDER_SUFFIX}" for name, m in model.named_modules(remove_duplicate=False)
                    if isinstance(m, QLinear)}
    with safe_open(file, framework="pt") as a, safe_open(tmp_path / "dir" / WEIGHTS_NAME, framework="pt") as b:
        assert placeholders <= set(a.keys())
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
        for key in (KEY_LAYERS, KEY_CHECKSUM):
            assert a.metadata()[key] == b.metadata()[key]


def test_save_quantized_into_a_directory_writes_what_from_pretrained_and_load_quantized_read(tmp_path):
    model = qbert.quantize(build("BertForSequenceClassification"), "w8a8")
    target = tmp_path / "saved"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")  # a file of another tool's stays
    qbert.save_quantized(model, target)
    assert sorted(os.listdir(target)) == [CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json"]
    assert os.listdir(tmp_path) == ["saved"]  # no temporary directory left
    _assert_identical(transformers.AutoModelForSequenceClassification.from_pretrained(target), model)
    from_dir = qbert.load_quantized(target)
    assert torch.equal(first_output(from_dir), first_output(model))
    assert torch.equal(first_output(qbert.load_quantized(target / WEIGHTS_NAME)), first_output(model))


def test_a_path_ending_in_a_separator_is_a_new_directory(tmp_path):
    model = qbert.quantize(build("BertModel"), "w8a16")
    qbert.save_quantized(model, f"{tmp_path / 'new'}{os.sep}")
    assert sorted(os.listdir(tmp_path / "new")) == [CONFIG_NAME, WEIGHTS_NAME]


def test_a_directory_save_removes_the_temp_directories_a_killed_save_left(tmp_path):
    from tests.nn.test_io import _dead_pid

    stale = tmp_path / f".saved.{_dead_pid()}.k1ll3d_9{qbert.io.TEMP_SUFFIX}"
    stale.mkdir()
    (stale / WEIGHTS_NAME).write_bytes(b"partial")
    qbert.save_quantized(qbert.quantize(build("BertModel"), "w8a8"), f"{tmp_path / 'saved'}{os.sep}")
    assert os.listdir(tmp_path) == ["saved"]


def test_a_fuse_false_directory_loads_unfused(float_dirs, tmp_path):
    model = _quantized_on_load(float_dirs, "BertModel", None, "w8a8", {"fuse": False})
    model.save_pretrained(tmp_path)
    loaded = qbert.load_quantized(tmp_path)
    assert torch.equal(first_output(loaded), first_output(model))
    assert not any(type(m).__name__.startswith("Fused") for m in loaded.modules())


def test_a_model_quantized_in_place_saves_with_save_pretrained(tmp_path):
    # qbert.quantize marks a transformers model (qbert.hf.attach) so that save_pretrained writes qbert's config.
    model = qbert.quantize(build("RobertaForSequenceClassification"), "w8a8", skip=("*.layer.1.*",))
    model.save_pretrained(tmp_path)
    _assert_identical(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path), model)


def test_attach_refuses_a_model_without_qbert_layers():
    with pytest.raises(ValueError, match="qbert.hf: BertModel has no QLinear layer"):
        qbert.hf.attach(build("BertModel"))
    with pytest.raises(TypeError, match="qbert.hf.attach: Linear holds no transformers model"):
        qbert.hf.attach(torch.nn.Linear(2, 2))


# ---- QbertConfig ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,options", [
    pytest.param("w8a8", {"skip": ["pooler*"], "include_head": True}, id="mode"),
    pytest.param("w4a16", {"group_size": 64, "symmetric": True}, id="mode-overrides"),
    pytest.param(linear_format("w3a16", row_groups=4), {}, id="linear-format"),
    pytest.param(_plan(), {"fuse": False}, id="plan"),
])
def test_a_config_survives_json(fmt, options):
    config = QbertConfig(fmt, **options)
    again = QbertConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict() and again.format == config.format
    assert again.label() == config.label()


@pytest.mark.parametrize("arguments,error,match", [
    pytest.param({"format": "w9a9"}, ValueError, "QbertConfig: unknown quantization mode 'w9a9'", id="unknown"),
    pytest.param({"format": 8}, TypeError, "QbertConfig: format must be a mode name", id="format-type"),
    pytest.param({"format": "w8a8", "group_size": 64}, ValueError, "w8a8 is per-channel symmetric int8",
                 id="w8a8-override"),
    pytest.param({"skip": "pooler"}, TypeError, "QbertConfig: skip must be a sequence of patterns", id="skip-str"),
    pytest.param({"fuse": 1}, TypeError, "QbertConfig: fuse must be bool", id="fuse-type"),
    pytest.param({"format": _plan(), "include_head": True}, ValueError, "QbertConfig: a plan names every layer",
                 id="plan-options"),
    pytest.param({"quant_method": "bitsandbytes"}, ValueError, "QbertConfig: quant_method must be 'qbert'",
                 id="quant-method"),
    pytest.param({"layers": {}}, TypeError, "QbertConfig: layers must be a list", id="layers-type"),
    pytest.param({"kept_float": {"a": 1}}, TypeError, "QbertConfig: kept_float must map", id="kept-float"),
])
def test_a_bad_config_is_refused(arguments, error, match):
    with pytest.raises(error, match=match):
        QbertConfig(**arguments)


def test_an_unknown_format_in_a_config_dict_fails_at_from_pretrained(float_dirs):
    with pytest.raises(ValueError, match="QbertConfig: unknown quantization mode 'w9a9'"):
        transformers.AutoModel.from_pretrained(float_dirs("BertModel"),
                                               quantization_config={"quant_method": "qbert", "format": "w9a9"})


def test_an_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match=r"QbertConfig.from_dict: unknown keys \['bits'\]"):
        QbertConfig.from_dict({"quant_method": "qbert", "format": "w8a8", "bits": 4})


def test_a_plan_naming_a_missing_layer_fails_at_from_pretrained(float_dirs):
    plan = _plan({"bert.encoder.layer.7.output.dense": "w8a8"})
    with pytest.raises(ValueError, match=r"from_pretrained\(quantization_config=QbertConfig\): the plan names "
                                         r"'bert.encoder.layer.7.output.dense', which is no module"):
        transformers.AutoModelForSequenceClassification.from_pretrained(
            float_dirs("BertForSequenceClassification"), quantization_config=QbertConfig(plan))


def test_a_plan_naming_gptq_rounding_is_refused_by_the_config():
    """from_pretrained quantizes while loading, with no calibration data for GPTQ."""
    plan = _plan()
    plan = qbert.Plan(plan.layers, rounding={"classifier": qbert.nn.Rounding("gptq")})
    with pytest.raises(ValueError, match=r"QbertConfig: the plan names GPTQ rounding for classifier; "
                                         r"from_pretrained quantizes while the weights load"):
        QbertConfig(plan)
    nearest = qbert.Plan(plan.layers, rounding={"classifier": qbert.nn.Rounding("nearest")})
    assert QbertConfig(nearest).format is nearest


# ---- bad qbert directories --------------------------------------------------------------------------

@pytest.fixture
def saved_dir(float_dirs, tmp_path):
    """A qbert directory (save_pretrained of a BertForSequenceClassification quantized on load)."""
    model = _quantized_on_load(float_dirs, "BertForSequenceClassification", None, "w8a8", {})
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(directory, change) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _rewrite_weights(directory, change_tensors=None, change_metadata=None) -> None:
    from tests.nn.test_io import _rewrite

    _rewrite(directory / WEIGHTS_NAME, change_metadata=change_metadata, change_tensors=change_tensors)


def _from_pretrained(directory, **kwargs):
    return transformers.AutoModelForSequenceClassification.from_pretrained(directory, **kwargs)


def _widen_query_scale(tensors) -> None:
    tensors["bert.encoder.layer.0.attention.self.query.w_scale"] = torch.ones(65)


QUERY = "bert.encoder.layer.0.attention.self.query"


def _float_query_weight(tensors) -> None:
    tensors[f"{QUERY}.weight"] = torch.zeros(64, 64)


def _placeholder_for_the_classifier(tensors) -> None:
    tensors["classifier.weight"] = tensors[f"{QUERY}.weight"]


def _drop_a_layer(config) -> None:
    config["quantization_config"]["layers"].pop()


BAD_DIRECTORIES = [
    pytest.param(lambda d: _rewrite_weights(d, change_tensors=_widen_query_scale),
                 r"tensor 'bert.encoder.layer.0.attention.self.query.w_scale' is \[65\]", id="tensor-shape"),
    pytest.param(lambda d: _edit_config(d, _drop_a_layer),
                 "the quantization_config's layers differ from the weights' metadata 'qbert.layers'",
                 id="layers-differ"),
    pytest.param(lambda d: _rewrite_weights(d, change_metadata=lambda m: m.pop(KEY_CHECKSUM)),
                 r"lacks the metadata \['qbert.checksum'\]", id="no-checksum"),
    pytest.param(lambda d: _rewrite_weights(d, change_metadata=lambda m: m.clear()),
                 "is not a qbert quantized model", id="not-qbert-weights"),
    pytest.param(lambda d: _rewrite_weights(d, change_tensors=lambda t: t.pop(f"{QUERY}.weight")),
                 rf"the placeholder tensors \['{QUERY}.weight'\] are missing", id="placeholder-missing"),
    pytest.param(lambda d: _rewrite_weights(d, change_tensors=_float_query_weight),
                 rf"tensor '{QUERY}.weight' is \[64, 64\] torch.float32 in the file, but the placeholder of a "
                 rf"quantized layer is \[0\] torch.uint8", id="placeholder-a-float-weight"),
    pytest.param(lambda d: _rewrite_weights(d, change_tensors=_placeholder_for_the_classifier),
                 r"tensors \['classifier.weight'\] are placeholders", id="placeholder-for-a-float-layer"),
]


@pytest.mark.parametrize("spoil,problem", BAD_DIRECTORIES)
def test_from_pretrained_refuses_weights_that_do_not_match_the_config(saved_dir, nothing_real, spoil, problem):  # noqa: F811
    spoil(saved_dir)
    with pytest.raises(qbert.QuantizedFileError, match=f"from_pretrained: load_quantized: .*{problem}"):
        _from_pretrained(saved_dir)


@pytest.mark.parametrize("spoil,problem", BAD_DIRECTORIES)
def test_load_quantized_refuses_the_same_directories(saved_dir, nothing_real, spoil, problem):  # noqa: F811
    spoil(saved_dir)
    with pytest.raises(qbert.QuantizedFileError, match=f"load_quantized: .*{problem}"):
        qbert.load_quantized(saved_dir)


def _flip_a_data_byte(directory) -> None:
    from tests.nn.test_io_hostile import _flip_a_data_byte as flip

    flip(directory / WEIGHTS_NAME)


def test_from_pretrained_checks_the_checksum(saved_dir):
    _flip_a_data_byte(saved_dir)
    with pytest.raises(qbert.QuantizedFileError, match="from_pretrained: load_quantized: .*checksum mismatch"):
        _from_pretrained(saved_dir)


def test_from_pretrained_drops_the_placeholders_without_a_word(saved_dir, caplog):
    model, info = _from_pretrained(saved_dir, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert "LOAD REPORT" not in caplog.text
    fresh = transformers.BertForSequenceClassification(model.config)._keys_to_ignore_on_load_unexpected
    assert model._keys_to_ignore_on_load_unexpected == fresh  # qbert's patterns are gone after the load


def test_from_pretrained_refuses_layers_missing_from_the_config(saved_dir):
    _edit_config(saved_dir, lambda c: c["quantization_config"].update(layers=None))
    with pytest.raises(qbert.QuantizedFileError, match="config.json's quantization_config has no 'layers'"):
        _from_pretrained(saved_dir)


def test_from_pretrained_refuses_another_float_dtype(saved_dir):
    with pytest.raises(qbert.QuantizedFileError, match="saved in float32; load it with dtype=float32 or 'auto', "
                                                       "not torch.bfloat16"):
        _from_pretrained(saved_dir, dtype=torch.bfloat16)


@pytest.mark.parametrize("spoil,problem", [
    pytest.param(lambda d: (d / WEIGHTS_NAME).unlink(), "is a directory without model.safetensors: it is not a "
                 "qbert quantized model directory", id="no-weights"),
    pytest.param(lambda d: ((d / WEIGHTS_NAME).rename(d / "model-00001-of-00002.safetensors"),
                            (d / SHARDED_INDEX_NAME).write_text("{}")), "holds a sharded checkpoint", id="sharded"),
    pytest.param(lambda d: (d / CONFIG_NAME).unlink(), "has model.safetensors but no config.json", id="no-config"),
    pytest.param(lambda d: (d / CONFIG_NAME).write_text("{"), "config.json is not a readable JSON file",
                 id="config-not-json"),
    pytest.param(lambda d: _edit_config(d, lambda c: c.pop("quantization_config")),
                 "config.json has no qbert quantization_config", id="no-quantization-config"),
    pytest.param(lambda d: _edit_config(d, lambda c: c["quantization_config"].update(fuse="yes")),
                 "quantization_config 'fuse' must be true or false", id="fuse-not-bool"),
])
def test_load_quantized_refuses_a_directory_that_is_not_a_qbert_save(saved_dir, nothing_real, spoil, problem):  # noqa: F811
    spoil(saved_dir)
    with pytest.raises(qbert.QuantizedFileError, match=f"load_quantized: .*{problem}"):
        qbert.load_quantized(saved_dir)


def test_load_quantized_refuses_an_oversized_config(saved_dir, monkeypatch):
    monkeypatch.setattr(qbert.io, "MAX_CONFIG_BYTES", 10)
    with pytest.raises(qbert.QuantizedFileError, match=r"config.json is \d+ bytes; a config.json has at most 10"):
        qbert.load_quantized(saved_dir)


# ---- import order, and transformers without qbert ---------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


@pytest.mark.slow
@pytest.mark.parametrize("imports", [
    pytest.param("import qbert\nassert 'transformers' not in sys.modules\nimport transformers", id="qbert-first"),
    pytest.param("import transformers.quantizers.auto\nimport qbert\nimport transformers", id="transformers-first"),
    pytest.param("import qbert\nassert 'transformers' not in sys.modules\nqbert.QbertConfig\nimport transformers",
                 id="config-first"),
])
def test_import_qbert_is_all_from_pretrained_needs(saved_dir, imports):
    done = _python(f"import sys\n{imports}\n"
                   f"model = transformers.AutoModelForSequenceClassification.from_pretrained({str(saved_dir)!r})\n"
                   f"print(type(model.hf_quantizer).__name__, model.qbert_summary.mode)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["QbertHfQuantizer", "w8a8"]



# ---- sharded directories, and a file's own quantization_config -------------------------------------

SHARD_SIZE = "100KB"  # splits the tiny BertForMaskedLM into three shards


@pytest.fixture
def sharded_dir(float_dirs, tmp_path):
    model = _quantized_on_load(float_dirs, "BertForMaskedLM", None, "w8a8", {})
    model.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    return tmp_path, model


def _shards(directory) -> list:
    return sorted(p for p in directory.iterdir() if p.suffix == ".safetensors")


def test_a_sharded_directory_round_trips_through_from_pretrained(sharded_dir):
    directory, model = sharded_dir
    assert len(_shards(directory)) > 1
    _assert_identical(transformers.AutoModelForMaskedLM.from_pretrained(directory), model)
    with pytest.raises(qbert.QuantizedFileError, match="holds a sharded checkpoint"):
        qbert.load_quantized(directory)


def test_shards_of_different_saves_are_refused(sharded_dir):
    from tests.nn.test_io import _rewrite

    directory, _ = sharded_dir
    _rewrite(_shards(directory)[1], change_metadata=lambda m: m.update({KEY_CHECKSUM: "sha256:" + "0" * 64}))
    with pytest.raises(qbert.QuantizedFileError, match="its metadata differs from that of"):
        transformers.AutoModelForMaskedLM.from_pretrained(directory)


def test_a_tensor_in_two_shards_is_refused(sharded_dir):
    from safetensors.torch import load_file

    from tests.nn.test_io import _rewrite

    directory, _ = sharded_dir
    first, second = _shards(directory)[:2]
    _rewrite(second, change_tensors=lambda t: t.update(load_file(first)))
    with pytest.raises(qbert.QuantizedFileError, match=r"tensors \[.*\] are in another shard too"):
        transformers.AutoModelForMaskedLM.from_pretrained(directory)


def test_a_file_naming_another_quantization_method_is_refused(tmp_path):
    from tests.nn.test_io import _rewrite

    path = tmp_path / WEIGHTS_NAME
    qbert.save_quantized(qbert.quantize(build("BertModel"), "w8a8"), path)

    def name_bitsandbytes(metadata):
        config = json.loads(metadata[qbert.io.KEY_CONFIG])
        config["quantization_config"] = {"quant_method": "bitsandbytes"}
        metadata[qbert.io.KEY_CONFIG] = json.dumps(config)

    _rewrite(path, change_metadata=name_bitsandbytes)
    with pytest.raises(qbert.QuantizedFileError, match="the config's quantization_config is not qbert's"):
        qbert.load_quantized(path)


def test_a_float_checkpoint_of_the_wrong_shape_fails_naming_the_tensor(tmp_path, caplog):
    from tests.nn.test_io import _rewrite

    build("BertModel").save_pretrained(tmp_path)
    name = "encoder.layer.0.attention.self.query.weight"
    _rewrite(tmp_path / WEIGHTS_NAME, change_tensors=lambda t: t.update({name: torch.zeros(64, 65)}))
    with pytest.raises(RuntimeError, match="issues during automatic conversion"):
        transformers.AutoModel.from_pretrained(tmp_path, quantization_config=QbertConfig("w8a8"))
    assert f"{name} is [64, 65] in the checkpoint, but the model's nn.Linear expects [64, 64]" in caplog.text


def test_a_qbert_model_needs_checkpoint_files(saved_dir):
    config = transformers.AutoConfig.from_pretrained(saved_dir)
    with pytest.raises(qbert.QuantizedFileError, match="a qbert model loads from safetensors checkpoint files"):
        transformers.BertForSequenceClassification.from_pretrained(None, config=config, state_dict={})
