"""Save and load quantized Hugging Face models as one safetensors file, or a directory, offline.

A directory is the Hugging Face layout (``save_pretrained`` of a model quantized by qbert, or
``save_quantized`` into a directory): ``config.json`` with a qbert ``quantization_config`` (``qbert.hf``)
whose ``layers`` are the entries below, and ``model.safetensors``, a file as described here (the names of
shared tensors are those ``safetensors.torch.save_model`` keeps, ``tensors_to_save``).

File layout: the tensors of ``model.state_dict()`` (shared tensors stored once, under the names
``tensors_to_save`` keeps), from version 4 a placeholder ``<name>.weight`` for every name of every QLinear
(``PLACEHOLDER_SHAPE``, ``PLACEHOLDER_DTYPE``: an empty uint8 tensor, which transformers cannot load into a
float ``nn.Linear`` and so refuses a qbert directory loaded without ``import qbert``; ``placeholders``), and
string metadata:

=========================  ===================================================================
key                        value
=========================  ===================================================================
``qbert.format``           ``"qbert.quantized"``
``qbert.format_version``   ``"4"`` (``FORMAT_VERSION``; version 3, which has no placeholders, still
                           loads, and so do versions 1 and 2, which have no checksum either, with a
                           warning to save them again; a reader refuses versions it does not know)
``qbert.model_class``      the transformers class name, e.g. ``"BertForMaskedLM"``, of a family in
                           ``qbert.models.FAMILIES``
``qbert.config``           the model config as JSON (``config.to_json_string(use_diff=False)``)
``qbert.float_dtype``      the dtype of the float tensors, e.g. ``"float32"``
``qbert.layers``           JSON list, one entry per QLinear: ``{"names": [...], "mode": "w4a16",
                           "format": LinearFormat.to_dict() (bits, symmetric, group_size,
                           row_groups), "in_features": K, "out_features": N, "bias": true,
                           "bias_dtype": "float32" | null}`` (a shared layer lists all its names;
                           version 1 entries have no "format": their mode is an int8 mode)
``qbert.checksum``         ``"sha256:<hex>"`` of the state_dict (``state_dict_checksum``; the
                           placeholders are no part of it); version 3 on
``qbert.version``          the qbert version that wrote the file (informational)
=========================  ===================================================================

A file is data, never code. ``load_quantized`` trusts nothing in it but the names of transformers'
own model classes of qbert's families and qbert's formats, and refuses, before it builds anything real:
a model class outside those families or whose ``model_type`` differs from the config's; a config that
names remote code (``REMOTE_CODE_KEYS``) or an implementation other than transformers' built-in
attention (``BUILT_IN_IMPLEMENTATIONS``), or whose fields have the wrong types; a pruning record
(``config.qbert_pruning`` of ``qbert.prune``, checked as the model is built on the meta device and resized
to it) that does not fit the model; malformed layer entries; placeholders missing, of another shape or
dtype, or for a layer that is not quantized; and tensors whose names, shapes or dtypes differ from those
of the model rebuilt from the metadata on the meta device. Only then does it build the model on the CPU,
load the tensors (the placeholders are dropped) and verify the checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings

import safetensors
import torch
from safetensors.torch import load_model, save_file
from torch import nn

from qbert.models import FAMILIES
from qbert.nn.formats import INT8_MODES, LinearFormat
from qbert.nn.fused import fuse
from qbert.nn.qlinear import QLinear
from qbert.ops._checks import FLOAT_DTYPES
from qbert.prune.structure import RECORD_ATTR, PruneError, apply_structure

FORMAT_NAME = "qbert.quantized"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
CHECKSUM_SINCE_VERSION = 3
PLACEHOLDERS_SINCE_VERSION = 4

# The placeholder stored as ``<name>.weight`` for every name of every QLinear (version 4 on). Without
# ``import qbert``, transformers skips the unknown quant_method "qbert" and builds the float model, whose
# nn.Linear at that name wants a 2-D float weight [out, in]: finding this tensor instead, whose shape no such
# weight has, it lists the weight as a size mismatch in its load report and raises, where without the
# placeholder the weight would be missing and silently initialized at random. Empty: it costs no data.
PLACEHOLDER_SUFFIX = ".weight"
PLACEHOLDER_SHAPE = (0,)
PLACEHOLDER_DTYPE = torch.uint8

KEY_FORMAT = "qbert.format"
KEY_FORMAT_VERSION = "qbert.format_version"
KEY_MODEL_CLASS = "qbert.model_class"
KEY_CONFIG = "qbert.config"
KEY_FLOAT_DTYPE = "qbert.float_dtype"
KEY_LAYERS = "qbert.layers"
KEY_CHECKSUM = "qbert.checksum"
KEY_QBERT_VERSION = "qbert.version"

CHECKSUM_ALGORITHM = "sha256"
_CHECKSUM_PATTERN = re.compile(rf"{CHECKSUM_ALGORITHM}:[0-9a-f]{{64}}")

# The implementations a config may select (attn_implementation, _attn_implementation,
# experts_implementation, ... : every key ending in "implementation"): transformers' built-in attention,
# which needs no download. Any other value makes transformers look for a kernel on the hub or elsewhere.
BUILT_IN_IMPLEMENTATIONS = ("eager", "sdpa")
_IMPLEMENTATION_KEY = re.compile(r"implementation(_internal)?$")
# Config keys that make transformers import code named by the config (remote code).
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines", "code_revision", "_auto_class")
# Config fields that size tensors or count layers, heads or labels in the supported families: positive
# ints, none larger than the largest dimension of a stored tensor (the vocabulary or position table).
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "embedding_size", "num_hidden_groups",
               "inner_group_num", "dim", "n_layers", "n_heads", "hidden_dim", "num_labels")

# Temporary files of a save: ".<target name>.<pid>.<random>.qbert-tmp" next to the target.
TEMP_SUFFIX = ".qbert-tmp"
# A directory in the Hugging Face layout (transformers' SAFE_WEIGHTS_NAME, CONFIG_NAME, the sharded index).
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SHARDED_INDEX_NAME = "model.safetensors.index.json"
QUANT_METHOD = "qbert"  # the quantization_config's quant_method (qbert.hf registers it with transformers)
MAX_CONFIG_BYTES = 2**24  # 16 MiB: a BERT-family config.json with every layer entry is well under 1 MiB
_TEMP_RANDOM = "[a-z0-9_]+"  # tempfile.mkstemp's random part
# rw-r--r--: what a plainly created file gets under the common umask 022 (mkstemp makes it rw-------).
_FILE_MODE = 0o644
_FLOAT_DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
# safetensors' dtype names for the dtypes a quantized model holds (codes, scales, float tensors).
_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64,
                       "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# What building a transformers model raises for a config it cannot build (e.g. heads not dividing hidden).
_BUILD_ERRORS = (ValueError, TypeError, RuntimeError, ArithmeticError, LookupError, AttributeError)


# One checked qbert.layers entry: names, in_features, out_features, bias, bias dtype, format.
_LayerSpec = tuple[list[str], int, int, bool, torch.dtype, "LinearFormat | str"]


class QuantizedFileError(ValueError):
    """A file is not a loadable qbert quantized model; the message names the file and the problem."""


def state_dict_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over the tensors in name order: each name, dtype, shape and (row-major) bytes."""
    digest = hashlib.new(CHECKSUM_ALGORITHM)
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


# ---- save -------------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (a transformers model quantized by ``qbert.quantize``) to the safetensors ``path``,
    or, when ``path`` is a directory (an existing one, or a path ending in a separator, which is created),
    in the Hugging Face layout that ``save_pretrained`` writes and ``from_pretrained`` reads after
    ``import qbert``: ``config.json`` with the ``quantization_config`` and ``model.safetensors``, which
    holds the tensors and metadata a file save writes.

    The file is written to a temporary file in the same directory and moved over ``path`` with
    ``os.replace``, so a failed save leaves an earlier file at ``path`` intact and no temporary file
    (a directory save writes a temporary directory beside it and moves each file in).
    Temporary files for ``path`` that a killed save left behind (their process is gone) are removed first.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(os.sep):
        _save_directory(model, path)
        return
    metadata = file_metadata(model)
    directory, name = os.path.split(os.path.abspath(path))
    _remove_stale_temp_files(directory, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        save_file(tensors_to_save(model), tmp, metadata=metadata)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale_temp_files(directory: str, name: str) -> None:
    """Remove save_quantized's temporary files for the target ``name`` whose writing process is gone."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.{_TEMP_RANDOM}{re.escape(TEMP_SUFFIX)}")
    for entry in os.listdir(directory):
        match = pattern.fullmatch(entry)
        if match and not _process_running(int(match.group(1))):
            stale = os.path.join(directory, entry)
            with contextlib.suppress(FileNotFoundError):  # another save removed it first
                if os.path.isdir(stale) and not os.path.islink(stale):
                    shutil.rmtree(stale)
                else:
                    os.remove(stale)


def _save_directory(model: nn.Module, directory: str) -> None:
    """``save_pretrained`` into a temporary directory beside ``directory``, then each file moved in."""
    from qbert.hf import attached

    file_metadata(model)  # refuses models load_quantized cannot rebuild, before anything is written
    os.makedirs(directory, exist_ok=True)
    parent, name = os.path.split(os.path.abspath(directory))
    _remove_stale_temp_files(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=parent)
    try:
        with attached(model):
            model.save_pretrained(tmp)
        for entry in sorted(os.listdir(tmp)):
            written = os.path.join(tmp, entry)
            os.chmod(written, _FILE_MODE)
            with open(written, "rb") as f:
                os.fsync(f.fileno())
            os.replace(written, os.path.join(directory, entry))
    finally:
        shutil.rmtree(tmp)


def tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a file holds: ``model.state_dict()`` with each group of shared tensors (tied weights, a layer
    reachable by several names) under one name, the first in sorted order (the name
    ``safetensors.torch.save_model`` keeps), and the ``placeholders``. A ``save_quantized`` file and a
    directory's ``model.safetensors`` (``QbertHfQuantizer.get_state_dict_and_metadata``) hold these."""
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    tensors = {min(names): state[min(names)].detach().contiguous() for names in groups.values()}
    return tensors | placeholders(model)  # a QLinear has no tensor named weight: no name clashes


def placeholders(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<name>.weight`` -> an empty uint8 tensor (``PLACEHOLDER_SHAPE``, ``PLACEHOLDER_DTYPE``) for every
    name of every QLinear: what makes transformers refuse the file without ``import qbert`` (see
    ``PLACEHOLDER_SUFFIX``)."""
    return {f"{name}{PLACEHOLDER_SUFFIX}": torch.empty(PLACEHOLDER_SHAPE, dtype=PLACEHOLDER_DTYPE)
            for entry in layer_entries(model) for name in entry["names"]}


def _process_running(pid: int) -> bool:
    if pid <= 0:  # no saving process has such an id (and os.kill would signal a process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def file_metadata(model: nn.Module) -> dict[str, str]:
    import transformers

    from qbert import __version__

    class_name = type(model).__name__
    if getattr(transformers, class_name, None) is not type(model):
        raise TypeError(f"save_quantized: {type(model).__qualname__} is not a transformers model class "
                        f"(load_quantized rebuilds the model as getattr(transformers, class_name)(config))")
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise TypeError(f"save_quantized: {class_name} has model_type {model_type!r}; load_quantized "
                        f"rebuilds only the families {', '.join(FAMILIES)}")
    return {
        KEY_FORMAT: FORMAT_NAME,
        KEY_FORMAT_VERSION: str(FORMAT_VERSION),
        KEY_MODEL_CLASS: class_name,
        KEY_CONFIG: model.config.to_json_string(use_diff=False),
        KEY_FLOAT_DTYPE: _float_dtype_name(model),
        KEY_LAYERS: json.dumps(layer_entries(model)),
        KEY_CHECKSUM: state_dict_checksum(model.state_dict()),
        KEY_QBERT_VERSION: __version__,
    }


def _float_dtype_name(model: nn.Module) -> str:
    """The one dtype of the model's float tensors outside QLinear layers (w_scale is float32 by format)."""
    qlinear_tensors = {id(t) for m in model.modules() if isinstance(m, QLinear) for t in m.buffers()}
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers())
              if t.is_floating_point() and id(t) not in qlinear_tensors}
    if len(dtypes) > 1:
        raise ValueError(f"save_quantized: the model mixes float dtypes {sorted(map(str, dtypes))}; "
                         f"cast it to one dtype before quantizing")
    return str(dtypes.pop() if dtypes else torch.float32).removeprefix("torch.")


def layer_entries(model: nn.Module) -> list[dict]:
    entries: dict[int, dict] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, QLinear):
            continue
        if id(module) in entries:
            entries[id(module)]["names"].append(name)
            continue
        entries[id(module)] = {
            "names": [name],
            "mode": module.mode,
            "format": module.format.to_dict(),
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "bias_dtype": str(module.bias.dtype).removeprefix("torch.") if module.bias is not None else None,
        }
    return list(entries.values())


# ---- load -------------------------------------------------------------------------------------------

def load_quantized(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved by ``save_quantized`` at ``path`` (on CPU, in eval mode), offline.

    ``path`` is a file, or a directory in the Hugging Face layout (``save_pretrained`` / a directory
    ``save_quantized``): its ``model.safetensors`` gets every check a file gets, and its ``config.json``
    must hold a qbert ``quantization_config`` whose layers are the file's; its ``fuse`` option is honoured.

    Raises ``QuantizedFileError`` naming the file and the problem for a missing file, a directory without
    those files (or with a sharded checkpoint), a corrupt file, a missing or unknown format or format
    version, a model class outside qbert's families, a config that names remote code or a non-built-in
    implementation or has fields of the wrong type, malformed layer entries, placeholders (version 4)
    missing, of another shape or dtype or for a layer that is not quantized, tensors whose names, shapes
    or dtypes do not match the model rebuilt from the metadata (checked on the meta device, before
    anything real is built), or a checksum mismatch.
    """
    path = os.fspath(path)
    fused = True  # as qbert.quantize does by default
    if os.path.isdir(path):
        directory, path = path, _directory_weights(path)
    else:
        directory = None
    metadata, stored = _read_header(path)
    if directory is not None:
        fused = _directory_config(directory, metadata)
    model_class = _model_class(path, metadata)
    config = _config(path, metadata, model_class, stored)
    dtype = _FLOAT_DTYPES.get(metadata[KEY_FLOAT_DTYPE])
    if dtype is None:
        raise QuantizedFileError(f"load_quantized: {path}: float dtype {metadata[KEY_FLOAT_DTYPE]!r} is not "
                                 f"one of {', '.join(_FLOAT_DTYPES)}")
    layers = _layer_specs(path, metadata)
    stored, placeholder_names = split_placeholders(path, metadata, stored, layers)
    with torch.device("meta"):
        skeleton = _build(path, model_class, config, dtype, layers)
    check_tensors(path, skeleton, stored)

    model = _build(path, model_class, config, dtype, layers)
    try:
        missing, unexpected = load_model(model, path, strict=False)
    except safetensors.SafetensorError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: the tensor data cannot be read: {exc}") from exc
    unexpected = sorted(set(unexpected) - placeholder_names)
    if missing or unexpected:  # the file changed since its header was checked
        raise QuantizedFileError(f"load_quantized: {path}: the tensors read do not match its header: missing "
                                 f"{sorted(missing)}, unexpected {unexpected}")
    check_checksum(path, metadata, model)
    if fused:
        fuse(model)  # the fused modules keep every parameter's name
    return model.eval()


def _directory_weights(directory: str) -> str:
    """The weights file of a Hugging Face directory: ``model.safetensors`` (a sharded one is refused)."""
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.lexists(weights):
        sharded = os.path.lexists(os.path.join(directory, SHARDED_INDEX_NAME))
        why = (f"it holds a sharded checkpoint ({SHARDED_INDEX_NAME}); load it with from_pretrained, or save "
               f"it as one file" if sharded else "it is not a qbert quantized model directory")
        raise QuantizedFileError(f"load_quantized: {directory} is a directory without {WEIGHTS_NAME}: {why}")
    return weights


def _directory_config(directory: str, metadata: dict[str, str]) -> bool:
    """Check a directory's config.json against its weights' metadata; returns its ``fuse`` option."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        size = os.stat(path).st_size
        if size > MAX_CONFIG_BYTES:
            raise QuantizedFileError(f"load_quantized: {path} is {size} bytes; a config.json has at most "
                                     f"{MAX_CONFIG_BYTES}")
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as exc:
        raise QuantizedFileError(f"load_quantized: {directory} has {WEIGHTS_NAME} but no {CONFIG_NAME}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizedFileError(f"load_quantized: {path} is not a readable JSON file: {exc}") from exc
    quantization = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not (isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD):
        raise QuantizedFileError(f"load_quantized: {path} has no qbert quantization_config (quant_method "
                                 f"{QUANT_METHOD!r})")
    check_same_layers(path, quantization.get("layers"), metadata)
    fused = quantization.get("fuse")
    if not isinstance(fused, bool):
        raise QuantizedFileError(f"load_quantized: {path}: quantization_config 'fuse' must be true or false, "
                                 f"got {fused!r}")
    return fused


def check_same_layers(path: str, layers, metadata: dict[str, str]) -> None:
    """config.json's quantization_config layers are the weights file's ``qbert.layers``."""
    if layers != _parse_json(path, metadata, KEY_LAYERS):
        raise QuantizedFileError(f"load_quantized: {path}: the quantization_config's layers differ from the "
                                 f"weights' metadata {KEY_LAYERS!r}: config.json and {WEIGHTS_NAME} come from "
                                 f"different saves")


def read_headers(paths: list[str]) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """``_read_header`` of each checkpoint file (the shards of one save, with the same metadata), merged."""
    metadata, stored = _read_header(paths[0])
    for path in paths[1:]:
        shard_metadata, shard = _read_header(path)
        if shard_metadata != metadata:
            raise QuantizedFileError(f"load_quantized: {path}: its metadata differs from that of {paths[0]}; "
                                     f"the shards come from different saves")
        doubled = sorted(set(shard) & set(stored))
        if doubled:
            raise QuantizedFileError(f"load_quantized: {path}: tensors {doubled} are in another shard too")
        stored.update(shard)
    return metadata, stored


def _read_header(path: str) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """The file's metadata (format and version checked) and its tensors' shapes and dtype names.

    Reads only the safetensors header, never the tensor data.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: no such file") from exc
    except OSError as exc:
        raise QuantizedFileError(f"load_quantized: {path} cannot be read: {exc}") from exc
    if stat.S_ISDIR(mode):
        raise QuantizedFileError(f"load_quantized: {path} is a directory, not a qbert quantized model file")
    if not stat.S_ISREG(mode):
        raise QuantizedFileError(f"load_quantized: {path} is not a regular file")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            stored = {}
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                header = f.get_slice(key)
                stored[key] = (list(header.get_shape()), header.get_dtype())
    except (safetensors.SafetensorError, OSError) as exc:
        raise QuantizedFileError(f"load_quantized: {path} is not a readable safetensors file: {exc}") from exc
    if metadata.get(KEY_FORMAT) != FORMAT_NAME:
        raise QuantizedFileError(f"load_quantized: {path} is not a qbert quantized model: metadata "
                                 f"{KEY_FORMAT!r} is {metadata.get(KEY_FORMAT)!r}, expected {FORMAT_NAME!r}")
    version = metadata.get(KEY_FORMAT_VERSION)
    if version is None:
        raise QuantizedFileError(f"load_quantized: {path} has no format version (metadata "
                                 f"{KEY_FORMAT_VERSION!r}); this qbert reads version {FORMAT_VERSION}")
    if version not in {str(v) for v in READABLE_VERSIONS}:
        raise QuantizedFileError(f"load_quantized: {path} has format version {version!r}; "
                                 f"this qbert reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    required = [KEY_MODEL_CLASS, KEY_CONFIG, KEY_FLOAT_DTYPE, KEY_LAYERS]
    if int(version) >= CHECKSUM_SINCE_VERSION:
        required.append(KEY_CHECKSUM)
    missing = [k for k in required if k not in metadata]
    if missing:
        raise QuantizedFileError(f"load_quantized: {path} lacks the metadata {missing}")
    if KEY_CHECKSUM in required and not _CHECKSUM_PATTERN.fullmatch(metadata[KEY_CHECKSUM]):
        raise QuantizedFileError(f"load_quantized: {path}: metadata {KEY_CHECKSUM!r} is "
                                 f"{metadata[KEY_CHECKSUM]!r}, expected '{CHECKSUM_ALGORITHM}:' and 64 hex "
                                 f"digits")
    return metadata, stored


def _parse_json(path: str, metadata: dict[str, str], key: str):
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: metadata {key!r} is not valid JSON: {exc}") \
            from exc


def _model_class(path: str, metadata: dict[str, str]) -> type:
    """The transformers class the file names, if it is a model class of one of qbert's families."""
    import transformers

    class_name = metadata[KEY_MODEL_CLASS]
    model_class = getattr(transformers, class_name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise QuantizedFileError(f"load_quantized: {path}: model class {class_name!r} is not a transformers "
                                 f"model class in transformers {transformers.__version__}")
    if model_class.config_class.model_type not in FAMILIES:
        raise QuantizedFileError(f"load_quantized: {path}: model class {class_name!r} (model_type "
                                 f"{model_class.config_class.model_type!r}) is not of a family qbert "
                                 f"supports: {', '.join(FAMILIES)}")
    return model_class


def _config(path: str, metadata: dict[str, str], model_class: type, stored: dict):
    """The config object, after checking the JSON for remote code, implementations and field types.

    qbert's block-sparse attention (``ATTENTION_NAME``) is refused too: ``sparsify_attention`` sets it at
    run time, the saved config never records it, and a file holds no block layouts.
    """
    from qbert.sparse.attention import ATTENTION_NAME

    raw = _parse_json(path, metadata, KEY_CONFIG)
    if not isinstance(raw, dict):
        raise QuantizedFileError(f"load_quantized: {path}: metadata {KEY_CONFIG!r} must be a JSON object, "
                                 f"got {type(raw).__name__}")
    quantization = raw.pop("quantization_config", None)  # a model saved by from_pretrained with QbertConfig
    if quantization is not None and not (isinstance(quantization, dict)
                                         and quantization.get("quant_method") == QUANT_METHOD):
        raise QuantizedFileError(f"load_quantized: {path}: the config's quantization_config is not qbert's "
                                 f"(quant_method {QUANT_METHOD!r}): {quantization!r}")
    remote = [key for key in REMOTE_CODE_KEYS if key in raw]
    if remote:
        raise QuantizedFileError(f"load_quantized: {path}: the config carries remote-code fields {remote}; "
                                 f"load_quantized builds only transformers' own classes and runs no code "
                                 f"named by a file")
    for key, value in raw.items():
        if _IMPLEMENTATION_KEY.search(key) and value is not None and value not in BUILT_IN_IMPLEMENTATIONS:
            hint = (" (a file stores no block-sparse layouts: call qbert.sparsify_attention after loading)"
                    if value == ATTENTION_NAME else "")
            raise QuantizedFileError(f"load_quantized: {path}: config {key!r} is {value!r}; a file may name "
                                     f"only the built-in implementations "
                                     f"{', '.join(BUILT_IN_IMPLEMENTATIONS)}{hint}")
    config_class = model_class.config_class
    if raw.get("model_type") != config_class.model_type:
        raise QuantizedFileError(f"load_quantized: {path}: the config's model_type {raw.get('model_type')!r} "
                                 f"does not match the model class {model_class.__name__} "
                                 f"({config_class.model_type!r})")
    largest = max((max(shape, default=0) for shape, _ in stored.values()), default=0)
    defaults = config_class().to_dict()
    for key, value in raw.items():
        problem = _field_problem(key, value, defaults.get(key), largest)
        if problem:
            raise QuantizedFileError(f"load_quantized: {path}: config field {key!r} is {value!r}: {problem}")
    try:
        return config_class.from_dict(raw)
    except _BUILD_ERRORS as exc:
        raise QuantizedFileError(f"load_quantized: {path}: the config cannot build {config_class.__name__}: "
                                 f"{type(exc).__name__}: {exc}") from exc


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_problem(key: str, value, default, largest: int) -> str | None:
    """Why ``value`` cannot be the config field ``key`` (``default`` is its class default), or None."""
    if key in SIZE_FIELDS:
        if not _is_int(value) or value < 1:
            return "a size must be a positive int"
        if value > largest:
            return f"larger than every dimension of the stored tensors (the largest is {largest})"
        return None
    if value is None or type(default) not in _SCALAR_FIELD_TYPES:  # None: optional; dicts and lists: free
        return None
    what, valid = _SCALAR_FIELD_TYPES[type(default)]
    return None if valid(value) else f"expected {what}, as the default {default!r}"


# A scalar config field holds the type of its class default: (what it must be, the test).
_SCALAR_FIELD_TYPES = {
    bool: ("a bool", lambda v: isinstance(v, bool)),
    int: ("an int", _is_int),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _layer_specs(path: str, metadata: dict[str, str]) -> list[_LayerSpec]:
    """Each ``qbert.layers`` entry, checked: (names, in_features, out_features, bias, bias dtype, format)."""
    return layer_specs(path, _parse_json(path, metadata, KEY_LAYERS))


def layer_specs(path: str, entries) -> list[_LayerSpec]:
    """``_layer_specs`` of entries already parsed (a config.json's quantization_config layers)."""
    if not isinstance(entries, list):
        raise QuantizedFileError(f"load_quantized: {path}: metadata {KEY_LAYERS!r} must be a JSON list of "
                                 f"layer entries, got {entries!r}")
    return [_layer_spec(path, entry) for entry in entries]


def _layer_spec(path: str, entry) -> _LayerSpec:
    def malformed(problem: str) -> QuantizedFileError:
        return QuantizedFileError(f"load_quantized: {path}: malformed layer entry {entry!r} in metadata "
                                  f"{KEY_LAYERS!r}: {problem}")

    if not isinstance(entry, dict):
        raise malformed("an entry must be a JSON object")
    names = entry.get("names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise malformed("'names' must be a non-empty list of module names")
    for key in ("in_features", "out_features"):
        if not _is_int(entry.get(key)) or entry[key] < 1:
            raise malformed(f"{key!r} must be a positive int")
    has_bias = entry.get("bias")
    if not isinstance(has_bias, bool):
        raise malformed("'bias' must be true or false")
    if has_bias and not (isinstance(entry.get("bias_dtype"), str) and entry["bias_dtype"] in _FLOAT_DTYPES):
        raise malformed(f"'bias_dtype' must be one of {', '.join(_FLOAT_DTYPES)}")
    if not isinstance(entry.get("mode"), str):
        raise malformed("'mode' must be a string")
    try:
        fmt = _entry_format(entry)
    except (ValueError, TypeError) as exc:
        raise QuantizedFileError(f"load_quantized: {path}: layer {names!r}: {exc}") from exc
    bias_dtype = _FLOAT_DTYPES[entry["bias_dtype"]] if has_bias else torch.float32
    return names, entry["in_features"], entry["out_features"], has_bias, bias_dtype, fmt


def _entry_format(entry: dict) -> LinearFormat | str:
    """The format of a layer entry: its "format" dict, or (version 1) an int8 mode name."""
    if "format" in entry:
        fmt = LinearFormat.from_dict(entry["format"])
        if fmt.name != entry["mode"]:
            raise ValueError(f"mode {entry['mode']!r} contradicts the format {fmt.describe()!r}")
        return fmt
    if entry["mode"] not in INT8_MODES:
        raise ValueError(f"mode {entry['mode']!r} needs a 'format' entry (version 1 files hold only "
                         f"{', '.join(INT8_MODES)})")
    return entry["mode"]


def _build(path: str, model_class: type, config, dtype: torch.dtype, layers: list[_LayerSpec]) -> nn.Module:
    """``model_class(config)`` in ``dtype``, resized to the config's pruning record (``apply_pruning``), with
    an empty QLinear at every layer entry's names.

    On the default device: under ``torch.device("meta")`` nothing is allocated (and transformers skips
    the weight initialization).
    """
    try:
        model = model_class(config).to(dtype)
    except _BUILD_ERRORS as exc:
        raise QuantizedFileError(f"load_quantized: {path}: the config cannot build {model_class.__name__}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    apply_pruning(path, model)
    for spec in layers:
        place_qlinear(path, model, *spec)
    return model


def apply_pruning(path: str, model: nn.Module) -> None:
    """Resize a model just built from a saved config to the per-layer head and neuron counts of its
    ``config.qbert_pruning`` (``qbert.prune.structure.apply_structure``; no record: nothing to do). The record
    is checked first (version, fields, one count per layer, counts in 1..the config's built sizes): a bad
    one is a QuantizedFileError naming the file."""
    try:
        apply_structure(model)
    except PruneError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: the config's pruning record ({RECORD_ATTR!r}) "
                                 f"does not fit the {type(model).__name__} it builds: {exc}") from exc


def place_qlinear(path: str, model: nn.Module, names: list[str], in_features: int, out_features: int,
                   has_bias: bool, bias_dtype: torch.dtype, mode: LinearFormat | str) -> None:
    """Put one empty QLinear at each of ``names`` (Linears of that shape in the float model)."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise QuantizedFileError(f"load_quantized: {path}: quantized layer {name!r} is not a module of "
                                     f"the rebuilt {type(model).__name__}") from exc
        shape = (in_features, out_features)
        if not isinstance(module, nn.Linear) or (module.in_features, module.out_features) != shape:
            raise QuantizedFileError(f"load_quantized: {path}: quantized layer {name!r} is "
                                     f"[in={in_features}, out={out_features}] but the rebuilt model has "
                                     f"{module}")
    try:
        qlinear = QLinear(in_features, out_features, bias=has_bias, mode=mode, bias_dtype=bias_dtype)
    except ValueError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: layer {names[0]!r}: {exc}") from exc
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, qlinear)


def split_placeholders(path: str, metadata: dict[str, str], stored: dict[str, tuple[list[int], str]],
                       layers: list[_LayerSpec]) -> tuple[dict[str, tuple[list[int], str]], set[str]]:
    """``stored`` without the placeholders, and their names, after checking them: from version 4 on, exactly
    one ``<name>.weight`` of ``PLACEHOLDER_SHAPE`` and ``PLACEHOLDER_DTYPE`` for every name of every layer
    entry, and no tensor of that shape and dtype named for a layer that is not quantized. Older versions have
    none (a ``.weight`` of a quantized layer there is an unexpected tensor to ``check_tensors``)."""
    if int(metadata[KEY_FORMAT_VERSION]) < PLACEHOLDERS_SINCE_VERSION:
        return stored, set()
    expected = {f"{name}{PLACEHOLDER_SUFFIX}" for spec in layers for name in spec[0]}
    missing = sorted(expected - set(stored))
    if missing:
        raise QuantizedFileError(f"load_quantized: {path}: the placeholder tensors {missing} are missing; "
                                 f"format version {metadata[KEY_FORMAT_VERSION]} stores a {_placeholder()} "
                                 f"tensor '<name>{PLACEHOLDER_SUFFIX}' for every name of every quantized "
                                 f"layer")
    for key in sorted(expected):
        if not _is_placeholder(stored[key]):
            shape, dtype_name = stored[key]
            dtype = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name)
            raise QuantizedFileError(f"load_quantized: {path}: tensor {key!r} is {shape} {dtype} in the "
                                     f"file, but the placeholder of a quantized layer is {_placeholder()}")
    stray = sorted(key for key, header in stored.items()
                   if key not in expected and key.endswith(PLACEHOLDER_SUFFIX) and _is_placeholder(header))
    if stray:
        raise QuantizedFileError(f"load_quantized: {path}: tensors {stray} are placeholders "
                                 f"({_placeholder()}) of layers that are not quantized (not in the metadata "
                                 f"{KEY_LAYERS!r})")
    return {key: header for key, header in stored.items() if key not in expected}, expected


def _is_placeholder(header: tuple[list[int], str]) -> bool:
    shape, dtype_name = header
    return shape == list(PLACEHOLDER_SHAPE) and _SAFETENSORS_DTYPES.get(dtype_name) == PLACEHOLDER_DTYPE


def _placeholder() -> str:
    return f"{list(PLACEHOLDER_SHAPE)} {PLACEHOLDER_DTYPE}"


def check_tensors(path: str, skeleton: nn.Module, stored: dict[str, tuple[list[int], str]],
                  tied: dict[str, str] | None = None) -> None:
    """The file holds exactly the skeleton's tensors (one name per tied group), in its shapes and dtypes.

    Tied groups are the skeleton's shared tensors, joined by ``tied`` (target -> source name: a
    transformers skeleton built without tying its weights, as ``from_pretrained`` builds one)."""
    expected = skeleton.state_dict(keep_vars=True)
    group_of: dict[str, int] = {name: id(tensor) for name, tensor in expected.items()}
    for target, source in (tied or {}).items():
        if target in group_of and source in group_of:
            old, new = group_of[target], group_of[source]
            group_of = {name: new if group == old else group for name, group in group_of.items()}
    groups: dict[int, list[str]] = {}
    for name, group in group_of.items():
        groups.setdefault(group, []).append(name)
    missing = [" / ".join(names) for names in groups.values() if not any(n in stored for n in names)]
    doubled = [names for names in groups.values() if sum(n in stored for n in names) > 1]
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected or doubled:
        problems = [f"{what} {names}" for what, names in (("missing", missing), ("unexpected", unexpected),
                                                          ("tied tensors stored twice", doubled)) if names]
        raise QuantizedFileError(f"load_quantized: {path}: the tensors do not match the "
                                 f"{type(skeleton).__name__} rebuilt from the metadata: "
                                 f"{'; '.join(problems)}")
    for key, (shape, dtype_name) in stored.items():
        want = expected[key]
        dtype = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name)
        if list(want.shape) != shape or want.dtype != dtype:
            raise QuantizedFileError(f"load_quantized: {path}: tensor {key!r} is {shape} {dtype} in the "
                                     f"file, but the model rebuilt from the metadata expects "
                                     f"{list(want.shape)} {want.dtype}")


def check_checksum(path: str, metadata: dict[str, str], model: nn.Module) -> None:
    """The loaded model's ``state_dict_checksum`` is the one the save recorded (older versions: a warning)."""
    version = int(metadata[KEY_FORMAT_VERSION])
    if version < CHECKSUM_SINCE_VERSION:
        warnings.warn(f"load_quantized: {path} has format version {version}, which has no checksum: its "
                      f"tensor data is not verified; save the model again with this qbert (format version "
                      f"{FORMAT_VERSION}) to add one", stacklevel=3)
        return
    recorded = metadata[KEY_CHECKSUM]
    actual = state_dict_checksum(model.state_dict())
    if actual != recorded:
        raise QuantizedFileError(f"load_quantized: {path}: checksum mismatch: the tensor data hashes to "
                                 f"{actual}, the file records {recorded}; the file is corrupt")
