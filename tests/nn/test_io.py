import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import qbert
import qbert.io
from qbert.io import (
    CHECKSUM_SINCE_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    KEY_CHECKSUM,
    KEY_CONFIG,
    KEY_FORMAT,
    KEY_FORMAT_VERSION,
    KEY_LAYERS,
    PLACEHOLDER_DTYPE,
    PLACEHOLDER_SHAPE,
    PLACEHOLDER_SUFFIX,
    TEMP_SUFFIX,
)
from qbert.nn import QLinear
from tests.nn._tiny_models import build, first_output, linear_names

FILE_NAME = "model.safetensors"


def _quantized(class_name: str, mode: str = "w8a8", include_head: bool = False, dtype=torch.float32,
               **config_overrides) -> nn.Module:
    model = build(class_name, **config_overrides).to(dtype)
    return qbert.quantize(model, mode, include_head=include_head)


@pytest.fixture
def saved(tmp_path):
    """A quantized BertForSequenceClassification saved to tmp_path; returns the path."""
    path = tmp_path / FILE_NAME
    qbert.save_quantized(_quantized("BertForSequenceClassification"), path)
    return path


def _quoted(path) -> str:
    """``path`` as a regex that matches it literally."""
    return re.escape(str(path))


def _rewrite(path, change_metadata=None, change_tensors=None) -> None:
    """Rewrite the file at ``path`` with edited metadata and/or tensors (to make broken files)."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    if change_metadata:
        change_metadata(metadata)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("class_name,mode,include_head,dtype", [
    pytest.param("BertForMaskedLM", "w8a8", False, torch.float32, id="bert-mlm-tied-head-w8a8"),
    pytest.param("BertModel", "w8a16", False, torch.bfloat16, id="bert-bf16-w8a16"),
    pytest.param("RobertaForSequenceClassification", "w8a16", True, torch.float32,
                 id="roberta-cls-heads-w8a16"),
    pytest.param("DistilBertForQuestionAnswering", "w8a8", True, torch.float32,
                 id="distilbert-qa-heads-w8a8"),
    pytest.param("DistilBertForMaskedLM", "w8a8", True, torch.float32, id="distilbert-mlm-untied-head-w8a8"),
    pytest.param("AlbertForPreTraining", "w8a8", False, torch.float32, id="albert-pretraining-w8a8"),
    pytest.param("ElectraForPreTraining", "w8a16", False, torch.float32, id="electra-pretraining-w8a16"),
])
def test_round_trip_is_bit_identical(tmp_path, class_name, mode, include_head, dtype):
    model = _quantized(class_name, mode, include_head, dtype)
    path = tmp_path / FILE_NAME
    qbert.save_quantized(model, path)
    loaded = qbert.load_quantized(path)

    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(first_output(loaded), first_output(model))
    assert linear_names(loaded, QLinear) == linear_names(model, QLinear)
    assert linear_names(loaded) == linear_names(model)
    modes = {name: m.mode for name, m in loaded.named_modules() if isinstance(m, QLinear)}
    assert modes == {name: m.mode for name, m in model.named_modules() if isinstance(m, QLinear)}
    if model.get_output_embeddings() is not None and not include_head:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert os.listdir(tmp_path) == [FILE_NAME]


def test_albert_sharing_survives_a_round_trip(tmp_path):
    model = _quantized("AlbertModel", num_hidden_layers=4, num_hidden_groups=2)
    path = tmp_path / FILE_NAME
    qbert.save_quantized(model, path)
    loaded = qbert.load_quantized(path)
    count = len([m for m in model.modules() if isinstance(m, QLinear)])
    assert len([m for m in loaded.modules() if isinstance(m, QLinear)]) == count
    assert torch.equal(first_output(loaded), first_output(model))


def test_a_layer_with_two_names_stays_shared(tmp_path):
    # BertModel with its pooler Linear also registered under a second name.
    model = build("BertModel")
    model.pooler.alias = model.encoder.layer[0].output.dense
    qbert.quantize(model, "w8a8")
    path = tmp_path / FILE_NAME
    qbert.save_quantized(model, path)
    with safe_open(path, framework="pt") as f:
        entries = json.loads(f.metadata()[KEY_LAYERS])
    assert ["encoder.layer.0.output.dense", "pooler.alias"] in [e["names"] for e in entries]


def test_metadata_layout(saved):
    with safe_open(saved, framework="pt") as f:
        metadata = f.metadata()
    assert metadata[KEY_FORMAT] == FORMAT_NAME and metadata[KEY_FORMAT_VERSION] == str(FORMAT_VERSION)
    assert metadata["qbert.model_class"] == "BertForSequenceClassification"
    assert json.loads(metadata[KEY_CONFIG])["hidden_size"] == 64
    assert re.fullmatch("sha256:[0-9a-f]{64}", metadata[KEY_CHECKSUM])
    entry = json.loads(metadata[KEY_LAYERS])[0]
    assert entry == {"names": ["bert.encoder.layer.0.attention.self.query"], "mode": "w8a8",
                     "format": {"name": "w8a8", "weight_bits": 8, "activation_bits": 8, "symmetric": True,
                                "group_size": None, "row_groups": None},
                     "in_features": 64, "out_features": 64, "bias": True, "bias_dtype": "float32"}


def test_a_failed_save_leaves_the_earlier_file_intact(saved, monkeypatch):
    before = saved.read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(qbert.io, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        qbert.save_quantized(_quantized("BertModel", "w8a16"), saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [FILE_NAME]


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_a_save_writes_a_temp_file_named_for_its_target_and_process(saved, monkeypatch):
    written = []

    def record_then_fail(tensors, filename, metadata=None):
        written.append(os.path.basename(filename))
        raise OSError("No space left on device")

    monkeypatch.setattr(qbert.io, "save_file", record_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        qbert.save_quantized(_quantized("BertModel"), saved)
    assert re.fullmatch(rf"\.{re.escape(FILE_NAME)}\.{os.getpid()}\.[a-z0-9_]+{re.escape(TEMP_SUFFIX)}",
                        written[0])


def test_a_save_removes_the_temp_files_a_killed_save_left(saved):
    dead = _dead_pid()
    stale = f".{FILE_NAME}.{dead}.k1ll3d_9{TEMP_SUFFIX}"
    kept = [
        f".{FILE_NAME}.{os.getpid()}.l1ve0000{TEMP_SUFFIX}",  # a save still running (this process)
        f".other.safetensors.{dead}.k1ll3d_9{TEMP_SUFFIX}",  # another target's
        f".{FILE_NAME}.{dead}.k1ll3d_9.tmp",  # not qbert's suffix
        f"{FILE_NAME}.{dead}.k1ll3d_9{TEMP_SUFFIX}",  # not hidden: not a name qbert writes
        f"{FILE_NAME}.bak",
    ]
    for name in (stale, *kept):
        (saved.parent / name).write_bytes(b"partial")
    qbert.save_quantized(_quantized("BertModel"), saved)
    assert sorted(os.listdir(saved.parent)) == sorted([FILE_NAME, *kept])


def _drop_placeholders(tensors) -> None:
    """A version 4 file's tensors as versions 1-3 store them: without the placeholders."""
    for key, tensor in list(tensors.items()):
        if tensor.shape == PLACEHOLDER_SHAPE and tensor.dtype == PLACEHOLDER_DTYPE:
            del tensors[key]


def _as_version(version: int):
    def change(metadata):
        metadata[KEY_FORMAT_VERSION] = str(version)
        if version < CHECKSUM_SINCE_VERSION:
            del metadata[KEY_CHECKSUM]
    return change


def test_a_version_3_file_loads_without_placeholders(tmp_path):
    model = _quantized("BertModel", "w4a16")
    path = tmp_path / FILE_NAME
    qbert.save_quantized(model, path)
    _rewrite(path, change_metadata=_as_version(3), change_tensors=_drop_placeholders)
    assert torch.equal(first_output(qbert.load_quantized(path)), first_output(model))


def test_an_older_version_file_loads_with_a_warning_to_save_it_again(tmp_path):
    model = _quantized("BertModel")
    path = tmp_path / FILE_NAME
    qbert.save_quantized(model, path)
    _rewrite(path, change_metadata=_as_version(2), change_tensors=_drop_placeholders)
    with pytest.warns(UserWarning, match=f"{_quoted(path)} has format version 2, which has no checksum.*"
                                         f"save the model again with this qbert"):
        loaded = qbert.load_quantized(path)
    assert torch.equal(first_output(loaded), first_output(model))


# ---- placeholders (format version 4) ----------------------------------------------------------------

def _placeholder_keys(path) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return sorted(k for k in f.keys() if f.get_slice(k).get_shape() == list(PLACEHOLDER_SHAPE)  # noqa: SIM118
                      and f.get_slice(k).get_dtype() == "U8")


def test_a_file_holds_a_placeholder_for_every_name_of_every_quantized_layer(tmp_path):
    model = build("BertModel")
    model.pooler.alias = model.encoder.layer[0].output.dense  # one layer, two names
    qbert.quantize(model, "w8a8")
    path = tmp_path / FILE_NAME
    qbert.save_quantized(model, path)
    names = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QLinear)]
    assert "pooler.alias" in names
    assert _placeholder_keys(path) == sorted(f"{name}{PLACEHOLDER_SUFFIX}" for name in names)
    with safe_open(path, framework="pt") as f:  # the checksum is the state_dict's, placeholders excluded
        assert f.metadata()[KEY_CHECKSUM] == qbert.io.state_dict_checksum(model.state_dict())


def _placeholder_of(key: str, tensor: torch.Tensor):
    return lambda tensors: tensors.update({key: tensor})


QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("change_tensors,problem", [
    pytest.param(lambda t: t.pop(f"{QUERY}.weight"),
                 rf"the placeholder tensors \['{QUERY}.weight'\] are missing; format version 4 stores a "
                 rf"\[0\] torch.uint8 tensor", id="missing"),
    pytest.param(_placeholder_of(f"{QUERY}.weight", torch.empty(0, dtype=torch.int8)),
                 rf"tensor '{QUERY}.weight' is \[0\] torch.int8 in the file, but the placeholder of a "
                 rf"quantized layer is \[0\] torch.uint8", id="wrong-dtype"),
    pytest.param(_placeholder_of(f"{QUERY}.weight", torch.zeros(64, 64)),
                 rf"tensor '{QUERY}.weight' is \[64, 64\] torch.float32 in the file, but the placeholder",
                 id="a-float-weight"),
    pytest.param(_placeholder_of("classifier.weight", torch.empty(0, dtype=torch.uint8)),
                 r"tensors \['classifier.weight'\] are placeholders \(\[0\] torch.uint8\) of layers that are "
                 r"not quantized", id="for-a-float-layer"),
    pytest.param(_placeholder_of("bert.pooler.weight", torch.empty(0, dtype=torch.uint8)),
                 r"tensors \['bert.pooler.weight'\] are placeholders", id="for-no-layer"),
])
def test_a_bad_placeholder_is_an_error_naming_the_file(saved, change_tensors, problem):
    _rewrite(saved, change_tensors=change_tensors)
    with pytest.raises(qbert.QuantizedFileError, match=f"{_quoted(saved)}: {problem}"):
        qbert.load_quantized(saved)


def test_a_placeholder_in_a_version_3_file_is_an_unexpected_tensor(saved):
    def keep_one_placeholder(tensors):
        query = tensors[f"{QUERY}.weight"]
        _drop_placeholders(tensors)
        tensors[f"{QUERY}.weight"] = query

    _rewrite(saved, change_metadata=_as_version(3), change_tensors=keep_one_placeholder)
    with pytest.raises(qbert.QuantizedFileError, match=rf"unexpected \['{QUERY}.weight'\]"):
        qbert.load_quantized(saved)


def test_a_file_changed_after_its_header_was_checked_is_an_error(saved, monkeypatch):
    check = qbert.io.check_tensors

    def check_then_change_the_file(*args, **kwargs):
        check(*args, **kwargs)
        _rewrite(saved, change_tensors=lambda t: t.pop("bert.pooler.dense.bias"))

    monkeypatch.setattr(qbert.io, "check_tensors", check_then_change_the_file)
    with pytest.raises(qbert.QuantizedFileError, match=r"the tensors read do not match its header: missing "
                                                       r"\['bert.pooler.dense.bias'\], unexpected \[\]"):
        qbert.load_quantized(saved)


@pytest.mark.parametrize("cut", [
    pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
    pytest.param(lambda data: b"not a safetensors file at all", id="garbage"),
    pytest.param(lambda data: b"", id="empty"),
])
def test_a_corrupt_file_is_an_error_naming_it(saved, cut):
    saved.write_bytes(cut(saved.read_bytes()))
    match = f"{_quoted(saved)} is not a readable safetensors file"
    with pytest.raises(qbert.QuantizedFileError, match=match):
        qbert.load_quantized(saved)


@pytest.mark.parametrize("change,match", [
    pytest.param(lambda m: m.pop(KEY_FORMAT_VERSION), "has no format version", id="missing-version"),
    pytest.param(lambda m: m.update({KEY_FORMAT_VERSION: str(FORMAT_VERSION + 1)}),
                 f"has format version '{FORMAT_VERSION + 1}'; this qbert reads versions 1, 2, 3, 4",
                 id="future-version"),
    pytest.param(lambda m: m.pop(KEY_FORMAT), "is not a qbert quantized model", id="missing-format"),
    pytest.param(lambda m: m.update({"qbert.model_class": "NotAModel"}), "'NotAModel' is not a transformers",
                 id="unknown-class"),
    pytest.param(lambda m: m.update({KEY_CONFIG: "{"}), "'qbert.config' is not valid JSON", id="bad-json"),
    pytest.param(lambda m: m.update({KEY_LAYERS: m[KEY_LAYERS].replace("w8a8", "w5a8")}),
                 "unknown quantization mode 'w5a8'", id="unknown-mode"),
    pytest.param(lambda m: m.update({KEY_LAYERS: m[KEY_LAYERS].replace('"weight_bits": 8', '"weight_bits": 4')}),
                 "contradicts the mode 'w8a8'", id="format-contradicts-mode"),
])
def test_bad_metadata_is_an_error_naming_the_file(saved, change, match):
    _rewrite(saved, change_metadata=change)
    with pytest.raises(qbert.QuantizedFileError, match=f"{_quoted(saved)}.*{match}"):
        qbert.load_quantized(saved)


def test_a_tensor_of_the_wrong_shape_is_an_error(saved):
    key = "bert.encoder.layer.1.intermediate.dense.w_q"
    _rewrite(saved, change_tensors=lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(qbert.QuantizedFileError,
                       match=rf"{_quoted(saved)}: tensor '{key}' is \[128, 63\] torch.int8 in the file, "
                             rf"but the model rebuilt from the metadata expects \[128, 64\] torch.int8"):
        qbert.load_quantized(saved)


def test_a_config_that_does_not_match_the_layers_is_an_error(saved):
    def shrink_ffn(metadata):
        config = json.loads(metadata[KEY_CONFIG])
        config["intermediate_size"] = 96
        metadata[KEY_CONFIG] = json.dumps(config)

    _rewrite(saved, change_metadata=shrink_ffn)
    with pytest.raises(qbert.QuantizedFileError,
                       match=r"quantized layer 'bert.encoder.layer.0.intermediate.dense' is "
                             r"\[in=64, out=128\] but the rebuilt model has "
                             r"Linear\(in_features=64, out_features=96"):
        qbert.load_quantized(saved)


def test_a_missing_tensor_is_an_error(saved):
    key = "bert.pooler.dense.bias"
    _rewrite(saved, change_tensors=lambda t: t.pop(key))
    match = f"(?s){_quoted(saved)}: the tensors do not match.*{key}"
    with pytest.raises(qbert.QuantizedFileError, match=match):
        qbert.load_quantized(saved)


def test_only_transformers_models_can_be_saved(tmp_path):
    model = qbert.quantize(nn.Sequential(nn.Linear(8, 8)), "w8a8")
    with pytest.raises(TypeError, match="Sequential is not a transformers model class"):
        qbert.save_quantized(model, tmp_path / FILE_NAME)
    assert os.listdir(tmp_path) == []
