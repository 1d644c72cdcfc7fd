"""The `qbert` command.

    qbert info                                   versions, build, CUDA device, op x backend table
    qbert demo [--threads N] [--repeats R]       quantize all-MiniLM-L6-v2 to W8A8: size, speed, fidelity
    qbert bench [SUITE|all] [--smoke] [--out DIR] [--threads N]   suites: qbert.benchmarks.SUITES
    qbert allocate --model DIR --data FILE --budget 3bits|40MB --method trace|eigen --out plan.json
                                                 Hessian-guided format per layer: a plan + a plot
    qbert quantize --model DIR --plan plan.json --out DIR   apply a plan, write DIR/model.safetensors
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

PACKAGES = ("torch", "triton", "transformers")


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

    try:
        report = demo.run_demo(args.threads, args.repeats)
    except demo.DemoError as exc:
        print(f"qbert demo: {exc}", file=sys.stderr)
        return 1
    print(demo.format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qbert import demo
    from qbert.allocate import command as allocate_command
    from qbert.benchmarks import SUITES
    from qbert.benchmarks import _harness as H

    parser = argparse.ArgumentParser(prog="qbert", description="qbert: int8 kernels for BERT-family encoders")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, build, devices and the op x backend table")
    demo.add_arguments(commands.add_parser("demo", help="quantize all-MiniLM-L6-v2 and compare with fp32"))
    bench = commands.add_parser("bench", help="run benchmarks and print their tables")
    bench.add_argument("suite", nargs="?", choices=(*SUITES, "all"), default="all")
    bench.add_argument("--smoke", action="store_true", help="tiny cases, few repeats (seconds)")
    bench.add_argument("--out", default=None,
                       help=f"output dir (default {H.DEFAULT_RESULTS_DIR}; ./{H.SMOKE_RESULTS_DIR} with --smoke)")
    bench.add_argument("--threads", type=int, default=H.DEFAULT_THREADS, help="torch threads (CPU timings)")
    allocate_command.add_allocate_arguments(
        commands.add_parser("allocate", help="choose a format per layer from Hessian sensitivities (a plan)"))
    allocate_command.add_quantize_arguments(
        commands.add_parser("quantize", help="apply a plan to a model and save it quantized"))
    return parser


def _allocate_or_quantize(args: argparse.Namespace) -> int:
    from qbert.allocate import command as allocate_command

    run = allocate_command.run_allocate if args.command == "allocate" else allocate_command.run_quantize
    try:
        return run(args)
    except allocate_command.ERRORS as exc:
        print(f"qbert {args.command}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        print(info_text())
        return 0
    if args.command == "demo":
        return _demo(args)
    if args.command in ("allocate", "quantize"):
        return _allocate_or_quantize(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
