"""Save and load quantized Hugging Face models as one safetensors file, offline.

File layout: the tensors of ``model.state_dict()`` (shared tensors stored once, by
``safetensors.torch.save_model``), and string metadata:

=========================  ===================================================================
key                        value
=========================  ===================================================================
``qbert.format``           ``"qbert.quantized"``
``qbert.format_version``   ``"2"`` (``FORMAT_VERSION``; version 1 files, int8 layers only, still load;
                           a reader refuses versions it does not know)
``qbert.model_class``      the transformers class name, e.g. ``"BertForMaskedLM"``
``qbert.config``           the model config as JSON (``config.to_json_string(use_diff=False)``)
``qbert.float_dtype``      the dtype of the float tensors, e.g. ``"float32"``
``qbert.layers``           JSON list, one entry per QLinear: ``{"names": [...], "mode": "w4a16",
                           "format": LinearFormat.to_dict() (bits, symmetric, group_size,
                           row_groups), "in_features": K, "out_features": N, "bias": true,
                           "bias_dtype": "float32" | null}`` (a shared layer lists all its names;
                           version 1 entries have no "format": their mode is an int8 mode)
``qbert.version``          the qbert version that wrote the file (informational)
=========================  ===================================================================

``load_quantized`` rebuilds the architecture with ``getattr(transformers, model_class)(config)`` (no hub
access), puts an empty QLinear at every name in ``qbert.layers`` (one object per entry, so shared layers
stay shared), checks every tensor's shape and dtype, then loads strictly.
"""

from __future__ import annotations

import json
import os
import tempfile

import safetensors
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from qbert.nn.formats import INT8_MODES, LinearFormat
from qbert.nn.fused import fuse
from qbert.nn.qlinear import QLinear
from qbert.ops._checks import FLOAT_DTYPES

FORMAT_NAME = "qbert.quantized"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

KEY_FORMAT = "qbert.format"
KEY_FORMAT_VERSION = "qbert.format_version"
KEY_MODEL_CLASS = "qbert.model_class"
KEY_CONFIG = "qbert.config"
KEY_FLOAT_DTYPE = "qbert.float_dtype"
KEY_LAYERS = "qbert.layers"
KEY_QBERT_VERSION = "qbert.version"

# rw-r--r--: what a plainly created file gets under the common umask 022 (mkstemp makes it rw-------).
_FILE_MODE = 0o644
_FLOAT_DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


class QuantizedFileError(ValueError):
    """A file is not a loadable qbert quantized model; the message names the file and the problem."""


# ---- save -------------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (a transformers model quantized by ``qbert.quantize``) to the safetensors ``path``.

    The file is written to a temporary file in the same directory and moved over ``path`` with
    ``os.replace``, so a failed save leaves an earlier file at ``path`` intact and no temporary file.
    """
    path = os.fspath(path)
    metadata = _metadata(model)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_model(model, tmp, metadata=metadata)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _metadata(model: nn.Module) -> dict[str, str]:
    import transformers

    from qbert import __version__

    class_name = type(model).__name__
    if getattr(transformers, class_name, None) is not type(model):
        raise TypeError(f"save_quantized: {type(model).__qualname__} is not a transformers model class "
                        f"(load_quantized rebuilds the model as getattr(transformers, class_name)(config))")
    return {
        KEY_FORMAT: FORMAT_NAME,
        KEY_FORMAT_VERSION: str(FORMAT_VERSION),
        KEY_MODEL_CLASS: class_name,
        KEY_CONFIG: model.config.to_json_string(use_diff=False),
        KEY_FLOAT_DTYPE: _float_dtype_name(model),
        KEY_LAYERS: json.dumps(_layer_entries(model)),
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


def _layer_entries(model: nn.Module) -> list[dict]:
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

    Raises ``QuantizedFileError`` naming the file for a corrupt file, a missing or unknown format or
    format version, or tensors whose names, shapes or dtypes do not match the rebuilt model.
    """
    path = os.fspath(path)
    metadata = _read_metadata(path)
    model = _build_model(path, metadata)
    for entry in _parse_json(path, metadata, KEY_LAYERS):
        _place_qlinear(path, model, entry)
    _check_tensors(path, model)
    try:
        load_model(model, path, strict=True)
    except safetensors.SafetensorError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: the tensor data cannot be read: {exc}") from exc
    except RuntimeError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: the tensors do not match the model rebuilt "
                                 f"from the file's metadata: {exc}") from exc
    fuse(model)  # as qbert.quantize does by default; the fused modules keep every parameter's name
    return model.eval()


def _read_metadata(path: str) -> dict[str, str]:
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except safetensors.SafetensorError as exc:
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
    missing = [k for k in (KEY_MODEL_CLASS, KEY_CONFIG, KEY_FLOAT_DTYPE, KEY_LAYERS) if k not in metadata]
    if missing:
        raise QuantizedFileError(f"load_quantized: {path} lacks the metadata {missing}")
    return metadata


def _parse_json(path: str, metadata: dict[str, str], key: str):
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: metadata {key!r} is not valid JSON: {exc}") \
            from exc


def _build_model(path: str, metadata: dict[str, str]) -> nn.Module:
    import transformers

    class_name = metadata[KEY_MODEL_CLASS]
    model_class = getattr(transformers, class_name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise QuantizedFileError(f"load_quantized: {path}: model class {class_name!r} is not a transformers "
                                 f"model class in transformers {transformers.__version__}")
    dtype = _FLOAT_DTYPES.get(metadata[KEY_FLOAT_DTYPE])
    if dtype is None:
        raise QuantizedFileError(f"load_quantized: {path}: float dtype {metadata[KEY_FLOAT_DTYPE]!r} is not "
                                 f"one of {', '.join(_FLOAT_DTYPES)}")
    config = model_class.config_class.from_dict(_parse_json(path, metadata, KEY_CONFIG))
    return model_class(config).to(dtype)


def _place_qlinear(path: str, model: nn.Module, entry: dict) -> None:
    """Put one empty QLinear described by ``entry`` at each of its names (Linears in the float model)."""
    try:
        names = entry["names"]
        in_features, out_features = entry["in_features"], entry["out_features"]
        has_bias = entry["bias"]
        bias_dtype = _FLOAT_DTYPES[entry["bias_dtype"]] if has_bias else torch.float32
        mode = _entry_format(entry)
    except (KeyError, TypeError) as exc:
        raise QuantizedFileError(f"load_quantized: {path}: malformed layer entry {entry!r} in metadata "
                                 f"{KEY_LAYERS!r}") from exc
    except ValueError as exc:
        raise QuantizedFileError(f"load_quantized: {path}: layer {entry.get('names')!r}: {exc}") from exc
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


# safetensors' dtype names for the dtypes a quantized model holds (codes, scales, float tensors).
_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "F32": torch.float32,
                       "F16": torch.float16, "BF16": torch.bfloat16}


def _check_tensors(path: str, model: nn.Module) -> None:
    """Every tensor in the file has the shape and dtype of the model's tensor of that name.

    Reads only the file's header (shapes and dtypes); the data is read once, by ``load_model``.
    """
    expected = model.state_dict()
    with safetensors.safe_open(path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            want = expected.get(key)
            if want is None:
                continue  # reported by the strict load with every other missing / unexpected name
            header = f.get_slice(key)
            shape, dtype_name = list(header.get_shape()), header.get_dtype()
            dtype = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name)
            if list(want.shape) != shape or want.dtype != dtype:
                raise QuantizedFileError(f"load_quantized: {path}: tensor {key!r} is {shape} {dtype} in the "
                                         f"file, but the model rebuilt from the metadata expects "
                                         f"{list(want.shape)} {want.dtype}")
