"""The ``qbert quantize`` command: apply a plan (``qbert allocate``) to a model and save it quantized.

    qbert quantize --model DIR --plan plan.json --out DIR [--data FILE [--batch-size N] [--max-length L]
                   [--max-batches B]]

Loads the save_pretrained model, applies the plan with ``qbert.quantize`` (GPTQ layers calibrated on
``--data``, batched as ``qbert allocate`` batches it: the batch options and their defaults are
``qbert.allocate.command``'s), writes ``qbert.save_quantized`` output to ``OUT/model.safetensors`` and
prints the size table (``qbert.nn.linear_bytes``).
"""

from __future__ import annotations

import argparse
import os
import sys

from qbert.allocate.budget import BITS_PER_BYTE, MB
from qbert.allocate.calibration import CalibrationError, input_batches, load_model
from qbert.allocate.command import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCHES,
    DEFAULT_MAX_LENGTH,
    add_batch_arguments,
    reading,
)
from qbert.cli import UsageError, existing_dir, existing_file, writable_dir
from qbert.nn.gptq import GPTQ
from qbert.nn.plan import Plan, PlanError
from qbert.quant.gptq import GPTQError

QUANTIZED_FILE = "model.safetensors"
BATCH_OPTIONS = ("batch_size", "max_length", "max_batches")

QUANTIZE_HELP = f"""\
Apply a plan (qbert allocate) to a save_pretrained model and write qbert.save_quantized output to
OUT/{QUANTIZED_FILE}; prints the size table.

A plan that names GPTQ rounding (qbert allocate --rounding gptq) needs calibration inputs: --data, a .jsonl
or text file as for qbert allocate (labels are not needed, and ignored), tokenized by the model's tokenizer
into the first --max-batches batches of --batch-size examples of at most --max-length tokens (defaults
{DEFAULT_MAX_BATCHES}, {DEFAULT_BATCH_SIZE}, {DEFAULT_MAX_LENGTH}). A plan without GPTQ takes no --data.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``quantize`` to ``qbert``'s subcommands; returns its parser."""
    parser = subparsers.add_parser("quantize", help="apply a plan to a model and save it quantized",
                                   description=QUANTIZE_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=existing_dir, help="save_pretrained model directory")
    parser.add_argument("--plan", required=True, type=existing_file, help="plan file (JSON)")
    parser.add_argument("--out", required=True, type=writable_dir, help=f"output directory (gets {QUANTIZED_FILE})")
    parser.add_argument("--data", type=existing_file,
                        help="GPTQ calibration examples (.jsonl or text); needed by a plan naming GPTQ rounding")
    add_batch_arguments(parser, None, None, None)
    return parser


def size_table(model) -> str:
    """The ``qbert.nn.linear_bytes`` table: layer, format, weights, bytes, bits per weight, and totals."""
    from qbert.nn.size import linear_bytes

    rows = linear_bytes(model)
    width = max(len(r.names[0]) for r in rows)
    lines = [f"{'layer':<{width}}  {'format':<16}  {'weights':>9}  {'bytes':>10}  bits/weight"]
    lines += [f"{r.names[0]:<{width}}  {r.format:<16}  {r.weights:>9}  {r.total:>10}  {r.bits_per_weight:.3f}"
              for r in rows]
    weights, total = sum(r.weights for r in rows), sum(r.total for r in rows)
    lines.append(f"{'total':<{width}}  {'':<16}  {weights:>9}  {total:>10}  {BITS_PER_BYTE * total / weights:.3f}"
                 f"  ({total / MB:.6g} MB)")
    return "\n".join(lines)


def _calibration_inputs(args: argparse.Namespace, plan: Plan) -> list[dict] | None:
    """GPTQ's calibration batches from --data when the plan names GPTQ rounding, else None; --data without
    GPTQ, or GPTQ without --data, is a usage error."""
    gptq_layers = [name for name, rounding in plan.rounding.items() if rounding.method == GPTQ]
    given = [f"--{option.replace('_', '-')}" for option in BATCH_OPTIONS if getattr(args, option) is not None]
    if gptq_layers and args.data is None:
        more = f" and {len(gptq_layers) - 1} more layers" if len(gptq_layers) > 1 else ""
        raise UsageError(f"--plan {args.plan} names GPTQ rounding for {gptq_layers[0]}{more}; GPTQ needs "
                         f"calibration inputs: pass --data FILE (.jsonl or text, e.g. the examples the plan was "
                         f"allocated on)")
    if not gptq_layers and args.data is not None:
        raise UsageError(f"--data is only used by GPTQ rounding, and --plan {args.plan} names none (every layer "
                         f"rounds to nearest); leave --data out")
    if args.data is None and given:
        raise UsageError(f"{', '.join(given)} shape the --data batches; without --data nothing uses them")
    if args.data is None:
        return None
    with reading(f"--model {args.model} / --data {args.data}"):
        return input_batches(args.model, args.data,
                             batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
                             max_length=DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length,
                             max_batches=DEFAULT_MAX_BATCHES if args.max_batches is None else args.max_batches)


def run(args: argparse.Namespace) -> int:
    import qbert

    with reading(f"--plan {args.plan}"):
        plan = Plan.load(args.plan)
    calibration_inputs = _calibration_inputs(args, plan)
    with reading(f"--model {args.model}"):
        model = load_model(args.model)
    try:  # quantize's ValueErrors with a plan: it names a layer the model lacks, or splits a shared one
        # GPTQ's progress bar only on a terminal: elsewhere an error stays the one line on stderr.
        qbert.quantize(model, plan, calibration=calibration_inputs, progress=sys.stderr.isatty())
    except GPTQError:
        raise  # the layer's inputs cannot calibrate it (ERRORS): the message names the layer and the remedy
    except ValueError as exc:
        raise UsageError(f"--plan {args.plan} does not fit --model {args.model}: {exc}") from exc
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, QUANTIZED_FILE)
    qbert.save_quantized(model, path)
    print(size_table(model))
    print(f"written: {path}")
    return 0


# What the command raises for the user's inputs, reported by qbert.cli.main as one line and exit status 2
# (besides qbert.cli.UsageError): a bad plan, a model or data file that cannot be used, calibration inputs
# that GPTQ cannot round a layer with.
ERRORS = (PlanError, CalibrationError, GPTQError)
