"""qbert.quantize: swap the ``nn.Linear`` layers of a model for ``QLinear`` in place."""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from qbert.models import FAMILIES, family_of, model_type_of
from qbert.models._family import first_match
from qbert.nn import fused, gptq
from qbert.nn.formats import LinearFormat, check_option, linear_format
from qbert.nn.gptq import NEAREST, NEAREST_ROUNDING, Rounding, rounding_of
from qbert.nn.plan import Plan
from qbert.nn.qlinear import QLinear

SUMMARY_ATTR = "qbert_summary"
_NAMES_SHOWN = 3  # module names an error message lists per reason before "..."
_WHAT_IS_QUANTIZED = ("qbert quantizes the modules of exact type nn.Linear outside the task heads "
                     "(include_head=True adds the heads; skip=... keeps more in float)")


@dataclass(frozen=True)
class QuantizeSummary:
    """What one ``qbert.quantize`` call did; set on the model as ``model.qbert_summary``.

    swapped: names of the modules now QLinear (a shared layer lists every name it is reachable by).
    kept_float: name -> why that ``nn.Linear`` stayed in float (``"head"``, ``"skip: <pattern>"``, ...).
    mode: ``LinearFormat.describe()`` of the one format used (``"w8a8"``, ``"w4a16 g128 asym"``), or
        ``"plan"`` when a plan chose per layer (each QLinear's ``format`` says which).
    fused: names of the modules now running the fused W8A8 chain (``qbert.nn.fused``).
    rounding: name -> ``Rounding.describe()`` of the swapped modules not rounded to nearest (GPTQ).
    """

    mode: str
    family: str
    swapped: tuple[str, ...]
    kept_float: dict[str, str] = field(default_factory=dict)
    fused: tuple[str, ...] = ()
    rounding: dict[str, str] = field(default_factory=dict)


def _linear_aliases(model: nn.Module) -> dict[int, tuple[nn.Linear, list[str]]]:
    """Every ``nn.Linear`` (exact type; subclasses may change forward) by identity, with all its names."""
    found: dict[int, tuple[nn.Linear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear:
            found.setdefault(id(module), (module, []))[1].append(name)
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def quantize(model: nn.Module, mode: str | LinearFormat | Mapping = "w8a8",
             skip: tuple[str, ...] | list[str] = (), include_head: bool = False, *,
             group_size: int | None = None, row_groups: int | None = None,
             symmetric: bool | None = None, fuse: bool = True, rounding: str | Rounding = NEAREST,
             calibration: Iterable[Mapping] | None = None, progress: bool = True) -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` layers for ``qbert.nn.QLinear`` in place and return ``model``.

    mode: one format for every layer -- a mode name (``"w8a8"``, ``"w8a16"``, ``"w4a16"``, ``"w3a16"``,
        ``"w2a16"``, ``"w4a8"``, ``"w3a8"``, ``"w2a8"``; see ``qbert.nn.formats``) or a ``LinearFormat`` --
        or a plan: a ``qbert.Plan`` (or a mapping of module name -> mode name / LinearFormat)
        giving each layer its own format. With a plan exactly the listed modules are quantized (heads
        included); a listed name that is not an ``nn.Linear`` of the model is an error.
    group_size, row_groups, symmetric: overrides of a mode's defaults (``linear_format``); e.g.
        ``quantize(model, "w4a16", group_size=64)``; ``group_size=-1`` means one range per output channel.
    skip: fnmatch globs over module names (``model.named_modules()``) to leave in float; a pattern that
        matches a module also covers everything below it (``"bert.encoder.layer.0"``). A pattern that
        matches no module is an error (a misspelt name would otherwise quantize what it meant to keep).
    include_head: also quantize the task heads (classifier, QA, MLM heads, ...). Heads come from the
        family glue in ``qbert.models``; tied MLM decoders are heads, so they stay float by default.
    fuse: install the fused W8A8 chain (``qbert.nn.fused``) where the layers are w8a8 and the family
        supports it (BERT, MiniLM, RoBERTa, ELECTRA): residual + LayerNorm + quantize feeding Q, K, V and
        the FFN up-projection as int8, and FFN up + GELU + requantize feeding the down-projection.
        ``fuse=False`` keeps the unfused path (each QLinear quantizes its own float input), the
        reference the fused chain is tested against.
    rounding: how weights become codes (``qbert.nn.gptq``): ``"nearest"`` (the default) rounds each weight
        to its nearest code; ``"gptq"`` (or a ``qbert.nn.Rounding`` with GPTQ's options) is Hessian-aware
        rounding from ``calibration``: each layer's input Hessian over the calibration tokens, the layers in
        model order, each seeing the inputs of the layers already quantized before it. Same formats, codes
        and kernels; a plan may name a rounding per layer (``Plan.rounding``), which wins over this one.
    calibration: with GPTQ rounding, an iterable of batches, each a dict of model inputs (``model(**batch)``;
        a tokenizer's output; labels are not needed). Given without GPTQ rounding, it is an error.
    progress: show GPTQ's progress (tqdm).

    A Linear reachable under several names (shared weights, e.g. ALBERT's shared layer reused by
    construction, or one module registered twice) becomes ONE QLinear placed at every name, so the
    sharing survives; it stays float if any of its names is a head or skipped. Only modules whose type is
    exactly ``nn.Linear`` are swapped (subclasses may rely on their own forward).

    Tested on random-init BERT, MiniLM (a BertModel), RoBERTa, DistilBERT, ALBERT and ELECTRA models from
    transformers. Other modules work generically (every nn.Linear is a candidate; for a Hugging Face model
    of another type, the children outside ``model.base_model`` are treated as heads) but are untested.

    Errors, raised before the model is changed: an option of the wrong type (TypeError naming it); a model
    that is already quantized (it has QLinear layers or a ``qbert_summary``: quantize the float model) or
    prepared for QAT (``qbert.nn.convert`` it); and zero layers to quantize (no nn.Linear, or every one
    kept in float by the heads, ``skip`` or the plan), which names why.

    The result is recorded in ``model.qbert_summary`` (a ``QuantizeSummary``).
    """
    check_option("quantize", "fuse", fuse, bool)
    check_option("quantize", "progress", progress, bool)
    _check_not_prepared_for_qat(model)
    summary = swap_linears(model, mode, skip, include_head, group_size, row_groups, symmetric,
                           QLinear.from_linear, caller="quantize", replacement="qbert.nn.QLinear",
                           rounding=rounding_of(rounding), calibration=calibration, progress=progress)
    if fuse:
        summary = dataclasses.replace(summary, fused=fused.fuse(model))
    setattr(model, SUMMARY_ATTR, summary)
    if _holds_transformers_model(model):
        from qbert import hf

        hf.attach(model)  # save_pretrained then writes a directory from_pretrained restores
    return model


def _holds_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is, or holds, a transformers model (transformers is imported by then if so)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and any(isinstance(m, transformers.PreTrainedModel) for m in model.modules())


def swap_linears(model: nn.Module, mode, skip, include_head: bool, group_size: int | None,
                 row_groups: int | None, symmetric: bool | None,
                 build: Callable[[nn.Linear, LinearFormat], nn.Module], *, caller: str,
                 replacement: str, rounding: Rounding | None = None, calibration: Iterable[Mapping] | None = None,
                 progress: bool = True) -> QuantizeSummary:
    """Put ``build(linear, format)`` in place of every ``nn.Linear`` that ``quantize``'s arguments select
    (one module per shared layer, placed at each of its names; it keeps the Linear's training flag);
    ``caller`` and ``replacement`` name the public function and the module class in error messages.
    Layers whose rounding (``rounding``, or the plan's for that layer) is GPTQ become
    ``QLinear.from_codes`` of ``qbert.nn.gptq.quantize_sequentially`` over ``calibration`` instead;
    ``rounding=None`` says the caller rounds to nearest only, and a plan naming GPTQ is then an error.
    Every check (``quantize``'s errors) runs before the model is changed; an error while GPTQ runs puts
    the original layers back."""
    _check_options(caller, skip, include_head, group_size, row_groups, symmetric)
    if type(model) is nn.Linear:
        raise TypeError(f"{caller}: the model itself is an nn.Linear and cannot be swapped in place; "
                        f"use {replacement}.from_linear(linear, mode)")
    _check_not_quantized(model, caller)
    family = family_of(model)
    aliases = _linear_aliases(model)
    plan, plan_rounding = _plan_layers(mode, caller)
    if plan is None:
        fmt = linear_format(mode, group_size=group_size, row_groups=row_groups, symmetric=symmetric)
        _check_skip_matches(model, tuple(skip), caller)
        chosen = _uniform_choice(aliases, fmt, family, tuple(skip), include_head)
        label = fmt.describe()
    else:
        if (group_size, row_groups, symmetric) != (None, None, None) or skip or include_head:
            raise ValueError(f"{caller}: a plan names every layer's format; group_size, row_groups, symmetric, "
                             f"skip and include_head apply to a single mode only")
        chosen = _plan_choice(model, aliases, plan, caller)
        label = "plan"
    if not any(isinstance(choice, LinearFormat) for choice in chosen.values()):
        raise ValueError(_nothing_to_quantize(model, caller, aliases, chosen, plan))
    swapped: list[str] = []
    kept_float: dict[str, str] = {}
    nearest, by_gptq = [], []
    for key, (linear, names) in aliases.items():
        fmt_or_reason = chosen[key]
        if isinstance(fmt_or_reason, str):
            kept_float.update({name: fmt_or_reason for name in names})
            continue
        layer_rounding = next((plan_rounding[name] for name in names if name in plan_rounding),
                              rounding or NEAREST_ROUNDING)
        (nearest if layer_rounding.method == NEAREST else by_gptq).append(
            (linear, names, fmt_or_reason, layer_rounding))
        swapped.extend(names)
    if by_gptq and rounding is None:
        raise ValueError(f"{caller}: the plan names GPTQ rounding for {_some([t[1][0] for t in by_gptq])}; "
                         f"{caller} rounds to nearest only: GPTQ needs calibration data, "
                         f"qbert.quantize(model, plan, calibration=batches) applies it")
    if by_gptq:
        batches = gptq.calibration_batches(model, calibration, caller)
        stages = gptq.plan_stages(model, [t[0] for t in by_gptq], [t[1][0] for t in by_gptq], batches[0],
                                  caller)
    elif calibration is not None:
        raise ValueError(f"{caller}: calibration is only used by GPTQ rounding, and no layer has it "
                         f"(pass rounding='gptq', or leave calibration out)")
    try:
        for linear, names, fmt, _ in nearest:
            module = build(linear, fmt)
            module.train(linear.training)
            for name in names:
                _set_module(model, name, module)
        if by_gptq:
            gptq.quantize_sequentially(
                model, by_gptq, stages, batches,
                lambda linear, fmt, weight: QLinear.from_codes(linear, fmt, weight.codes, weight.scale, weight.zero),
                lambda name, module: _set_module(model, name, module), progress=progress)
    except BaseException:
        for linear, names, *_ in (*nearest, *by_gptq):
            for name in names:
                _set_module(model, name, linear)
        raise
    rounded = {name: r.describe() for _, names, _, r in by_gptq for name in names}
    return QuantizeSummary(label, family.name, tuple(swapped), kept_float, rounding=rounded)


def _check_options(caller: str, skip, include_head, group_size, row_groups, symmetric) -> None:
    if isinstance(skip, str):
        raise TypeError(f"{caller}: skip must be a sequence of patterns, got the string {skip!r} "
                        f"(write skip=({skip!r},))")
    if not isinstance(skip, Sequence):
        raise TypeError(f"{caller}: skip must be a sequence (tuple or list) of str patterns, got "
                        f"{type(skip).__name__} {skip!r}")
    for i, pattern in enumerate(skip):
        check_option(caller, f"skip[{i}]", pattern, str)
    check_option(caller, "include_head", include_head, bool)
    check_option(caller, "group_size", group_size, int, optional=True)
    check_option(caller, "row_groups", row_groups, int, optional=True)
    check_option(caller, "symmetric", symmetric, bool, optional=True)


def _check_not_quantized(model: nn.Module, caller: str) -> None:
    """Quantizing again would leave the QLinear layers in their old format while reporting the new mode."""
    summary = getattr(model, SUMMARY_ATTR, None)
    qlinears = [m for m in model.modules() if isinstance(m, QLinear)]  # modules() yields each object once
    marked = isinstance(summary, QuantizeSummary)
    if not marked and not qlinears:
        return
    mode = summary.mode if marked else ", ".join(sorted({q.format.describe() for q in qlinears}))
    raise ValueError(f"{caller}: {type(model).__name__} is already quantized (mode {mode!r}, {len(qlinears)} "
                     f"QLinear layers); its layers cannot take another format: quantize the float model "
                     f"instead (reload it, or quantize a copy.deepcopy of it)")


def _check_not_prepared_for_qat(model: nn.Module) -> None:
    from qbert.nn.qat import FakeQuantLinear

    prepared = sorted({m.format.describe() for m in model.modules() if isinstance(m, FakeQuantLinear)})
    if prepared:
        raise ValueError(f"quantize: {type(model).__name__} is prepared for QAT (FakeQuantLinear layers, "
                         f"{', '.join(prepared)}); qbert.nn.convert(model) quantizes it in those formats")


def _plan_layers(mode, caller: str) -> tuple[dict[str, LinearFormat] | None, dict[str, Rounding]]:
    """The per-layer formats and roundings of a plan argument; (None, {}) when ``mode`` names one format
    for all layers."""
    if isinstance(mode, Plan):
        return dict(mode.layers), dict(mode.rounding)
    if isinstance(mode, Mapping):
        return {name: linear_format(fmt) for name, fmt in mode.items()}, {}
    if isinstance(mode, (str, LinearFormat)):
        return None, {}
    raise TypeError(f"{caller}: mode must be a mode name (str), a LinearFormat, a qbert.Plan or a "
                    f"mapping of module name -> format, got {type(mode).__name__} {mode!r}")


def _nothing_to_quantize(model: nn.Module, caller: str, aliases, chosen: dict,
                         plan: dict[str, LinearFormat] | None) -> str:
    """Why zero layers of ``model`` could be quantized, what qbert quantizes, and the supported families."""
    if plan is not None and not plan:
        why = "the plan lists no layers"
    elif not aliases:
        why = "it has no nn.Linear layer"
    else:
        by_reason: dict[str, list[str]] = defaultdict(list)
        for key, (_, names) in aliases.items():
            by_reason[chosen[key]].extend(names)
        why = "every nn.Linear stays in float: " + "; ".join(
            f"{reason!r} for {len(names)} ({_some(names)})" for reason, names in by_reason.items())
    others = sorted({type(m).__name__ for m in model.modules()
                     if type(m) is not nn.Linear and next(m.parameters(recurse=False), None) is not None})
    if others:
        why += f"; its other modules with weights, which qbert does not quantize: {', '.join(others)}"
    model_type = model_type_of(model)
    generic = ("" if model_type in FAMILIES else
               f"; this model ({model_type or 'no config.model_type'}) gets the generic rule (heads: the children "
               f"outside model.base_model, if it has one)")
    return (f"{caller}: zero layers could be quantized in {type(model).__name__}: {why}. {_WHAT_IS_QUANTIZED}; "
            f"supported families (config.model_type): {', '.join(sorted(FAMILIES))}{generic}")


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + ", ..." if len(names) > _NAMES_SHOWN else shown


def _check_skip_matches(model: nn.Module, skip: tuple[str, ...], caller: str) -> None:
    """A skip pattern that matches no module name is a typo, not a choice: refuse it (naming some names)."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"{caller}: skip pattern {pattern!r} matches no module of {type(model).__name__} "
                             f"(module names look like {_some(names)})")


def _uniform_choice(aliases, fmt: LinearFormat, family, skip: tuple[str, ...], include_head: bool) -> dict:
    choice = {}
    for key, (_, names) in aliases.items():
        reason = _keep_float_reason(names, family.heads, family.keep_float, skip, include_head)
        choice[key] = reason if reason is not None else fmt
    return choice


def _plan_choice(model: nn.Module, aliases, plan: dict[str, LinearFormat], caller: str) -> dict:
    by_name = {name: key for key, (_, names) in aliases.items() for name in names}
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in plan:
        if name not in by_name:
            what = "no module" if name not in modules else f"a {type(modules[name]).__name__}, not an nn.Linear"
            raise ValueError(f"{caller}: the plan names {name!r}, which is {what} in {type(model).__name__}")
    choice = {}
    for key, (_, names) in aliases.items():
        formats = {plan[name] for name in names if name in plan}
        if len(formats) > 1:
            raise ValueError(f"{caller}: the plan gives the shared layer {names} several formats: "
                             f"{sorted(f.describe() for f in formats)}")
        choice[key] = formats.pop() if formats else "not in the plan"
    return choice


def _keep_float_reason(names: list[str], heads: tuple[str, ...], keep_float: tuple[str, ...],
                       skip: tuple[str, ...], include_head: bool) -> str | None:
    for name in names:
        pattern = first_match(name, skip)
        if pattern is not None:
            return f"skip: {pattern}"
        pattern = first_match(name, keep_float)
        if pattern is not None:
            return f"family keeps float: {pattern}"
        if not include_head and first_match(name, heads) is not None:
            return "head"
    return None
