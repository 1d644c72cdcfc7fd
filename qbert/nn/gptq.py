"""GPTQ over a whole model: each layer's input Hessian from calibration batches, layers in model order.

``qbert.quantize(model, fmt, calibration=batches, rounding="gptq")`` runs ``quantize_sequentially``:

1. One forward of the first batch records the order in which the chosen ``nn.Linear`` layers are first
   called, how often each is called per forward (a shared layer, e.g. ALBERT's, more than once) and which
   of them read the very same input tensor (BERT's query / key / value). Consecutive layers with one input
   form a *stage*; every other layer is a stage of its own.
2. Stage by stage, in that order: a forward of every calibration batch accumulates the stage's input
   Hessian H = 2 X^T X / T (``qbert.quant.gptq.input_hessian``, float64, one H per stage: the memory of
   one layer's H at a time) and stops as soon as the stage's layers have seen their inputs; then each
   layer of the stage is rounded by ``gptq_quantize`` and replaced by its QLinear. The next stage's inputs
   are therefore computed by the layers already quantized before it, as GPTQ prescribes.

Layers quantized by round to nearest (a plan may mix both) are swapped before the first stage, so the
GPTQ layers see them quantized too. Calibration runs in eval mode (no dropout) without gradients; each
batch's tensors are moved to the device of the model's first parameter. Padding tokens are part of X like
any other token. Every stage visits every batch: the cost is about (stages / 2) forwards per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from qbert.quant.gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, GPTQError, gptq_quantize, input_hessian

NEAREST, GPTQ = "nearest", "gptq"
METHODS = (NEAREST, GPTQ)


@dataclasses.dataclass(frozen=True)
class Rounding:
    """How a layer's weights are rounded to their format's codes.

    method: ``"nearest"`` (round half to even on each weight, the default, needs no data) or ``"gptq"``
        (Hessian-aware rounding from calibration inputs, ``qbert.quant.gptq``).
    damp: GPTQ's damping, a fraction of the mean diagonal of H added to it (>= 0).
    block_size: GPTQ's lazy-update block, in columns (>= 1).
    act_order: GPTQ visits the columns by decreasing H[k, k] (static K-group ranges; same layout).
    """

    method: str = NEAREST
    damp: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK_SIZE
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Rounding: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not self.damp >= 0:
            raise ValueError(f"Rounding: damp must be a float >= 0, got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"Rounding: block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.act_order, bool):
            raise TypeError(f"Rounding: act_order must be a bool, got {self.act_order!r}")

    def describe(self) -> str:
        """``"nearest"``, ``"gptq"``, ``"gptq damp=0.1 act_order"``."""
        if self.method == NEAREST:
            return NEAREST
        options = [f"damp={self.damp:g}"] if self.damp != DEFAULT_DAMP else []
        options += [f"block_size={self.block_size}"] if self.block_size != DEFAULT_BLOCK_SIZE else []
        options += ["act_order"] if self.act_order else []
        return " ".join([GPTQ, *options])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, entry: dict) -> Rounding:
        fields = list(cls.__dataclass_fields__)
        if not isinstance(entry, dict) or set(entry) - set(fields) or "method" not in entry:
            raise ValueError(f"Rounding.from_dict: expected a dict with 'method' and optionally "
                             f"{fields[1:]}, got {entry!r}")
        return cls(**entry)


NEAREST_ROUNDING = Rounding()


def rounding_of(value: str | Rounding, caller: str = "quantize") -> Rounding:
    """``"nearest"`` / ``"gptq"`` (default options) or a ``Rounding``; anything else is an error."""
    if isinstance(value, Rounding):
        return value
    if isinstance(value, str) and value in METHODS:
        return Rounding(value)
    raise ValueError(f"{caller}: rounding must be one of {', '.join(map(repr, METHODS))} or a "
                     f"qbert.nn.Rounding, got {value!r}")


class _StageDone(Exception):  # control flow, not an error: the stage has all its inputs
    """Raised by a hook to end a calibration forward once the stage's layers have seen their inputs."""


def calibration_batches(model: nn.Module, calibration: Iterable[Mapping] | None, caller: str) -> list[dict]:
    """The batches as a list, each checked against ``model.forward``'s parameters; errors name the batch."""
    if calibration is None:
        raise ValueError(f"{caller}: rounding='gptq' needs calibration=batches: an iterable of dicts of model "
                         f"inputs (e.g. a tokenizer's output; unlabeled text is enough)")
    if isinstance(calibration, Mapping):
        raise TypeError(f"{caller}: calibration must be an iterable of batches (dicts of model inputs), got one "
                        f"dict; wrap it in a list: calibration=[batch]")
    batches = list(calibration)
    if not batches:
        raise ValueError(f"{caller}: calibration has no batches; rounding='gptq' needs at least one")
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = [name for name, p in parameters.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for i, batch in enumerate(batches, 1):
        if not isinstance(batch, Mapping) or not all(isinstance(key, str) for key in batch):
            raise TypeError(f"{caller}: calibration batch {i} must be a dict of model inputs (str keys), got "
                            f"{type(batch).__name__}")
        # Keys must be named parameters: Hugging Face models end forward in **kwargs, which would take anything.
        unknown = [key for key in batch if key not in accepted]
        if not batch or (unknown and (accepted or not takes_any)):
            raise ValueError(f"{caller}: calibration batch {i} has the keys {sorted(batch)}, which "
                             f"{type(model).__name__}.forward does not take (it takes {', '.join(accepted)})")
    return [dict(batch) for batch in batches]


def _on(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@contextlib.contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients; every module's training flag is restored afterwards."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags.items():
            module.training = flag  # not .train(): it would recurse into modules replaced meanwhile


def _run(model: nn.Module, batch: dict, device: torch.device) -> None:
    with contextlib.suppress(_StageDone):
        model(**_on(batch, device))


def plan_stages(model: nn.Module, layers: Sequence[nn.Module], names: Sequence[str], batch: dict,
                caller: str = "quantize") -> tuple[list[list[int]], dict[int, int]]:
    """(stages as lists of indices into ``layers``, calls per forward of each index), from one forward of
    ``batch`` (module docstring, step 1); a layer the forward never calls is a ``GPTQError`` naming it."""
    device = next(model.parameters()).device
    first_input: dict[int, torch.Tensor] = {}
    calls: dict[int, int] = {}
    order: list[int] = []

    def hook(index: int) -> Callable:
        def record(module, args) -> None:
            calls[index] = calls.get(index, 0) + 1
            if index not in first_input:
                first_input[index] = args[0]  # kept alive for the forward, so identities stay unique
                order.append(index)
        return record

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with _calibrating(model):
            _run(model, batch, device)
    finally:
        for handle in handles:
            handle.remove()
    missing = [names[i] for i in range(len(layers)) if i not in calls]
    if missing:
        raise GPTQError(f"{caller}: rounding='gptq': a forward of calibration batch 1 never calls "
                         f"{', '.join(missing)}; GPTQ needs every such layer's inputs (quantize it with "
                         f"rounding='nearest', or calibrate with inputs that reach it)")
    stages: list[list[int]] = []
    for index in order:
        if stages and first_input[index] is first_input[stages[-1][0]]:
            stages[-1].append(index)
        else:
            stages.append([index])
    return stages, calls


def _stage_hessian(model: nn.Module, lead: nn.Module, expected_calls: int, batches: list[dict],
                   device: torch.device) -> torch.Tensor:
    """The H (float64) of ``lead``'s inputs over every batch, which the stage's other layers share; each
    forward stops after the stage's last expected call."""
    state: dict = {"h": None, "tokens": 0, "calls": 0}

    def accumulate(module, args) -> None:
        x = args[0].detach()
        tokens = x.numel() // x.shape[-1]
        h = input_hessian(x) * tokens  # the sum 2 X^T X of this call
        state["h"] = h if state["h"] is None else state["h"] + h
        state["tokens"] += tokens
        state["calls"] += 1
        if state["calls"] == expected_calls:
            raise _StageDone

    handle = lead.register_forward_pre_hook(accumulate)
    try:
        for batch in batches:
            state["calls"] = 0
            _run(model, batch, device)
    finally:
        handle.remove()
    return state["h"] / max(state["tokens"], 1)


def quantize_sequentially(model: nn.Module, targets: Sequence[tuple[nn.Linear, list[str], object, Rounding]],
                          stages: tuple[list[list[int]], dict[int, int]], batches: list[dict], build: Callable,
                          place: Callable[[str, nn.Module], None], *, progress: bool = True) -> None:
    """GPTQ-quantize ``targets`` (linear, its names, its format, its Rounding) in the ``stages`` of
    ``plan_stages`` (module docstring, step 2); ``build(linear, fmt, gptq_weight)`` makes the replacement
    module, ``place(name, module)`` puts it at a name. The replacement keeps the linear's training flag."""
    device = next(model.parameters()).device
    layers = [linear for linear, *_ in targets]
    training = [linear.training for linear in layers]
    order, calls = stages
    with _calibrating(model):
        bar = tqdm(order, desc="gptq", unit="stage", disable=not progress, leave=False)
        for stage in bar:
            bar.set_postfix_str(targets[stage[0]][1][0])
            hessian = _stage_hessian(model, layers[stage[0]], calls[stage[0]], batches, device)
            for index in stage:
                linear, names, fmt, rounding = targets[index]
                try:
                    weight = gptq_quantize(linear.weight, hessian, fmt, damp=rounding.damp,
                                           block_size=rounding.block_size, act_order=rounding.act_order,
                                           name=names[0])
                except GPTQError as exc:
                    raise GPTQError(f"quantize: {exc}") from exc
                module = build(linear, fmt, weight)
                module.train(training[index])
                for name in names:
                    place(name, module)
            del hessian


def input_hessians(model: nn.Module, names: Sequence[str], batches: list[dict], *, progress: bool = True,
                   caller: str = "input_hessians") -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(stage's module names, H)`` stage by stage for the modules ``names`` of ``model`` as it is (module
    docstring; nothing is quantized in between), one H alive at a time: the input Hessians that GPTQ errors
    of the float model are measured with (``qbert.hessian.gptq_error_ratios``)."""
    layers = [model.get_submodule(name) for name in names]
    device = next(model.parameters()).device
    order, calls = plan_stages(model, layers, names, batches[0], caller)
    with _calibrating(model):
        for stage in tqdm(order, desc="input Hessians", unit="stage", disable=not progress, leave=False):
            yield [names[i] for i in stage], _stage_hessian(model, layers[stage[0]], calls[stage[0]], batches,
                                                            device)


__all__ = ["GPTQ", "METHODS", "NEAREST", "NEAREST_ROUNDING", "Rounding", "calibration_batches", "input_hessians",
           "plan_stages", "quantize_sequentially", "rounding_of"]
