"""The `qbert` command.

    qbert info                                   versions, build, CUDA device, op x backend table
    qbert demo [--threads N] [--repeats R]       quantize all-MiniLM-L6-v2 to W8A8: size, speed, fidelity
    qbert bench [SUITE|all] [--smoke] [--out DIR] [--threads N]   suites: qbert.benchmarks.SUITES
    qbert allocate --model DIR --data FILE --budget 3bits|40MB --method trace|eigen --out plan.json
                                                 Hessian-guided format per layer: a plan + a plot
    qbert quantize --model DIR --plan plan.json --out DIR   apply a plan, write DIR/model.safetensors
    qbert embed --model PATH --input FILE --out DIR   embed a corpus with Ray Data actors (the ray extra)

A command that cannot do what it was asked (an option out of range, an unwritable output, CUDA missing,
bad calibration data, an infeasible budget, a plan that does not fit the model) prints one line,
``qbert <command>: error: <what and why>``, on stderr and exits with status ``USAGE_EXIT``; option values
are checked while parsing, before any long work. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

PACKAGES = ("torch", "triton", "transformers")
USAGE_EXIT = 2  # argparse's status for a bad command line, used for every error qbert reports in one line
DEVICE_TYPES = ("cpu", "cuda")


class UsageError(Exception):
    """A command cannot run as asked; the message names the option or input and the constraint."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports an error as one line, ``<prog>: error: <message>``, without the usage block
    (``--help`` still prints it). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text: str) -> str:
    """``text`` with its line breaks folded into spaces (error messages are printed as one line)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# ---- argument types shared by every command line (qbert and the benchmark scripts) ----------------
# Each returns the parsed value or raises argparse.ArgumentTypeError with the constraint; argparse
# prefixes the option's name: "argument --threads: must be an integer >= 1, got 0".

def int_in_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer option that must be >= ``minimum`` (and <= ``maximum`` when given)."""
    constraint = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {constraint}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be an integer {constraint}, got {value}")
        return value

    return parse


positive_int = int_in_range(1)


def finite_float(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False,
                 open_high: bool = False) -> Callable[[str], float]:
    """A float option that must be finite and within [low, high] (``open_low`` / ``open_high`` exclude
    the end points)."""
    bounded = math.isfinite(low) or math.isfinite(high)
    interval = f" in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}" if bounded else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number{interval}, got {text!r}") from None
        too_low = value < low or (open_low and value == low)
        too_high = value > high or (open_high and value == high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be a finite number{interval}, got {text!r}")
        return value

    return parse


def _check_writable_dir(directory: Path, target: str) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {target}: directory {directory} is not writable")


def writable_file(text: str) -> Path:
    """A file to write: its directory exists and is writable, and the path is not a directory."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file to write")
    if not path.parent.is_dir():
        why = "is not a directory" if path.parent.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {text}: {path.parent} {why}")
    _check_writable_dir(path.parent, text)
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the file is read-only")
    return path


def writable_dir(text: str) -> Path:
    """A directory to write into, created if missing: its nearest existing ancestor (or itself) is a
    writable directory."""
    path = Path(text)
    existing = next(p for p in (path, *path.parents) if p.exists())  # a relative path ends at "."
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create directory {text}: {existing} is not a directory")
    _check_writable_dir(existing, text)
    return path


def _existing(exists: Callable[[Path], bool], what: str) -> Callable[[str], Path]:
    """An argument type for a path to read that ``exists`` accepts; the error names ``what`` it must be."""
    def parse(text: str) -> Path:
        path = Path(text)
        if not exists(path):
            raise argparse.ArgumentTypeError(f"{text}: no such {what}")
        return path

    return parse


existing_file = _existing(Path.is_file, "file")
existing_dir = _existing(Path.is_dir, "directory")
existing_path = _existing(Path.exists, "file or directory")


def device(text: str):
    """``cpu`` or ``cuda[:N]``, a device this process can use -> ``torch.device``."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected cpu, cuda or cuda:N") from None
    if dev.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: qbert runs on cpu or cuda[:N], not {dev.type}")
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available: this torch ({torch.__version__}) "
                                             f"is built without CUDA")
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available: no CUDA device is visible "
                                             f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s), numbered from 0")
    return dev


def _version(name: str) -> str:
    # importlib.metadata, never an import: `qbert info` must not import Triton.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def backend_cell(op_name: str, backend: str) -> list[str]:
    """Why ``backend`` cannot run op ``op_name`` in this process at all (empty: it can, input permitting)."""
    import torch

    from qbert import _ext
    from qbert.ops._registry import OPS, backend_unavailable

    if backend not in OPS[op_name].rows:
        return ["no implementation"]
    reasons = backend_unavailable(backend)
    if reasons:
        return reasons
    # The C++ rows call torch.ops.qbert.<kernel>, registered when qbert._C is loaded.
    if OPS[op_name].rows[backend].kernels:
        _ext.module()
    missing = [k for k in OPS[op_name].rows[backend].kernels if not hasattr(torch.ops.qbert, k)]
    return [f"torch.ops.qbert.{k} is not registered by this build of qbert._C" for k in missing]


def op_table() -> str:
    """The op x backend table: "yes", or a note number whose reasons are listed under the table."""
    from qbert.ops._registry import BACKENDS, OPS

    notes: dict[str, int] = {}
    lines = ["| op | " + " | ".join(BACKENDS) + " |", "|---|" + "---|" * len(BACKENDS)]
    for name in sorted(OPS):
        cells = []
        for backend in BACKENDS:
            reasons = backend_cell(name, backend)
            if not reasons:
                cells.append("yes")
                continue
            text = "; ".join(reasons)
            cells.append(f"no [{notes.setdefault(text, len(notes) + 1)}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join(lines)


def info_text() -> str:
    import torch

    import qbert
    from qbert import _ext

    lines = [f"qbert {qbert.__version__}", f"python {platform.python_version()}"]
    lines += [f"{name} {_version(name)}" for name in PACKAGES]
    error = _ext.load_error()
    if error:
        lines.append(f"extension qbert._C: not loaded: {error[0]}")
    else:
        build = ", ".join(f"{k}={v}" for k, v in _ext.build_info().items())
        lines.append(f"extension qbert._C: {build}")
        if hasattr(_ext.module(), "cpu_isa"):
            lines.append(f"cpu isa: {_ext.module().cpu_isa()}")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"cuda device: {torch.cuda.get_device_name()} (sm_{major}{minor}), CUDA {torch.version.cuda}")
    else:
        lines.append("cuda device: none (the cuda and triton backends run on CUDA tensors; triton also on CPU "
                     "under TRITON_INTERPRET=1, for tests)")
    lines += ["", op_table()]
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from qbert.benchmarks import SUITES, suite_module

    for suite in SUITES if args.suite == "all" else (args.suite,):
        output = suite_module(suite).run(args.smoke, args.out, args.threads)
        print(output.markdown)
        print("written: " + ", ".join(str(p) for p in output.paths.values()) + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from qbert import demo

    print(demo.format_report(demo.run_demo(args.threads, args.repeats)))
    return 0


def _info(args: argparse.Namespace) -> int:
    print(info_text())
    return 0


def _allocate(args: argparse.Namespace) -> int:
    from qbert.allocate import command as allocate_command

    return allocate_command.run_allocate(args)


COMMANDS = {"info": _info, "demo": _demo, "bench": _bench, "allocate": _allocate,
            # imported when used: qbert.quantize_command and qbert.embed_command import this module (and
            # embed imports Ray only when it runs)
            "quantize": lambda args: importlib.import_module("qbert.quantize_command").run(args),
            "embed": lambda args: importlib.import_module("qbert.embed_command").run(args)}


def build_parser() -> ArgumentParser:
    from qbert import demo
    from qbert.allocate import command as allocate_command
    from qbert.benchmarks import SUITES
    from qbert.benchmarks import _harness as H

    parser = ArgumentParser(prog="qbert", description="qbert: int8 kernels for BERT-family encoders")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, build, devices and the op x backend table")
    demo.add_arguments(commands.add_parser("demo", help="quantize all-MiniLM-L6-v2 and compare with fp32"))
    bench = commands.add_parser("bench", help="run benchmarks and print their tables")
    bench.add_argument("suite", nargs="?", choices=(*SUITES, "all"), default="all")
    H.add_arguments(bench)
    allocate_command.add_allocate_arguments(
        commands.add_parser("allocate", help="choose a format per layer from Hessian sensitivities (a plan)"))
    importlib.import_module("qbert.quantize_command").add_parser(commands)
    importlib.import_module("qbert.embed_command").add_parser(commands)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions a command raises for what the user asked (printed as one line, exit USAGE_EXIT)."""
    from qbert.allocate import command as allocate_command

    return (UsageError, *allocate_command.ERRORS, *importlib.import_module("qbert.quantize_command").ERRORS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except user_errors() as exc:
        print(f"qbert {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
