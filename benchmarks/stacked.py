"""Structured pruning stacked with quantization: accuracy, size and CPU latency of all-MiniLM-L6-v2 on BBC News.

    python -m qbert.benchmarks.stacked [--smoke] [--out DIR] [--cache DIR] [--threads N] [--rows KEY,...]

Data and model: ``qbert_table``'s (BBC News, the same split and tokenization; all-MiniLM-L6-v2 with a mean-pool
classifier, fine-tuned in float32 with ``qbert_table.FULL``'s settings, so its cached checkpoint is reused).
The classifier head stays float in every row; every quantized row quantizes the 36 encoder ``nn.Linear``.

Rows, each a chain of steps applied to a copy of the fine-tuned model:
  * fp32; W8A8 (PTQ); Hessian-guided mixed precision (PTQ): HAWQ-V2 Omega_i(b) = Tr(H_i) / n_i *
    ||Q_b(W_i) - W_i||^2 over K-group formats W{2,3,4,8}A16 g128 (``MIXED_BITS``; Q-BERT's row groups do not
    divide pruned head counts), with Hutchinson traces of the model the row quantizes (``qbert_table.traces``),
    exact MILP allocation with Q / K / V tied, under the size of uniform W4 g128 of that same model;
  * pruning (``PRUNINGS``): ``qbert.prune_heads`` / ``qbert.prune_ffn`` (FFN neurons kept per layer a multiple
    of ``FFN_MULTIPLE``) of a fraction of all heads / neurons by first-order Taylor importance
    (``qbert.prune.head_importance`` / ``neuron_importance``, Michel et al. 2019) of the classification loss on
    ``Settings.score_batches`` labelled training batches; without recovery, and with distillation recovery
    (``qbert_table.train`` from the pruned weights for ``Settings.recovery_steps`` steps, loss cross-entropy +
    distillation to the fp32 model's logits); each of those alone, + W8A8 (PTQ) and + Hessian mixed (PTQ);
  * the order of pruning and quantization (``ORDER_PRUNINGS``): (a) prune -> float recovery -> W8A8 PTQ (the
    "+ distill + W8A8" row); (b) prune -> quantization-aware recovery (``prepare_qat`` W8A8 on the pruned
    model, the same distillation and steps, ``convert``); (c) quantization-aware pruning: the Taylor scores of
    the W8A8 fake-quantized model (``prepare_qat`` first; gradients through the straight-through estimator),
    the float model pruned by those scores, then (b).
Every W8A8 model runs qbert's fused W8A8 chain (``qbert.quantize`` installs it; QAT rows fuse after ``convert``).

Columns: accuracy on the test split; MB = exact bytes of the encoder Linear weights (``qbert_table.size_of``:
codes, scales, zeros; MB = 10**6 bytes); CPU latency of one batch of ``Settings.latency_batch`` test articles
(padded to the batch's longest, at most ``max_length`` tokens), the median over ``latency_repeats`` calls after
``latency_warmup``, at ``--threads`` threads. Latency is measured for every row in the same run, at the end,
round-robin over the rows (one call of each row per round, the starting row rotating) so drift of the machine
hits every row alike, on each row's structure and formats rebuilt from the fp32 weights (remove the row's
heads / neurons, quantize to the row's plan): the kernels' time does not depend on the weight values, and the
rebuild's exact byte count is checked against the row's. Speedup = fp32 latency / the row's.

Reports (``qbert_table.write_report``): markdown, csv, json (meta: device, versions, commit, threads, the
seconds each part of the run took, the load average), a Pareto plot (accuracy vs latency and vs size, the
front joined and labelled) and generated statements of what composes: per pruning, the accuracy drop of
prune + quantization against the sum of the separate drops, its speedup against each alone and their product,
what recovery adds, and which order wins -- each with its numbers.

Caching (``--cache``, default ``qbert_table``'s folder, so the fine-tuned checkpoint is shared): the Hessian
traces and every finished row (keyed by the settings that produce it) are stored, an interrupted or partial
run (``--rows``) resumes; latency is never cached (it is measured for all rows at the end of every run).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from qbert.benchmarks import _harness as H
from qbert.benchmarks import qbert_table as T
from torch import nn
from tqdm import tqdm

import qbert
from qbert.allocate import MB, Budget, allocate, default_ties, uniform_size
from qbert.cli import writable_dir
from qbert.hessian import TraceEstimate, hawq_sensitivity
from qbert.nn import LinearFormat, linear_format
from qbert.nn.fused import fuse
from qbert.nn.qat import convert, prepare_qat
from qbert.prune import (
    encoder_layers,
    head_importance,
    layer_parameters,
    neuron_importance,
    remove_heads,
    remove_neurons,
)
from qbert.timing import US_PER_S, round_robin_samples, set_threads

SUITE = "stacked"
CACHE_VERSION = 1  # bump when a change to this file changes what a cached row would contain
DEFAULT_CACHE = T.DEFAULT_CACHE  # shared with qbert_table: its fine-tuned checkpoint is reused
MIXED_BITS = (2, 3, 4, 8)  # candidate weight widths of the Hessian-guided rows (K groups of T.K_GROUP)
MIXED_BUDGET_BITS = 4  # their budget: the exact size of uniform W4 g128 of the model they quantize
FFN_MULTIPLE = 32  # FFN neurons kept per layer: a multiple of this (kernel- and SIMD-friendly widths)
TAYLOR = "taylor"
HEADS, FFN = "heads", "ffn"
FLOAT_SCORES, W8A8_SCORES = "float", "w8a8"  # the model the Taylor scores are computed on
NO_RECOVERY, DISTILL, QAT = "none", "distill", "qat"
FP32_Q, W8A8_PTQ, MIXED_PTQ, W8A8_QAT = "fp32", "w8a8-ptq", "mixed-ptq", "w8a8-qat"
QUANT_LABELS = {FP32_Q: "fp32", W8A8_PTQ: "W8A8 PTQ", MIXED_PTQ: "Hessian mixed PTQ", W8A8_QAT: "W8A8 QAT"}
ORDER_LABELS = {"a": "(a) prune -> float recovery -> W8A8 PTQ", "b": "(b) prune -> W8A8 QAT recovery",
                "c": "(c) W8A8-aware scores -> prune -> W8A8 QAT recovery"}
MS_PER_S = 1e3
QUARTILES = 4  # statistics.quantiles(n=4): the three quartile cuts (the IQR needs >= 2 timed calls)
W8A8 = linear_format(T.W8A8)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the numbers: ``table`` (the data, the fp32 fine-tuning and the Hessian
    traces, as ``qbert_table`` reads them) and this benchmark's own fields (hashed into the cache keys)."""

    table: T.Settings
    recovery_steps: int  # distillation steps of every recovery run (float and QAT alike) ...
    recovery_lr: float  # ... at this peak learning rate (the same for both, so the orders compare)
    score_batches: int  # Taylor scores: this many labelled training batches ...
    score_batch_size: int  # ... of this many articles (the first batches of a seeded shuffle)
    latency_batch: int  # articles in the timed batch (the first test articles)
    latency_warmup: int  # untimed rounds over every row
    latency_repeats: int  # timed rounds over every row (>= 2: the report gives their interquartile range)

    def subset(self, *names: str) -> dict[str, Any]:
        return {name: getattr(self, name) for name in names}


SCORE_FIELDS = ("score_batches", "score_batch_size")
RECOVERY_FIELDS = ("recovery_steps", "recovery_lr")

# Full run, sized for <= 35 minutes on 2 idle CPU cores from qbert_table's measurements (an fp32 training step
# of 16 x 128 tokens ~1.0 s, a QAT step ~0.85 s, one joint Hutchinson probe on one batch ~2.7 s) and this
# file's (one forward of 32 x 128 tokens: fp32 ~0.65 s, W8A8 ~0.33 s, W4A16 g128 ~1.6 s): Taylor scores 4 x 8
# batches ~1 min; float recovery 4 x 120 steps ~7 min; QAT recovery 4 x 120 steps ~6 min; traces of 9 models
# x 12 probes x 1 batch ~4.5 min; 31 evaluations of the 444 test articles ~5 min (the low-bit A16 rows ~20 s
# each); latency, 31 rows x 10 rounds ~4 min: ~28 min, plus ~6 min for the fp32 fine-tuning when it is not
# cached yet. The report's meta records the measured times; the first full run (2026-12-07) took 30 min with
# the fp32 fine-tuning: recovery 6.6 + 6.4 min, traces 4.4, evaluations 3.0, latency 2.1, scores 0.3.
FULL = Settings(table=dataclasses.replace(T.FULL, hessian_batches=1, hessian_probes=12), recovery_steps=120,
                recovery_lr=1e-4, score_batches=8, score_batch_size=16, latency_batch=32, latency_warmup=1,
                latency_repeats=9)
# Smoke: a few articles, one step of everything, every row configured.
SMOKE = Settings(table=T.SMOKE, recovery_steps=1, recovery_lr=1e-4, score_batches=1, score_batch_size=4,
                 latency_batch=32, latency_warmup=1, latency_repeats=2)


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """Remove ``fraction`` of all attention heads (``kind`` "heads") or of all FFN neurons ("ffn")."""

    kind: str
    fraction: float

    @property
    def key(self) -> str:
        return f"{self.kind}{round(100 * self.fraction)}"

    @property
    def label(self) -> str:
        return f"{'heads' if self.kind == HEADS else 'FFN'} {100 * self.fraction:g}%"


PRUNINGS = (PruneSpec(HEADS, 0.25), PruneSpec(HEADS, 0.5), PruneSpec(FFN, 0.25), PruneSpec(FFN, 0.5))
ORDER_PRUNINGS = ("heads50", "ffn50")  # the prunings whose orders (a) / (b) / (c) are compared


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row: ``pruning`` (None: the unpruned model) with Taylor scores of the ``scores`` model, then
    ``recovery`` (none / distill / qat), then ``quant``; ``order`` "a" / "b" / "c" for the order rows."""

    key: str
    label: str
    pruning: PruneSpec | None
    recovery: str
    quant: str
    scores: str = FLOAT_SCORES
    order: str = ""


def row_specs() -> list[RowSpec]:
    rows = [RowSpec("fp32", "fp32", None, NO_RECOVERY, FP32_Q), RowSpec("w8a8", "W8A8", None, NO_RECOVERY, W8A8_PTQ),
            RowSpec("mixed", "Hessian mixed", None, NO_RECOVERY, MIXED_PTQ)]
    suffix = {FP32_Q: ("", ""), W8A8_PTQ: ("-w8a8", " + W8A8"), MIXED_PTQ: ("-mixed", " + Hessian mixed")}
    for p in PRUNINGS:
        for recovery, (rkey, rlabel) in ((NO_RECOVERY, ("", "")), (DISTILL, ("-distill", " + distill"))):
            for quant, (qkey, qlabel) in suffix.items():
                order = "a" if p.key in ORDER_PRUNINGS and recovery == DISTILL and quant == W8A8_PTQ else ""
                rows.append(RowSpec(f"{p.key}{rkey}{qkey}", f"{p.label}{rlabel}{qlabel}", p, recovery, quant,
                                    order=order))
        if p.key in ORDER_PRUNINGS:
            rows.append(RowSpec(f"{p.key}-qat", f"{p.label} + W8A8 QAT", p, QAT, W8A8_QAT, order="b"))
            rows.append(RowSpec(f"{p.key}-qaprune-qat", f"{p.label} (W8A8-aware scores) + W8A8 QAT", p, QAT,
                                W8A8_QAT, scores=W8A8_SCORES, order="c"))
    return rows


@dataclasses.dataclass
class RowResult:
    key: str
    label: str
    pruning: str  # the pruning's label, "none" for the unpruned rows
    recovery: str  # none / distill / qat
    order: str  # "a" / "b" / "c" for the order rows, "" otherwise
    quantization: str  # QUANT_LABELS
    formats: str  # qbert_table.describe_plan, "float32" for float rows
    heads: int  # attention heads kept, all layers
    neurons: int  # FFN neurons kept, all layers
    parameters: int  # weights + biases of the encoder's q / k / v / o / up / down
    megabytes: float
    bits_per_weight: float
    budget_megabytes: float | None  # mixed rows: the size of uniform W4 g128 of the same model
    accuracy: float
    seconds: float  # computing the row (its share of shared steps is counted where they first ran)
    removed: dict[str, list[int]]  # layer index -> removed heads / neurons (original indices)
    plan: dict[str, dict]  # layer name -> LinearFormat.to_dict() (empty for float rows)
    latency_ms: float | None = None  # measured at the end of every run, never cached
    latency_iqr_ms: float | None = None  # interquartile range of the timed calls
    speedup: float | None = None  # fp32 latency / this row's


# ---- helpers --------------------------------------------------------------------------------------

def w8a8_plan(model: nn.Module) -> dict[str, LinearFormat]:
    return {name: W8A8 for name in T.encoder_linears(model)}


def mixed_plan(model: nn.Module, estimates: dict[str, TraceEstimate], progress: bool) -> tuple[dict, float]:
    """HAWQ-V2 allocation of ``MIXED_BITS`` K-group formats under the size of uniform W4 g128 of ``model``,
    Q / K / V tied; returns (plan, budget in MB)."""
    names = T.encoder_linears(model)
    budget_mb = uniform_size(model, T.kgroups(MIXED_BUDGET_BITS), names) / MB
    formats = [T.kgroups(bits) for bits in MIXED_BITS]
    sensitivity = hawq_sensitivity(model, estimates, formats, progress=progress)
    plan = allocate(model, sensitivity, Budget(megabytes=budget_mb), ties=default_ties(model), method="milp")
    return dict(plan.layers), budget_mb


def structure_of(model: nn.Module) -> tuple[int, int, int]:
    """(heads, FFN neurons, encoder q/k/v/o/up/down parameters) of a float model, all layers."""
    views = encoder_layers(model)
    return sum(v.heads for v in views), sum(v.intermediate for v in views), sum(map(layer_parameters, views))


def apply_removal(model: nn.Module, kind: str, removed: dict[str, list[int]]) -> nn.Module:
    """Remove ``removed`` (layer -> original indices) heads or neurons of an unpruned ``model``, in place."""
    request = {int(layer): indices for layer, indices in removed.items()}
    (remove_heads if kind == HEADS else remove_neurons)(model, request)
    return model


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points (cost, accuracy, label) that no other point beats: sorted by cost, each with a higher
    accuracy than every point of lower or equal cost (lower cost and higher accuracy are better)."""
    front, best = [], float("-inf")
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


# ---- the rows -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stage:
    """A model a row's quantization starts from (or, for QAT rows, the finished model) and its pruning."""

    key: str
    model: nn.Module
    removed: dict[str, list[int]]
    structure: tuple[int, int, int]  # structure_of the float model before any quantization


class Runner:
    """Computes rows, sharing scores, pruned models, recovery runs and traces among the rows of one run."""

    def __init__(self, fp32: nn.Module, fp32_key: str, teacher: torch.Tensor, data: tuple[T.Split, T.Split],
                 settings: Settings, cache: Path, progress: bool) -> None:
        self.fp32, self.fp32_key, self.teacher = fp32, fp32_key, teacher
        self.train_data, self.test_data = data
        self.settings, self.cache, self.progress = settings, cache, progress
        self.seconds: dict[str, float] = {}
        self._scores: dict[tuple[str, str], list[torch.Tensor]] = {}
        self._stages: dict[str, Stage] = {}
        self._traces: dict[str, dict[str, TraceEstimate]] = {}
        self._fp32_stage = Stage(fp32_key, fp32, {}, structure_of(fp32))

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    def stage_key(self, row: RowSpec) -> str:
        if row.pruning is None:
            return self.fp32_key
        parts = [SUITE, CACHE_VERSION, "stage", self.fp32_key, repr(row.pruning), TAYLOR, row.scores,
                 self.settings.subset(*SCORE_FIELDS), row.recovery]
        if row.recovery != NO_RECOVERY:
            parts.append(self.settings.subset(*RECOVERY_FIELDS))
        return T.cache_key(*parts)

    def row_key(self, row: RowSpec) -> str:
        parts = [SUITE, CACHE_VERSION, "row", self.stage_key(row), row.quant]
        if row.quant == MIXED_PTQ:
            parts.append(self.settings.table.subset(*T.HESSIAN_FIELDS))
        return T.cache_key(*parts)

    def scores(self, kind: str, on: str) -> list[torch.Tensor]:
        """Taylor importance of every head / neuron (one tensor per layer) of the fp32 model, or of its W8A8
        fake-quantized copy (``on`` W8A8_SCORES: gradients through the straight-through estimator)."""
        if (kind, on) not in self._scores:
            s = self.settings
            batches = T.calibration_batches(self.train_data, s.score_batches, s.score_batch_size, s.table.seed,
                                            labels=True)
            model = self.fp32 if on == FLOAT_SCORES else prepare_qat(copy.deepcopy(self.fp32), w8a8_plan(self.fp32))
            importance = head_importance if kind == HEADS else neuron_importance
            with self.timed("scores"):
                self._scores[(kind, on)] = importance(model, batches, T.classification_loss, method=TAYLOR,
                                                      progress=self.progress)
        return self._scores[(kind, on)]

    def pruned(self, spec: PruneSpec, on: str) -> tuple[nn.Module, dict[str, list[int]]]:
        """A pruned copy of the fp32 model and what was removed (layer -> original indices)."""
        model = copy.deepcopy(self.fp32)
        scores = self.scores(spec.kind, on)
        with self.timed("pruning"):
            if spec.kind == HEADS:
                summary = qbert.prune_heads(model, scores=scores, fraction=spec.fraction, progress=self.progress)
            else:
                summary = qbert.prune_ffn(model, scores=scores, fraction=spec.fraction, multiple_of=FFN_MULTIPLE,
                                          progress=self.progress)
        return model, {str(layer): sorted(indices) for layer, indices in summary.removed.items()}

    def recover(self, model: nn.Module, desc: str) -> nn.Module:
        s = self.settings
        T.train(model, self.train_data, steps=s.recovery_steps, batch_size=s.table.batch_size, lr=s.recovery_lr,
                seed=s.table.seed, desc=desc, teacher_logits=self.teacher, progress=self.progress)
        return model

    def stage(self, row: RowSpec) -> Stage:
        if row.pruning is None:
            return self._fp32_stage
        key = self.stage_key(row)
        if key not in self._stages:
            if row.recovery == DISTILL:
                base = self.stage(dataclasses.replace(row, recovery=NO_RECOVERY))
                with self.timed("float recovery"):
                    model = self.recover(copy.deepcopy(base.model), f"distill {row.pruning.key}")
                self._stages[key] = Stage(key, model, base.removed, base.structure)
            else:
                model, removed = self.pruned(row.pruning, row.scores)
                structure = structure_of(model)
                if row.recovery == QAT:
                    with self.timed("QAT recovery"):
                        student = self.recover(prepare_qat(model, w8a8_plan(model)), f"QAT {row.key}")
                    model = convert(student)
                    fuse(model)
                self._stages[key] = Stage(key, model, removed, structure)
        return self._stages[key]

    def traces(self, stage: Stage) -> dict[str, TraceEstimate]:
        if stage.key not in self._traces:
            with self.timed("traces"):
                self._traces[stage.key], _ = T.traces(stage.model, self.settings.table, self.train_data, stage.key,
                                                      self.cache, self.progress)
        return self._traces[stage.key]

    def run_row(self, row: RowSpec) -> RowResult:
        start = time.perf_counter()
        stage = self.stage(row)
        names = T.encoder_linears(self.fp32)  # pruning keeps every layer's name
        budget_mb, described = None, stage.model  # the float model whose weight counts describe the plan
        if row.quant in (FP32_Q, W8A8_QAT):
            model, plan = stage.model, ({} if row.quant == FP32_Q else w8a8_plan(self.fp32))
            described = self.fp32 if row.quant == W8A8_QAT else described  # uniform: every share is 100%
        else:
            if row.quant == W8A8_PTQ:
                plan = w8a8_plan(stage.model)
            else:
                estimates = self.traces(stage)
                with self.timed("allocation"):
                    plan, budget_mb = mixed_plan(stage.model, estimates, self.progress)
            with self.timed("quantize"):
                model = qbert.quantize(copy.deepcopy(stage.model), plan)
        mb, bits = T.size_of(model, names)
        with self.timed("evaluation"):
            acc = T.accuracy(model, self.test_data, self.settings.table.eval_batch_size, f"eval {row.key}",
                             self.progress)
        heads, neurons, parameters = stage.structure
        return RowResult(row.key, row.label, row.pruning.label if row.pruning else "none", row.recovery, row.order,
                         QUANT_LABELS[row.quant], T.describe_plan(described, plan) if plan else "float32", heads,
                         neurons, parameters, mb, bits, budget_mb, acc, time.perf_counter() - start, stage.removed,
                         {name: fmt.to_dict() for name, fmt in plan.items()})


# ---- latency --------------------------------------------------------------------------------------

def rebuild(fp32: nn.Module, row: RowSpec, result: RowResult) -> nn.Module:
    """The row's structure and formats from the fp32 weights: its heads / neurons removed, its plan applied.
    Its exact weight bytes must equal the row's (same shapes, same formats)."""
    model = copy.deepcopy(fp32)
    if row.pruning is not None:
        apply_removal(model, row.pruning.kind, result.removed)
    if result.plan:
        qbert.quantize(model, {name: LinearFormat.from_dict(fmt) for name, fmt in result.plan.items()})
    megabytes, _ = T.size_of(model, T.encoder_linears(fp32))
    if megabytes != result.megabytes:
        raise RuntimeError(f"{SUITE}: the rebuilt {row.key} has {megabytes} MB of encoder weights, the row "
                           f"{result.megabytes} MB: structure or formats differ")
    return model.eval()


@torch.inference_mode()
def measure_latency(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], warmup: int, repeats: int,
                    progress: bool) -> dict[str, list[float]]:
    """Seconds of each call of ``model(**batch)`` per model: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds, each round one sample of every model, the first model of a round rotating by one each round
    (``qbert.timing.round_robin_samples``)."""
    return round_robin_samples({key: functools.partial(model, **batch) for key, model in models.items()},
                               warmup, repeats, progress, desc="latency rounds")


def attach_latency(results: list[RowResult], samples: dict[str, list[float]]) -> None:
    for r in results:
        q1, _, q3 = statistics.quantiles(samples[r.key], n=QUARTILES)
        r.latency_ms = statistics.median(samples[r.key]) * MS_PER_S
        r.latency_iqr_ms = (q3 - q1) * MS_PER_S
    fp32 = next(r for r in results if r.key == "fp32")
    for r in results:
        r.speedup = fp32.latency_ms / r.latency_ms


# ---- reports --------------------------------------------------------------------------------------

def composition(by_key: dict[str, RowResult]) -> list[str]:
    """Per pruning (and recovery) and quantization: the accuracy drop of both against the sum of the separate
    drops, and the speedup of both against each alone and their product."""
    fp, lines = by_key.get("fp32"), []
    if fp is None:
        return lines
    for p in PRUNINGS:
        for rkey in ("", "-distill"):
            alone = by_key.get(p.key + rkey)
            for qkey in ("w8a8", "mixed"):
                quant, both = by_key.get(qkey), by_key.get(f"{p.key}{rkey}-{qkey}")
                if alone is None or quant is None or both is None:
                    continue
                d_p, d_q, d_both = (fp.accuracy - r.accuracy for r in (alone, quant, both))
                lines.append(f"{both.label}: accuracy drop {d_both:.2f} points vs the sum of the separate drops "
                             f"{d_p + d_q:.2f} ({alone.label} {d_p:.2f}, {quant.label} {d_q:.2f}; "
                             f"{d_both - d_p - d_q:+.2f} beyond the sum)")
                if None not in (alone.speedup, quant.speedup, both.speedup):
                    product = alone.speedup * quant.speedup
                    lines.append(f"{both.label}: {both.speedup:.2f}x fp32 ({both.latency_ms:.0f} ms) vs "
                                 f"{alone.label} alone {alone.speedup:.2f}x and {quant.label} alone "
                                 f"{quant.speedup:.2f}x; product {product:.2f}x, measured / product "
                                 f"{both.speedup / product:.2f}")
    return lines


def recovery_gains(by_key: dict[str, RowResult]) -> list[str]:
    lines = []
    for p in PRUNINGS:
        for qkey in ("", "-w8a8", "-mixed"):
            none, distilled = by_key.get(p.key + qkey), by_key.get(f"{p.key}-distill{qkey}")
            if none is not None and distilled is not None:
                lines.append(f"{none.label}: distillation recovery {none.accuracy:.2f} -> {distilled.accuracy:.2f} "
                             f"({distilled.accuracy - none.accuracy:+.2f} points)")
    return lines


def removed_overlap(a: RowResult, b: RowResult) -> tuple[int, int]:
    """(how many of ``a``'s removed heads / neurons ``b`` removes too, how many ``a`` removes)."""
    same = sum(len(set(indices) & set(b.removed.get(layer, ()))) for layer, indices in a.removed.items())
    return same, sum(map(len, a.removed.values()))


def order_checks(by_key: dict[str, RowResult]) -> list[str]:
    lines = []
    for key in ORDER_PRUNINGS:
        rows = {"a": by_key.get(f"{key}-distill-w8a8"), "b": by_key.get(f"{key}-qat"),
                "c": by_key.get(f"{key}-qaprune-qat")}
        present = {order: r for order, r in rows.items() if r is not None}
        if len(present) < 2:
            continue
        best = max(r.accuracy for r in present.values())
        winners = [f"({order})" for order, r in present.items() if r.accuracy == best]
        label = next(iter(present.values())).pruning
        lines.append(f"{label}, order: " + ", ".join(f"({order}) {r.accuracy:.2f}" for order, r in present.items())
                     + f" -> best {' = '.join(winners)} at {best:.2f}"
                     + (" (tie)" if len(winners) > 1 else ""))
        if rows["b"] is not None and rows["c"] is not None:
            same, total = removed_overlap(rows["b"], rows["c"])
            unit = "heads" if key.startswith(HEADS) else "neurons"
            lines.append(f"{label}: the W8A8-aware scores of (c) remove {same} of the {total} {unit} that the "
                         "float scores remove")
    return lines


def front_lines(results: list[RowResult]) -> list[str]:
    lines = []
    for attr, unit, what in (("latency_ms", "ms", "latency"), ("megabytes", "MB", "size")):
        points = [(getattr(r, attr), r.accuracy, r.label) for r in results if getattr(r, attr) is not None]
        if points:
            lines.append(f"Pareto front, accuracy vs {what}: "
                         + "; ".join(f"{label} ({acc:.2f}, {x:.3g} {unit})" for x, acc, label in pareto_front(points)))
    return lines


def statements(results: list[RowResult]) -> list[str]:
    by_key = {r.key: r for r in results}
    return composition(by_key) + recovery_gains(by_key) + order_checks(by_key) + front_lines(results)


def recovery_text(r: RowResult, steps: int) -> str:
    text = {NO_RECOVERY: "—", DISTILL: f"distill ({steps} steps)", QAT: f"W8A8 QAT distill ({steps} steps)"}
    return text[r.recovery] + (f"; {ORDER_LABELS[r.order]}" if r.order else "")


def _opt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(results: list[RowResult], meta: dict[str, Any]) -> str:
    s, t = meta["settings"], meta["settings"]["table"]
    lines = [
        (f"**{SUITE}** — all-MiniLM-L6-v2 on BBC News ({meta['train_articles']} train / {meta['test_articles']} "
         f"test articles, {t['max_length']} tokens), {meta['device']}, {meta['threads']} threads, torch "
         f"{meta['torch']}, transformers {meta['transformers']}, commit {meta['git_commit'][:12]}, {meta['date']}"),
        "",
        ("Accuracy in % on the test split; MB = exact bytes of the 36 encoder Linear weights (codes + scales + "
         "zeros; 10^6 bytes). Pruning: Taylor head / neuron importance from "
         f"{s['score_batches']} x {s['score_batch_size']} labelled training articles; FFN neurons kept per layer "
         f"a multiple of {FFN_MULTIPLE}. Recovery: {s['recovery_steps']} steps distilled from the fp32 logits "
         f"from the pruned weights (float, or W8A8 QAT then converted). Hessian mixed: HAWQ-V2 over "
         f"W{'/'.join(map(str, MIXED_BITS))}A16 g{T.K_GROUP} at the size of uniform W{MIXED_BUDGET_BITS} g{T.K_GROUP} "
         f"of the same model, traces from {t['hessian_probes']} probes x {t['hessian_batches']} batch(es) of "
         f"{t['hessian_batch_size']}. Latency: one batch of {meta['latency_batch_shape'][0]} test articles "
         f"({meta['latency_batch_shape'][1]} tokens), median of {s['latency_repeats']} calls after "
         f"{s['latency_warmup']} warm-up round(s), every row in the same run, round-robin; "
         f"load average {meta['load_average_start'][0]:.2f} at the start, {meta['load_average_end'][0]:.2f} "
         "at the end of the run."),
        "",
        "| row | recovery / order | formats | heads | FFN neurons | MB | accuracy | latency ms | × fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.label} | {recovery_text(r, s['recovery_steps'])} | {r.formats} | {r.heads} | {r.neurons} | "
                     f"{r.megabytes:.3f} | {r.accuracy:.2f} | {_opt(r.latency_ms, '.1f')} | {_opt(r.speedup, '.2f')} |")
    lines += ["", "Statements:", ""] + [f"- {line}" for line in statements(results)]
    return "\n".join(lines) + "\n"


MARKERS = {"fp32": "o", "W8A8 PTQ": "s", "Hessian mixed PTQ": "^", "W8A8 QAT": "D"}
FRONT_FONT_SIZE = 6


def plot(results: list[RowResult], path: Path) -> Path | None:
    """Accuracy vs latency and vs MB: colour = pruning, marker = quantization, filled = recovered; the Pareto
    front joined and labelled; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'qbert[bench]'): no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    prunings = ["none"] + [p.label for p in PRUNINGS]
    colors = dict(zip(prunings, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, attr, xlabel in ((axes[0], "latency_ms", "CPU latency of one batch (ms)"),
                             (axes[1], "megabytes", None)):
        rows = [r for r in results if getattr(r, attr) is not None]
        for r in rows:
            color = colors[r.pruning]
            ax.scatter([getattr(r, attr)], [r.accuracy], marker=MARKERS[r.quantization], edgecolors=color,
                       facecolors=color if r.recovery != NO_RECOVERY else "none", zorder=3)
        front = pareto_front([(getattr(r, attr), r.accuracy, r.label) for r in rows])
        ax.plot([x for x, _, _ in front], [y for _, y, _ in front], color="black", linewidth=0.8, zorder=2)
        for x, y, label in front:
            ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=FRONT_FONT_SIZE)
        if attr == "megabytes":
            T.megabytes_axis(ax)
        else:
            ax.set_xlabel(xlabel)
        ax.set_ylabel("BBC News test accuracy (%)")
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], linestyle="", marker="o", color=colors[p], label=p) for p in prunings]
    handles += [Line2D([], [], linestyle="", marker=m, color="gray", markerfacecolor="none", label=q)
                for q, m in MARKERS.items()]
    handles += [Line2D([], [], linestyle="", marker="o", color="gray", label="filled: recovered"),
                Line2D([], [], color="black", linewidth=0.8, label="Pareto front")]
    axes[1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("all-MiniLM-L6-v2 on BBC News: structured pruning x quantization")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(results: list[RowResult], meta: dict[str, Any], out_dir: Path) -> tuple[dict[str, Path], str]:
    return T.write_report(results, meta, out_dir, ("statements", statements(results)), markdown(results, meta), plot)


def as_harness_results(results: list[RowResult]) -> list[H.Result]:
    """The rows as ``_harness.Result`` records (``BenchOutput``): latency in ``time_us``, the rest in metrics."""
    return [H.Result(case={"row": r.key}, impl=r.label, baseline=r.key == "fp32",
                     time_us=None if r.latency_ms is None else r.latency_ms * US_PER_S / MS_PER_S,
                     speedup={} if r.speedup is None else {"fp32": r.speedup},
                     metrics={"accuracy": r.accuracy, "megabytes": r.megabytes, "bits_per_weight": r.bits_per_weight,
                              "heads": r.heads, "neurons": r.neurons})
            for r in results]


# ---- driver ---------------------------------------------------------------------------------------

def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        cache: Path | None = None, rows: list[str] | None = None, progress: bool = True) -> H.BenchOutput:
    settings = SMOKE if smoke else FULL
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    specs = T.select_rows(SUITE, row_specs(), rows)
    set_threads(threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    train_data, test_data, classes = T.load_data(settings.table, T.load_tokenizer())
    fp32, teacher, fp32_record = T.fp32_model(settings.table, train_data, len(classes), cache, progress)
    runner = Runner(fp32, fp32_record["key"], teacher, (train_data, test_data), settings, cache, progress)
    results = []
    for spec in tqdm(specs, desc=SUITE, unit="row", disable=not progress):
        path = cache / f"{SUITE}-row-{runner.row_key(spec)}.json"
        if path.exists():
            results.append(RowResult(**json.loads(path.read_text())))
            continue
        result = runner.run_row(spec)
        path.write_text(json.dumps(dataclasses.asdict(result), indent=2))
        results.append(result)
    seconds = runner.seconds
    del runner  # the shared intermediate models: the latency models are rebuilt
    latency_start = time.perf_counter()
    models = {spec.key: rebuild(fp32, spec, result) for spec, result in zip(specs, results)}
    batch = test_data.batch(torch.arange(min(settings.latency_batch, len(test_data))))
    samples = measure_latency(models, batch, settings.latency_warmup, settings.latency_repeats, progress)
    attach_latency(results, samples)
    seconds["latency"] = time.perf_counter() - latency_start
    meta = T.environment(SUITE, threads, smoke, settings, (train_data, test_data), classes, fp32_training=fp32_record,
                         seconds=seconds, wall_seconds=time.perf_counter() - started,
                         latency_batch_shape=list(batch["input_ids"].shape), cpu_count=os.cpu_count(),
                         load_average_start=load_start, load_average_end=os.getloadavg())
    paths, text = write(results, meta, out_dir)
    return H.BenchOutput(as_harness_results(results), meta, paths, text)


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__, smoke_help="a few articles, one step of everything (seconds)")
    parser.add_argument("--cache", type=writable_dir, default=None, help=f"cache dir (default {DEFAULT_CACHE})")
    parser.add_argument("--rows", type=H.choice_list([s.key for s in row_specs()], "row"), default=None,
                        help="comma-separated row keys to run (fp32 always runs); default all: "
                             + ",".join(s.key for s in row_specs()))
    args = parser.parse_args(argv)
    return run(args.smoke, args.out, args.threads, args.cache, args.rows).print()


if __name__ == "__main__":
    main()
