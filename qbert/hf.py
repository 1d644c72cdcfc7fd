"""Hugging Face integration: ``QbertConfig``, transformers' quantizer for ``quant_method = "qbert"``.

    model = transformers.AutoModel.from_pretrained(path, quantization_config=qbert.QbertConfig("w8a8"))
    model.save_pretrained(directory)          # config.json with the quantization_config, packed codes
    model = transformers.AutoModel.from_pretrained(directory)     # after ``import qbert``

Importing this module registers ``QbertConfig`` and ``QbertHfQuantizer`` with transformers
(``register_quantization_config`` / ``register_quantizer``). ``import qbert`` does not import transformers:
it registers them the moment transformers' quantizer registry (``transformers.quantizers.auto``) is
imported, or at once if it already is (``qbert/__init__.py``).

Quantizing while the weights load (a float checkpoint and a ``QbertConfig``): the model skeleton is on
the meta device; ``qbert.quantize``'s own selection (``swap_linears``: family heads, ``skip``, plans)
picks the layers; each selected ``nn.Linear`` becomes its ``QLinear`` (``QLinear.from_linear``, as
``qbert.quantize`` does) as soon as its weight and bias have arrived, so only one layer's float weight is
alive at a time. Linears whose weight is tied to another tensor (an MLM decoder with ``include_head``) are
quantized after loading, once transformers has tied them. Then the fused W8A8 chain is installed
(``qbert.nn.fused.fuse``) and ``model.qbert_summary`` recorded, exactly as ``qbert.quantize`` does: the
result equals ``qbert.quantize(float_model, same format)``, buffer for buffer.

A pruned model (``qbert.prune``: config.json's ``qbert_pruning`` records each layer's heads and neurons)
is resized to that record first (``qbert.prune.structure.apply_structure``), in both cases.

Loading a qbert directory (config.json names ``quant_method: "qbert"``): the config's ``layers`` (the
``qbert.layers`` entries of ``qbert.io``) place empty QLinears on the meta device, and before anything
real is allocated the checkpoint's safetensors headers are checked as ``load_quantized`` checks a file
(qbert metadata, the same layers, the placeholders, tensor names, shapes and dtypes); after loading, the
SHA-256 checksum. The checked placeholders, which the model has no place for, are named in the model's
``_keys_to_ignore_on_load_unexpected`` while the weights load, so transformers drops them without a load
report.

``model.save_pretrained`` writes the tensors ``qbert.save_quantized`` writes (``qbert.io``: the placeholders
too), with the same qbert metadata in the safetensors header.

Without ``import qbert``, transformers does not know ``quant_method: "qbert"``: it logs "Unknown
quantization type, got qbert ... we will skip the quantization" and builds the float architecture. The
checkpoint holds, at each quantized layer's ``<name>.weight``, a placeholder of a shape no float weight has
(``qbert.io.PLACEHOLDER_SHAPE``), so the load report lists those weights as size mismatches and
``from_pretrained`` raises ``RuntimeError`` instead of returning randomly initialized layers
(``ignore_mismatched_sizes=True`` asks for exactly those). Import qbert first.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass

from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qbert import io
from qbert.models import family_of
from qbert.nn.formats import FORMATS, LinearFormat, check_option, linear_format
from qbert.nn.fused import FusedLayer, fuse
from qbert.nn.gptq import NEAREST
from qbert.nn.plan import PLAN_FORMAT, Plan
from qbert.nn.qlinear import QLinear
from qbert.nn.quantize import SUMMARY_ATTR, QuantizeSummary, _check_options, _set_module, swap_linears

QUANT_METHOD = io.QUANT_METHOD
CALLER = "from_pretrained(quantization_config=QbertConfig)"
_LOADED_TENSORS = ("weight", "bias")  # what a selected nn.Linear receives from a float checkpoint


def _format_to_json(fmt: str | LinearFormat | Plan):
    if isinstance(fmt, Plan):
        return json.loads(fmt.to_json())
    return fmt.to_dict() if isinstance(fmt, LinearFormat) else fmt


def _format_from_json(value) -> str | LinearFormat | Plan:
    """A format argument or its JSON form: a mode name, a ``LinearFormat`` (dict) or a ``Plan`` (its JSON)."""
    if isinstance(value, (str, LinearFormat, Plan)):
        return value
    if isinstance(value, dict) and value.get("format") == PLAN_FORMAT:
        return Plan.from_json(json.dumps(value), source="QbertConfig format")
    if isinstance(value, dict):
        return LinearFormat.from_dict(value)
    raise TypeError(f"QbertConfig: format must be a mode name (str), a LinearFormat or a qbert.Plan, got "
                    f"{type(value).__name__} {value!r}")


class QbertConfig(QuantizationConfigMixin):
    """``quantization_config`` for transformers' ``from_pretrained``: quantize with qbert while loading.

    format: a mode name (``"w8a8"``, ``"w4a16"``, ... ``qbert.nn.FORMATS``), a ``LinearFormat``, or a
        ``qbert.Plan`` naming each layer's format (the layer names of the class being loaded).
    skip, include_head, group_size, row_groups, symmetric, fuse: as ``qbert.quantize`` takes them.
    layers, kept_float: written by qbert once the model is quantized (the ``qbert.layers`` entries of
        ``qbert.io`` and ``qbert_summary.kept_float``); a saved directory's config.json records them and
        a reload rebuilds exactly those layers. Leave them out when asking for quantization.

    An unknown format, an option of the wrong type or a plan with single-format options is an error here;
    a plan naming layers the model lacks is an error in ``from_pretrained``, naming the layer.
    """

    def __init__(self, format: str | LinearFormat | Plan = "w8a8", skip=(), include_head: bool = False, *,
                 group_size: int | None = None, row_groups: int | None = None, symmetric: bool | None = None,
                 fuse: bool = True, layers: list[dict] | None = None, kept_float: dict[str, str] | None = None,
                 quant_method: str = QUANT_METHOD) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"QbertConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        try:
            fmt = _format_from_json(format)
            _check_options("QbertConfig", skip, include_head, group_size, row_groups, symmetric)
            check_option("QbertConfig", "fuse", fuse, bool)
            if isinstance(fmt, Plan):
                if (group_size, row_groups, symmetric) != (None, None, None) or skip or include_head:
                    raise ValueError("a plan names every layer's format; group_size, row_groups, symmetric, "
                                     "skip and include_head apply to a single mode only")
                gptq = [name for name, rounding in fmt.rounding.items() if rounding.method != NEAREST]
                if gptq:
                    more = f" and {len(gptq) - 1} more layers" if len(gptq) > 1 else ""
                    raise ValueError(f"the plan names GPTQ rounding for {gptq[0]}{more}; "
                                     f"from_pretrained quantizes while the weights load, without calibration "
                                     f"data: load the float model, qbert.quantize(model, plan, "
                                     f"calibration=batches), then save_pretrained")
            else:
                linear_format(fmt, group_size=group_size, row_groups=row_groups, symmetric=symmetric)
        except (ValueError, TypeError) as exc:
            raise type(exc)(exc.args[0] if str(exc).startswith("QbertConfig") else f"QbertConfig: {exc}") \
                from exc
        if layers is not None and not isinstance(layers, list):
            raise TypeError(f"QbertConfig: layers must be a list of qbert.layers entries or None, got "
                            f"{type(layers).__name__}")
        if kept_float is not None and not (isinstance(kept_float, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in kept_float.items())):
            raise TypeError(f"QbertConfig: kept_float must map module names to reasons (str), got {kept_float!r}")
        self.quant_method = QUANT_METHOD
        self.format = fmt
        self.skip = list(skip)
        self.include_head = include_head
        self.group_size = group_size
        self.row_groups = row_groups
        self.symmetric = symmetric
        self.fuse = fuse
        self.layers = layers
        self.kept_float = kept_float

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """The config of a config.json's ``quantization_config``; a key QbertConfig does not take is an error."""
        known = set(cls().to_dict())
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"QbertConfig.from_dict: unknown keys {unknown}; a qbert quantization_config has "
                             f"the keys {sorted(known)}")
        return super().from_dict(config_dict, return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "format": _format_to_json(self.format), "skip": list(self.skip),
                "include_head": self.include_head, "group_size": self.group_size, "row_groups": self.row_groups,
                "symmetric": self.symmetric, "fuse": self.fuse, "layers": copy.deepcopy(self.layers),
                "kept_float": dict(self.kept_float) if self.kept_float is not None else None}

    def __iter__(self):
        yield from self.to_dict().items()

    def label(self) -> str:
        """``QuantizeSummary.mode`` for this config: ``"plan"``, or the format's ``describe()``."""
        if isinstance(self.format, Plan):
            return "plan"
        return linear_format(self.format, group_size=self.group_size, row_groups=self.row_groups,
                             symmetric=self.symmetric).describe()


@dataclass
class _Pending:
    """A selected nn.Linear waiting for its tensors: its format and every name it is reachable by."""

    linear: nn.Linear
    fmt: LinearFormat
    names: list[str]


class _QuantizeOnLoad(ConversionOps):
    """transformers' conversion op for one tensor of a selected Linear: hands it to the quantizer."""

    def __init__(self, hf_quantizer: QbertHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, missing_keys=None,
                **kwargs) -> dict:
        (value,) = input_dict.values()
        tensor = value[0] if isinstance(value, list) else value
        self.hf_quantizer.receive(model, full_layer_name, tensor, missing_keys)
        return {}


class QbertHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``QbertConfig`` (see the module docstring for what each phase does)."""

    requires_calibration = False

    def __init__(self, quantization_config: QbertConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self._by_name: dict[str, _Pending] = {}   # Linears quantized as their tensors arrive, by every name
        self._waiting: dict[int, _Pending] = {}   # every selected Linear not yet quantized
        self._summary: QuantizeSummary | None = None
        self._source = ""
        self._metadata: dict[str, str] = {}
        self._ignored: set[str] = set()  # patterns added to the model's _keys_to_ignore_on_load_unexpected

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    # ---- before the weights load (the model is on the meta device) ------------------------------------

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        try:  # a pruned model's config.json records its shapes: the skeleton is resized to them
            io.apply_pruning(model.config.name_or_path, model)
        except io.QuantizedFileError as exc:
            raise io.QuantizedFileError(f"from_pretrained: {exc}") from exc
        if self.pre_quantized:
            self._place_saved_layers(model, checkpoint_files)
        else:
            self._select_layers(model)
        return model

    def _select_layers(self, model) -> None:
        config = self.quantization_config
        selected: list[tuple[nn.Linear, LinearFormat]] = []

        def record(linear: nn.Linear, fmt: LinearFormat) -> nn.Linear:
            selected.append((linear, fmt))
            return linear

        self._summary = swap_linears(model, config.format, config.skip, config.include_head, config.group_size,
                                     config.row_groups, config.symmetric, record, caller=CALLER,
                                     replacement="qbert.nn.QLinear")
        names_of: dict[int, list[str]] = {}
        for name in self._summary.swapped:
            names_of.setdefault(id(model.get_submodule(name)), []).append(name)
        tied = set(getattr(model, "all_tied_weights_keys", {}))
        for linear, fmt in selected:
            pending = _Pending(linear, fmt, names_of[id(linear)])
            self._waiting[id(linear)] = pending
            if not any(f"{name}.{tensor}" in tied for name in pending.names for tensor in _LOADED_TENSORS):
                self._by_name.update({name: pending for name in pending.names})

    def _place_saved_layers(self, model, checkpoint_files) -> None:
        """Empty QLinears at the config's layers, and the checkpoint headers checked, before allocation."""
        if not checkpoint_files:
            raise io.QuantizedFileError(f"{CALLER}: a qbert model loads from safetensors checkpoint files; "
                                        f"none were given")
        self._source = os.path.dirname(checkpoint_files[0])
        config = self.quantization_config
        try:
            if config.layers is None:
                raise io.QuantizedFileError(f"{self._source}: config.json's quantization_config has no "
                                            f"'layers' (save the model with save_pretrained or "
                                            f"qbert.save_quantized)")
            specs = io.layer_specs(self._source, config.layers)
            self._metadata, stored = io.read_headers(checkpoint_files)
            io.check_same_layers(self._source, config.layers, self._metadata)
            saved_dtype = self._metadata[io.KEY_FLOAT_DTYPE]
            if str(model.dtype).removeprefix("torch.") != saved_dtype:  # the skeleton is in the load's dtype
                raise io.QuantizedFileError(f"{self._source}: the quantized model was saved in {saved_dtype}; "
                                            f"load it with dtype={saved_dtype} or 'auto', not {model.dtype}")
            stored, placeholders = io.split_placeholders(self._source, self._metadata, stored, specs)
            for spec in specs:
                io.place_qlinear(self._source, model, *spec)
            io.check_tensors(self._source, model, stored, tied=_tied_outside_qlinears(model))
        except io.QuantizedFileError as exc:
            raise io.QuantizedFileError(f"from_pretrained: {exc}") from exc
        # The checked placeholders are checkpoint tensors the model has no place for: transformers drops them
        # as unexpected keys; these patterns (exact names) keep them out of its load report.
        self._ignored = {f"^{re.escape(name)}$" for name in placeholders}
        ignored = set(model._keys_to_ignore_on_load_unexpected or ())
        model._keys_to_ignore_on_load_unexpected = ignored | self._ignored

    # ---- while the weights load (quantizing a float checkpoint) -------------------------------------

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, tensor = param_name.rpartition(".")
        return not self.pre_quantized and tensor in _LOADED_TENSORS and module_name in self._by_name

    def get_quantize_ops(self) -> _QuantizeOnLoad:
        return _QuantizeOnLoad(self)

    def receive(self, model, param_name: str, tensor, missing_keys) -> None:
        """Put one loaded tensor into its Linear; once the Linear has all its tensors, quantize it."""
        module_name, _, tensor_name = param_name.rpartition(".")
        pending = self._by_name[module_name]
        expected = getattr(pending.linear, tensor_name).shape
        if tensor.shape != expected:
            raise ValueError(f"{CALLER}: {param_name} is {list(tensor.shape)} in the checkpoint, but the "
                             f"model's nn.Linear expects {list(expected)}")
        pending.linear._parameters[tensor_name] = nn.Parameter(tensor, requires_grad=False)
        for name in pending.names:
            missing_keys.discard(f"{name}.{tensor_name}")
        if not any(p.is_meta for p in pending.linear.parameters(recurse=False)):
            self._quantize(model, pending)

    def _quantize(self, model, pending: _Pending) -> None:
        qlinear = QLinear.from_linear(pending.linear, pending.fmt)
        qlinear.train(pending.linear.training)
        for name in pending.names:
            _set_module(model, name, qlinear)
            self._by_name.pop(name, None)
        del self._waiting[id(pending.linear)]

    # ---- after the weights load ---------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            model._keys_to_ignore_on_load_unexpected -= self._ignored  # the load report is written
            try:
                io.check_checksum(self._source, self._metadata, model)
            except io.QuantizedFileError as exc:
                raise io.QuantizedFileError(f"from_pretrained: {exc}") from exc
            swapped = tuple(name for entry in config.layers for name in entry["names"])
            summary = QuantizeSummary(config.label(), family_of(model).name, swapped, dict(config.kept_float or {}))
        else:
            for pending in list(self._waiting.values()):  # tied Linears, now that transformers tied them
                self._quantize(model, pending)
            _tied_outside_qlinears(model)
            summary = self._summary
            config.layers = io.layer_entries(model)
            config.kept_float = dict(summary.kept_float)
        summary = dataclasses.replace(summary, fused=fuse(model) if config.fuse else ())
        setattr(model, SUMMARY_ATTR, summary)
        return model

    # ---- save_pretrained ----------------------------------------------------------------------------

    def get_state_dict_and_metadata(self, model):
        """The tensors (placeholders included) and safetensors metadata ``qbert.save_quantized`` writes
        (config.json's layers too)."""
        self.quantization_config.layers = io.layer_entries(model)
        return io.tensors_to_save(model), io.file_metadata(model)


def _tied_outside_qlinears(model) -> dict[str, str]:
    """transformers' tied weights (target -> source) but those of a module now a QLinear (its tensors are
    its own: ``QLinear.from_linear`` copies them); transformers is told to stop tying those."""
    qlinears = {name for name, module in model.named_modules() if isinstance(module, QLinear)}
    tied = getattr(model, "all_tied_weights_keys", {})
    for target in [t for t in tied if t.rpartition(".")[0] in qlinears]:
        del tied[target]
    return dict(tied)


def describe(model: nn.Module) -> QbertConfig:
    """The ``QbertConfig`` of a model quantized by qbert: its layers, their format (the one format every
    QLinear has, or a plan of them), whether the fused chain is installed, and ``qbert_summary.kept_float``."""
    formats = {}
    for name, module in model.named_modules():
        if isinstance(module, QLinear):
            formats[name] = module.format
    if not formats:
        raise ValueError(f"qbert.hf: {type(model).__name__} has no QLinear layer; quantize it with qbert first")
    distinct = set(formats.values())
    if len(distinct) == 1:
        (fmt,) = distinct
        fmt = fmt.name if FORMATS.get(fmt.name) == fmt else fmt
    else:
        fmt = Plan(formats)
    summary = getattr(model, SUMMARY_ATTR, None)
    kept_float = dict(summary.kept_float) if isinstance(summary, QuantizeSummary) else {}
    fused = any(isinstance(module, FusedLayer) for module in model.modules())
    return QbertConfig(fmt, fuse=fused, layers=io.layer_entries(model), kept_float=kept_float)


_MARKS = ("hf_quantizer", "is_quantized", "quantization_method")  # what transformers sets on a quantized model


def attach(model: nn.Module) -> None:
    """Mark a transformers model quantized by ``qbert.quantize`` as a qbert model for transformers (its
    ``config.quantization_config`` and ``hf_quantizer``, as ``from_pretrained`` with a ``QbertConfig`` sets
    them), so that ``model.save_pretrained(d)`` writes a directory that ``from_pretrained(d)`` restores. A
    module holding transformers models (a SentenceTransformer) has each of them marked."""
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        inner = [m for m in model.modules() if isinstance(m, transformers.PreTrainedModel)]
        if not inner:
            raise TypeError(f"qbert.hf.attach: {type(model).__name__} holds no transformers model")
        for module in inner:
            attach(module)
        return
    config = describe(model)
    model.hf_quantizer = QbertHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = config


@contextlib.contextmanager
def attached(model: nn.Module):
    """``attach(model)`` for the duration of a block, unless it is attached already (``save_quantized``)."""
    if isinstance(getattr(model, "hf_quantizer", None), QbertHfQuantizer):
        yield
        return
    marks = {name: vars(model)[name] for name in _MARKS if name in vars(model)}
    config_marks = {k: v for k, v in vars(model.config).items() if k == "quantization_config"}
    attach(model)
    try:
        yield
    finally:
        for name in _MARKS:
            vars(model).pop(name, None)
        vars(model).update(marks)
        vars(model.config).pop("quantization_config", None)
        vars(model.config).update(config_marks)


register_quantization_config(QUANT_METHOD)(QbertConfig)
register_quantizer(QUANT_METHOD)(QbertHfQuantizer)
