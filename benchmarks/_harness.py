"""Shared benchmark harness: environment records, validation, result records and report writers.

Timing is the library's (``qbert.timing``: perf_counter batches on the CPU, CUDA events over rotated
input copies on a GPU), and so is the torch.ao baseline (``qbert.baselines``); every suite pins its thread
count with ``qbert.timing.set_threads`` and records it.

Every qbert backend is validated against the reference once before it is timed (exact for integer
outputs, close for float). A case a backend cannot run is recorded with its reason, never dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import importlib.metadata
import json
import platform
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from qbert.cli import ArgumentParser, positive_int, writable_dir
from qbert.ops._registry import BACKENDS, OPS

DEFAULT_THREADS = 2
METRIC_DIGITS = 6  # cosines near 1 need them: 0.999987
TERA = 1e12
# Float outputs of a backend must match the reference's to this error, relative to the largest
# reference magnitude (same math in float32, only the summation / multiplication order differs).
FLOAT_REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Exceptions that mean "this implementation cannot run this case" (a backend refusing the inputs, a
# baseline such as torch._int_mm refusing a shape); anything else is a bug and propagates.
BACKEND_FAILURES = (RuntimeError, NotImplementedError)
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_RESULTS_DIR = Path("bench_out")  # relative to the working directory; git-ignored in the repo

STATUS_OK = "ok"
STATUS_UNSUPPORTED = "unsupported"
STATUS_FAILED = "failed"  # ran, but disagreed with the reference
SMOKE_HELP = "tiny cases, few repeats (seconds)"


# ---- environment ----------------------------------------------------------------------------------

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


_SLUG_NOISE = re.compile(r"\(r\)|\(tm\)|\bnvidia\b|\bprocessor\b|\bcpu\b|\d+-core|@.*$")
_SLUG_WORDS = 3


def device_slug(device: torch.device) -> str:
    """A short file-name tag for the device: ``h100``, ``cpu-amd-epyc-7b13``."""
    words = re.sub(r"[^a-z0-9]+", " ", _SLUG_NOISE.sub(" ", device_name(device).lower())).split()
    if device.type == "cuda":
        return words[0] if words else "cuda"
    return "-".join(["cpu", *words[:_SLUG_WORDS]])


def package_version(name: str) -> str:
    """Installed version of ``name`` from its metadata (never imports it: triton stays unimported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """HEAD of the repository holding this file (``-dirty`` if it has local changes), else "unknown"."""
    cwd = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def environment(device: torch.device, threads: int, suite: str, **extra: Any) -> dict[str, Any]:
    """The metadata every results file carries."""
    from qbert import __version__, _ext

    meta = {
        "suite": suite,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "threads": threads,
        "git_commit": git_commit(),
        "qbert": __version__,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
    }
    if not _ext.load_error() and hasattr(_ext.module(), "cpu_isa"):
        meta["cpu_isa"] = _ext.module().cpu_isa()
    meta.update(extra)
    return meta


# ---- validation -----------------------------------------------------------------------------------

def mismatch(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Empty if ``out`` matches ``ref`` (exactly for integer dtypes, within FLOAT_REL_TOL for float),
    else what differs."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"got {out.dtype}{list(out.shape)}, the reference gives {ref.dtype}{list(ref.shape)}"
    if not ref.dtype.is_floating_point:
        wrong = int((out != ref).sum())
        return f"{wrong} of {ref.numel()} integer outputs differ from the reference" if wrong else ""
    err = (out.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), torch.finfo(torch.float32).tiny)
    tol = FLOAT_REL_TOL[ref.dtype]
    return f"max |error| / max |ref| = {err / scale:.2e} exceeds {tol:.0e}" if err > tol * scale else ""


# ---- results --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """One row: a case (shape columns), an implementation, and how it did.

    ``speedup`` maps each baseline measured in the same run on the same case to
    ``baseline_time / this_time`` (> 1: this row is faster).
    """

    case: dict[str, Any]
    impl: str
    backend: str = ""
    baseline: bool = False
    dtype: str = ""
    time_us: float | None = None
    throughput: float | None = None  # in the suite's throughput unit (TOP/s, TFLOP/s)
    speedup: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    status: str = STATUS_OK
    reason: str = ""

    def case_key(self) -> tuple:
        return tuple(self.case.items())


@dataclasses.dataclass
class BenchOutput:
    """What a suite's ``run`` returns: its rows, the run's metadata, the files written, the markdown table."""

    results: list[Result]
    meta: dict[str, Any]
    paths: dict[str, Path]
    markdown: str

    def print(self) -> BenchOutput:
        """Print the table and the files written (a suite's ``main`` ends with this); returns self."""
        print(self.markdown)
        print("written: " + ", ".join(str(p) for p in self.paths.values()))
        return self


def _items(text: str, parse: Callable[[str], Any]) -> list:
    """The comma-separated values of a command-line list, each through ``parse``; empty items and empty
    lists are errors (an empty sweep would time nothing)."""
    items = text.split(",")
    if not all(item.strip() for item in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
    values = []
    for item in items:
        try:
            values.append(parse(item.strip()))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} in {text!r}: {exc}") from None
    return values


def list_of(parse: Callable[[str], Any]) -> Callable[[str], tuple]:
    """The type of a command-line list of numbers: ``"1,16,128"`` -> ``(1, 16, 128)``, each item through
    ``parse`` (an argparse type such as ``positive_int`` or ``finite_float(...)``)."""

    def parse_list(text: str) -> tuple:
        return tuple(_items(text, parse))

    return parse_list


int_list = list_of(positive_int)  # sizes: each >= 1


def choice_list(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """The type of a command-line list of names: ``"cuda,triton"`` -> ``["cuda", "triton"]``, each one of
    ``choices`` (``what`` names them in the error: "unknown backend; known: ...")."""
    known = ", ".join(choices) or "none"

    def one(name: str) -> str:
        if name not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what}; known: {known}")
        return name

    def parse_list(text: str) -> list[str]:
        return _items(text, one)

    return parse_list


backend_list = choice_list(BACKENDS, "backend")  # each a backend of qbert's registry


def op_backend_list(op_name: str) -> Callable[[str], list[str]]:
    """The --backends type of a suite that times one op: each a backend that op registers."""
    return choice_list(tuple(OPS[op_name].rows), f"{op_name} backend")


def add_arguments(parser: argparse.ArgumentParser, smoke_help: str = SMOKE_HELP) -> None:
    """The options every suite's command line (and ``qbert bench``) has: --smoke, --out, --threads. The
    output directory is checked while parsing, before any timing."""
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=writable_dir, default=None,
                        help=f"output dir (default {DEFAULT_RESULTS_DIR}; ./{SMOKE_RESULTS_DIR} with --smoke)")
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                        help=f"torch threads (CPU timings; default {DEFAULT_THREADS})")


def suite_parser(module_file: str, doc: str, smoke_help: str = SMOKE_HELP) -> ArgumentParser:
    """The command line of a suite run directly (``python -m qbert.benchmarks.<module>``, from the module's
    ``__file__`` and ``__doc__``), with the shared options (``add_arguments``). It is ``qbert.cli``'s
    parser: a bad option is one line, ``python -m qbert.benchmarks.<module>: error: ...``, exit
    ``USAGE_EXIT``."""
    parser = ArgumentParser(prog=f"python -m {__package__}.{Path(module_file).stem}",
                            description=doc.split("\n\n")[0])
    add_arguments(parser, smoke_help)
    return parser


def add_gemm_arguments(parser: argparse.ArgumentParser, backends_default: str) -> None:
    """The GEMM suites' sweep options: --m (token counts) and --backends (``backends_default`` says
    which run without it)."""
    parser.add_argument("--m", type=int_list, default=None, help="comma-separated token counts M")
    parser.add_argument("--backends", type=backend_list, default=None,
                        help=f"qbert backends to time (default: {backends_default})")


def attach_speedups(results: list[Result]) -> None:
    """Fill ``speedup`` of every timed row against every timed baseline of the same case."""
    baselines: dict[tuple, list[Result]] = {}
    for r in results:
        if r.baseline and r.time_us:
            baselines.setdefault(r.case_key(), []).append(r)
    for r in results:
        if r.time_us:
            r.speedup = {b.impl: b.time_us / r.time_us for b in baselines.get(r.case_key(), []) if b is not r}


def baseline_names(results: Sequence[Result]) -> list[str]:
    return list(dict.fromkeys(r.impl for r in results if r.baseline))


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def markdown_table(results: Sequence[Result], meta: dict[str, Any], time_unit: str = "us",
                   throughput_unit: str = "") -> str:
    """A markdown table with the run's metadata as a header line; unsupported rows keep their reason."""
    scale = {"us": 1.0, "ms": 1e-3}[time_unit]
    case_cols = list(dict.fromkeys(k for r in results for k in r.case))
    metric_cols = list(dict.fromkeys(k for r in results for k in r.metrics))
    bases = baseline_names(results)
    header = [*case_cols, "impl", "dtype", "µs" if time_unit == "us" else "ms"]
    header += [throughput_unit] if throughput_unit else []
    header += [f"× {b}" for b in bases] + metric_cols + ["status"]
    lines = [
        f"**{meta['suite']}** — {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"triton {meta['triton']}, transformers {meta['transformers']}, commit {meta['git_commit'][:12]}, "
        f"{meta['date']}" + (f", cpu isa {meta['cpu_isa']}" if "cpu_isa" in meta else ""),
        "",
        "× X = time of baseline X / time of the row (> 1: faster than X).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in results:
        time_val = r.time_us * scale if r.time_us is not None else None
        row = [str(r.case.get(c, "")) for c in case_cols]
        row += [r.impl + (" (baseline)" if r.baseline else ""), r.dtype, _fmt(time_val)]
        row += [_fmt(r.throughput)] if throughput_unit else []
        row += [_fmt(r.speedup.get(b)) for b in bases]
        row += [_fmt(r.metrics.get(m), METRIC_DIGITS) for m in metric_cols]
        row += [r.status if r.status == STATUS_OK else f"{r.status}: {r.reason}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def report_stem(meta: dict[str, Any], device: torch.device) -> str:
    """``YYYY-MM-DD-<device>-<suite>`` (DESIGN §6)."""
    return f"{meta['date'][:10]}-{device_slug(device)}-{meta['suite']}"


def write_reports(results: Sequence[Result], meta: dict[str, Any], out_dir: Path, device: torch.device,
                  time_unit: str = "us", throughput_unit: str = "") -> dict[str, Path]:
    """Write ``<stem>.json``, ``.csv`` and ``.md`` under ``out_dir``; return their paths by suffix."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / report_stem(meta, device)
    paths = {suffix: stem.with_suffix(f".{suffix}") for suffix in ("json", "csv", "md")}
    meta = {**meta, "time_unit": "us", "throughput_unit": throughput_unit}
    rows = [dataclasses.asdict(r) for r in results]
    paths["json"].write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")

    bases = baseline_names(results)
    case_cols = list(dict.fromkeys(k for r in results for k in r.case))
    metric_cols = list(dict.fromkeys(k for r in results for k in r.metrics))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"# {k}={v}" for k, v in meta.items()])
        writer.writerow([*case_cols, "impl", "backend", "baseline", "dtype", "time_us", "throughput",
                         *(f"speedup_vs_{b}" for b in bases), *metric_cols, "status", "reason"])
        for r in results:
            writer.writerow([*(r.case.get(c, "") for c in case_cols), r.impl, r.backend, r.baseline, r.dtype,
                             r.time_us, r.throughput, *(r.speedup.get(b, "") for b in bases),
                             *(r.metrics.get(m, "") for m in metric_cols), r.status, r.reason])
    paths["md"].write_text(markdown_table(results, meta, time_unit, throughput_unit))
    return paths
