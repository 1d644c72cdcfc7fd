"""The ``qbert allocate`` command (argument parsing, report, the plot), and the calibration batch options
that ``qbert quantize`` (``qbert.quantize_command``) shares with it."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from qbert.allocate.allocator import METHODS, RANK_METHODS, allocate
from qbert.allocate.budget import Budget, parse_budget
from qbert.allocate.calibration import MIN_MAX_LENGTH, CalibrationError, calibration, input_batches
from qbert.allocate.layers import default_ties, quantizable_modules
from qbert.allocate.solvers import AllocationError
from qbert.cli import (
    UsageError,
    device,
    existing_dir,
    existing_file,
    finite_float,
    int_in_range,
    positive_int,
    writable_file,
)
from qbert.nn.gptq import GPTQ, Rounding
from qbert.nn.gptq import METHODS as ROUNDINGS
from qbert.nn.plan import Plan
from qbert.quant.gptq import GPTQError

DEFAULT_FORMATS = "w2a16,w3a16,w4a16,w8a16"
SENSITIVITY_METHODS = ("trace", "eigen")
# Power iteration stops when ||H v - lambda v|| <= rel_tol * |lambda|: a tolerance of 1 or more would accept
# an estimate off by as much as the eigenvalue itself.
REL_TOL = finite_float(0.0, 1.0, open_low=True, open_high=True)
SEED = int_in_range(0, 2**64 - 1)  # torch.Generator.manual_seed takes a 64-bit seed
MAX_LENGTH = int_in_range(MIN_MAX_LENGTH)
DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, DEFAULT_MAX_BATCHES = 8, 128, 4
_SCALAR_LABEL = {"trace": "Tr(H) / n (Hutchinson)", "eigen": "Q-BERT Omega = |mean lambda| + std lambda"}

ALLOCATE_HELP = f"""\
Choose a format per linear layer from Hessian sensitivities and write a qbert plan (JSON) plus a plot.

--model: a save_pretrained directory of a transformers *ForSequenceClassification or *ForMaskedLM model
  with its tokenizer. --data: calibration examples, a .jsonl file ({{"text": ..., "text_pair"?: ...,
  "label"?: int}} per line) or plain text, one example per line. Loss: the task's cross-entropy with the
  labels (classification) or the MLM loss with 15% of the real tokens masked, seeded (masked LM).
  Examples are truncated to --max-length tokens; the first --max-batches batches of --batch-size are used.
--method trace: HAWQ-V2, Omega_i(b) = Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2, traces by Hutchinson (--probes).
  --method eigen: Q-BERT, Omega_i = |mean lambda| + std lambda of the top eigenvalue over --subsets
  consecutive subsets of the batches (power iteration), Omega_i(b) = Omega_i * ||Q_b(W_i) - W_i||^2.
--budget: 3bits / 2.5bits (average bits per weight of the allocated layers, scales and zero points
  included) or 40MB (10^6 bytes of their weights). --solver milp (HiGHS) or dp minimise sum Omega under
  the budget; rank / reverse (Q-BERT's rule and its ablation: the more / less sensitive half of the
  layers gets the higher of exactly two --formats) take no budget.
--formats: candidate modes (default {DEFAULT_FORMATS}: 2/3/4-bit asymmetric K-groups of 128, int8
  per channel); --group-size, --row-groups (Q-BERT row groups), --symmetric override them all.
--rounding nearest (default) rates every format by its round-to-nearest error, as above. --rounding gptq
  plans for GPTQ rounding (qbert.quant.gptq): each Omega_i(b) is scaled by r_i(b) = e_i(GPTQ) / e_i(nearest),
  e_i the layer-output error tr(dW Hx_i dW^T)/2 under the input Hessian Hx_i = 2 X^T X / T of the layer's
  inputs X on the calibration examples (float model, labels and MLM masks left out), so a format that GPTQ
  rounds well costs less (r = 1 where nearest's error is 0). The plan names GPTQ for every allocated layer;
  qbert quantize then needs --data (the same file and batch options give the same inputs). rank / reverse
  rank by the scalar sensitivity, which rounding does not change: with them only the plan's rounding differs.
Allocated layers: those qbert.quantize swaps by default (task heads stay float); Q, K and V of each
attention block share a format unless --no-ties. The plot (--plot, default OUT with .png) shows the
sensitivity per layer, coloured by the chosen format.
"""


def budget_arg(text: str) -> Budget:
    """The --budget argument type: ``parse_budget``'s error as argparse's."""
    try:
        return parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_allocate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ALLOCATE_HELP
    parser.add_argument("--model", required=True, type=existing_dir, help="save_pretrained model directory")
    parser.add_argument("--data", required=True, type=existing_file, help="calibration examples (.jsonl or text)")
    parser.add_argument("--budget", type=budget_arg, help="3bits, 2.5bits or 40MB (not with --solver rank/reverse)")
    parser.add_argument("--method", choices=SENSITIVITY_METHODS, default="trace", help="sensitivity (default trace)")
    parser.add_argument("--out", required=True, type=writable_file, help="the plan file to write (JSON)")
    parser.add_argument("--solver", choices=METHODS, default="milp", help="allocation method (default milp)")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"candidate modes (default {DEFAULT_FORMATS})")
    parser.add_argument("--group-size", type=int, help="K values per range for every format (-1: per channel)")
    parser.add_argument("--row-groups", type=int, help="Q-BERT row groups for every format")
    parser.add_argument("--symmetric", action="store_true", help="symmetric codes for every format")
    parser.add_argument("--rounding", choices=ROUNDINGS, default="nearest",
                        help="the rounding the plan is made for and names (default nearest)")
    add_batch_arguments(parser, DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, DEFAULT_MAX_BATCHES)
    parser.add_argument("--probes", type=positive_int, default=32, help="trace: Hutchinson probes (default 32)")
    parser.add_argument("--joint", action="store_true",
                        help="trace: one probe and one double backward for all layers at once (faster, noisier)")
    parser.add_argument("--subsets", type=positive_int, default=2, help="eigen: data subsets (default 2)")
    parser.add_argument("--max-iter", type=positive_int, default=100,
                        help="eigen: power iterations at most (default 100)")
    parser.add_argument("--rel-tol", type=REL_TOL, default=1e-3,
                        help="eigen: relative residual to stop, in (0, 1) (default 1e-3)")
    parser.add_argument("--seed", type=SEED, default=0, help="probes, start vectors and MLM masks (default 0)")
    parser.add_argument("--no-ties", action="store_true", help="let Q, K and V take different formats")
    plot = parser.add_mutually_exclusive_group()
    plot.add_argument("--plot", type=writable_file, help="plot file (default: --out with .png)")
    plot.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the Hessian products run (default cuda when available, else cpu)")


def add_batch_arguments(parser: argparse.ArgumentParser, batch_size: int | None, max_length: int | None,
                        max_batches: int | None) -> None:
    """--batch-size, --max-length, --max-batches with these defaults (quantize's None: not given; the
    defaults shown then apply with --data)."""
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"examples per batch (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--max-length", type=MAX_LENGTH, default=max_length,
                        help=f"tokens per example at most, >= {MIN_MAX_LENGTH} (default {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--max-batches", type=positive_int, default=max_batches,
                        help=f"calibration batches (default {DEFAULT_MAX_BATCHES})")


def _formats(args: argparse.Namespace) -> list:
    from qbert.nn.formats import linear_format

    names = [name.strip() for name in args.formats.split(",") if name.strip()]
    if not names:
        raise UsageError("--formats is empty")
    try:  # linear_format's ValueErrors are about these options: an unknown mode, a bad override
        return [linear_format(name, group_size=args.group_size, row_groups=args.row_groups,
                              symmetric=True if args.symmetric else None) for name in names]
    except ValueError as exc:
        raise UsageError(f"--formats {args.formats} (with --group-size / --row-groups / --symmetric): {exc}") from exc


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """An input that cannot be read (OSError: missing weights, a permission) is the user's to fix."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"cannot read {what}: {exc}") from exc


def _sensitivity(args, model, names, batches, loss_fn, formats, inputs) -> tuple[dict, dict, dict]:
    """(per-format Omega, scalar per layer, extra meta) for --method; ``inputs``: the GPTQ calibration
    batches (model inputs) with --rounding gptq, else None."""
    from qbert import hessian

    rounding = {"rounding": args.rounding, "calibration": inputs}
    if args.method == "trace":
        traces = hessian.hutchinson_traces(model, names, batches, loss_fn, probes=args.probes, joint=args.joint,
                                           seed=args.seed)
        weights = hessian.module_weights(model, names)
        scalar = {n: t.mean / weights[n].numel() for n, t in traces.items()}
        extra = {"traces": {n: {"mean": t.mean, "stderr": t.stderr, "probes": t.probes} for n, t in traces.items()}}
        return hessian.hawq_sensitivity(model, traces, formats, **rounding), scalar, extra
    if not 1 <= args.subsets <= len(batches):
        raise AllocationError(f"--subsets {args.subsets} needs between 1 and the {len(batches)} calibration batches")
    per = len(batches) // args.subsets
    subsets = [batches[i * per:(i + 1) * per] for i in range(args.subsets)]
    omega = hessian.qbert_sensitivity(model, names, subsets, loss_fn, max_iter=args.max_iter, rel_tol=args.rel_tol,
                                      seed=args.seed)
    return hessian.eigen_sensitivity(model, omega, formats, **rounding), omega, {"subsets": args.subsets}


def plot_allocation(plan: Plan, scalar: dict[str, float], label: str, path: str | os.PathLike) -> None:
    """Bars of the scalar sensitivity per layer (symlog scale), coloured by the chosen format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan.layers)
    prefix = os.path.commonprefix(names).rpartition(".")[0]
    formats = sorted({f.describe(): f.weight_bits for f in plan.layers.values()}.items(), key=lambda kv: kv[1])
    colours = {name: plt.cm.viridis(i / max(len(formats) - 1, 1)) for i, (name, _) in enumerate(formats)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(names)), 4.5))
    ax.bar(range(len(names)), [scalar[n] for n in names],
           color=[colours[plan.layers[n].describe()] for n in names])
    ax.set_yscale("symlog", linthresh=min((abs(v) for v in scalar.values() if v), default=1.0))
    ax.set_xticks(range(len(names)), [n[len(prefix) + 1:] if prefix else n for n in names], rotation=90,
                  fontsize="x-small")
    ax.set_ylabel(label)
    meta = plan.meta
    ax.set_title(f"{meta['method']}: {meta['bits_per_weight']:.3g} bits/weight, {meta['megabytes']:.4g} MB "
                 f"(budget {meta['budget']})", fontsize="small")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[name]) for name, _ in formats],
              labels=[name for name, _ in formats], fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(plan: Plan, scalar: dict[str, float]) -> str:
    width = max(len(n) for n in plan.layers)
    lines = [f"{'layer':<{width}}  {'sensitivity':>12}  format"]
    lines += [f"{n:<{width}}  {scalar[n]:>12.4g}  {fmt.describe()}" for n, fmt in plan.layers.items()]
    meta = plan.meta
    lines.append(f"{meta['method']}: {meta['bytes']} bytes = {meta['megabytes']:.6g} MB = "
                 f"{meta['bits_per_weight']:.4f} bits/weight over {meta['weights']} weights"
                 + (f" (budget {meta['budget']}, {meta['budget_bytes']} bytes)" if meta["budget"] else "")
                 + f"; objective {meta['objective']:.6g}")
    return "\n".join(lines)


def run_allocate(args: argparse.Namespace) -> int:
    budget = args.budget
    if budget is None and args.solver not in RANK_METHODS:
        raise UsageError(f"--solver {args.solver} needs --budget (e.g. 3bits or 40MB)")
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the plot needs matplotlib (pip install 'qbert[bench]'); or pass --no-plot")
    formats = _formats(args)
    with reading(f"--model {args.model} / --data {args.data}"):
        model, batches, loss_fn = calibration(args.model, args.data, batch_size=args.batch_size,
                                              max_length=args.max_length, max_batches=args.max_batches,
                                              seed=args.seed)
        # GPTQ's inputs: the same examples and batches without labels or MLM masks, as qbert quantize --data
        # makes them from the same options.
        inputs = (input_batches(args.model, args.data, batch_size=args.batch_size, max_length=args.max_length,
                                max_batches=args.max_batches) if args.rounding == GPTQ else None)
    model.to(args.device)
    names = quantizable_modules(model)
    ties = [] if args.no_ties else [t for t in default_ties(model) if all(n in names for n in t)]
    if budget is not None:  # a budget below the smallest achievable size fails here, before the Hessian work
        allocate(model, {n: dict.fromkeys(formats, 0.0) for n in names}, budget, ties=ties, method=args.solver)
    sensitivity, scalar, extra = _sensitivity(args, model, names, batches, loss_fn, formats, inputs)
    plan = allocate(model, sensitivity, budget, ties=ties, method=args.solver,
                    scores=scalar if args.solver in RANK_METHODS else None)
    rounding = dict.fromkeys(plan.layers, Rounding(GPTQ)) if args.rounding == GPTQ else {}
    plan = Plan(plan.layers, {**plan.meta, "sensitivity_method": args.method, "rounding": args.rounding,
                              "scalar_sensitivity": scalar, **extra,
                              "model": os.fspath(args.model), "data": os.fspath(args.data),
                              "calibration": {"batches": len(batches), "batch_size": args.batch_size,
                                              "max_length": args.max_length, "seed": args.seed}},
                rounding=rounding)
    plan.save(args.out)
    print(_report(plan, scalar))
    print(f"plan: {args.out}")
    if not args.no_plot:
        plot_path = args.plot or str(Path(args.out).with_suffix(".png"))
        plot_allocation(plan, scalar, _SCALAR_LABEL[args.method], plot_path)
        print(f"plot: {plot_path}")
    return 0


# What the command raises for the user's inputs, reported by qbert.cli.main as one line and exit status 2
# (besides qbert.cli.UsageError): a model or data file that cannot be used, an infeasible budget, calibration
# inputs that GPTQ cannot round a layer with.
ERRORS = (CalibrationError, AllocationError, GPTQError)
