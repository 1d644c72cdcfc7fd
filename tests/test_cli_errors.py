"""Every user error of the `qbert` command is one line on stderr, `qbert <command>: error: ...`, naming the
option and its constraint, with exit status 2 and no traceback; option values are checked while parsing.
The benchmark scripts run directly (`python -m qbert.benchmarks.<module>`) answer the same way."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from qbert.benchmarks import SUITES, bench_block_sparse

from qbert import cli, demo
from qbert.allocate.calibration import MIN_MAX_LENGTH


def exit_status(argv: list[str]) -> int:
    """``cli.main(argv)``'s exit status: errors found while parsing exit, later ones are returned."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def assert_user_error(argv: list[str], capsys, match: str) -> None:
    """``qbert argv`` exits with USAGE_EXIT after one stderr line ``qbert <command>: error: ...`` matching
    ``match``."""
    status = exit_status(argv)
    err = capsys.readouterr().err
    assert status == cli.USAGE_EXIT, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qbert {argv[0]}: error: ") and re.search(match, lines[0]), lines[0]


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Paths that pass the input checks (a directory, a file) and a file that blocks a path below it."""
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    return {"model": model, "data": data, "file": data, "out": tmp_path / "plan.json", "tmp": tmp_path}


def _allocate(p: dict[str, Path], *extra: str) -> list[str]:
    return ["allocate", "--model", str(p["model"]), "--data", str(p["data"]), "--out", str(p["out"]), *extra]


def _quantize(p: dict[str, Path], *extra: str) -> list[str]:
    out = p.get("quantized", p["tmp"] / "q")
    return ["quantize", "--model", str(p["model"]), "--plan", str(p["data"]), "--out", str(out), *extra]


AT_LEAST_1 = r"must be an integer >= 1, got"
AT_LEAST_MIN_LENGTH = rf"must be an integer >= {MIN_MAX_LENGTH}, got"
REL_TOL = r"argument --rel-tol: must be a finite number in \(0, 1\)"
BAD_BUDGET = r"argument --budget: bad budget"

# (argv builder, extra arguments, what the line must say)
PARSE_ERRORS = {
    "demo-threads-0": (lambda p: ["demo"], ["--threads", "0"], rf"argument --threads: {AT_LEAST_1} 0$"),
    "demo-threads-negative": (lambda p: ["demo"], ["--threads", "-2"], rf"argument --threads: {AT_LEAST_1} -2$"),
    "demo-threads-word": (lambda p: ["demo"], ["--threads", "two"], rf"argument --threads: {AT_LEAST_1} 'two'"),
    "demo-repeats-0": (lambda p: ["demo"], ["--repeats", "0"], rf"argument --repeats: {AT_LEAST_1} 0$"),
    "demo-repeats-negative": (lambda p: ["demo"], ["--repeats", "-1"], rf"argument --repeats: {AT_LEAST_1} -1$"),
    "bench-threads-0": (lambda p: ["bench", "int8_linear"], ["--threads", "0"], rf"argument --threads: {AT_LEAST_1}"),
    "bench-threads-negative": (lambda p: ["bench"], ["--threads", "-4"], rf"argument --threads: {AT_LEAST_1} -4"),
    "bench-out-below-a-file": (lambda p: ["bench", "--out", str(p["file"] / "results")], [],
                               r"argument --out: cannot create directory .* is not a directory"),
    "batch-size-0": (_allocate, ["--batch-size", "0"], rf"argument --batch-size: {AT_LEAST_1} 0"),
    "max-length-0": (_allocate, ["--max-length", "0"], rf"argument --max-length: {AT_LEAST_MIN_LENGTH} 0$"),
    "max-length-below-minimum": (_allocate, ["--max-length", str(MIN_MAX_LENGTH - 1)],
                                 rf"argument --max-length: {AT_LEAST_MIN_LENGTH} {MIN_MAX_LENGTH - 1}$"),
    "max-batches-negative": (_allocate, ["--max-batches", "-1"], rf"argument --max-batches: {AT_LEAST_1} -1"),
    "probes-0": (_allocate, ["--probes", "0"], rf"argument --probes: {AT_LEAST_1} 0"),
    "subsets-0": (_allocate, ["--subsets", "0"], rf"argument --subsets: {AT_LEAST_1} 0"),
    "max-iter-0": (_allocate, ["--max-iter", "0"], rf"argument --max-iter: {AT_LEAST_1} 0"),
    "seed-negative": (_allocate, ["--seed=-1"], r"argument --seed: must be an integer in \[0, 18446744073709551615\]"),
    "seed-past-64-bits": (_allocate, ["--seed", str(2**64)], r"argument --seed: must be an integer in \[0, "),
    "rel-tol-nan": (_allocate, ["--rel-tol", "nan"], REL_TOL),
    "rel-tol-inf": (_allocate, ["--rel-tol", "inf"], REL_TOL),
    "rel-tol-minus-inf": (_allocate, ["--rel-tol=-inf"], REL_TOL),
    "rel-tol-negative": (_allocate, ["--rel-tol=-1e-3"], REL_TOL),
    "rel-tol-0": (_allocate, ["--rel-tol", "0"], REL_TOL),
    "rel-tol-1": (_allocate, ["--rel-tol", "1"], REL_TOL),
    "rel-tol-word": (_allocate, ["--rel-tol", "tight"], REL_TOL),
    "device-nonsense": (_allocate, ["--device", "nonsense"], r"argument --device: 'nonsense' is not a device"),
    "device-meta": (_allocate, ["--device", "meta"], r"argument --device: 'meta': qbert runs on cpu or cuda"),
    "budget-grammar": (_allocate, ["--budget", "3 bytes"], BAD_BUDGET),
    "budget-nan": (_allocate, ["--budget", "nanbits"], BAD_BUDGET),
    "budget-inf": (_allocate, ["--budget", "infMB"], BAD_BUDGET),
    "budget-0": (_allocate, ["--budget", "0bits"], BAD_BUDGET),
    "out-in-missing-dir": (lambda p: _allocate({**p, "out": p["tmp"] / "missing" / "plan.json"}), [],
                           r"argument --out: cannot write .*plan.json: .*missing does not exist"),
    "out-below-a-file": (lambda p: _allocate({**p, "out": p["file"] / "plan.json"}), [],
                         r"argument --out: cannot write .*: .*data.jsonl is not a directory"),
    "out-is-a-dir": (lambda p: _allocate({**p, "out": p["tmp"]}), [], r"argument --out: .* is a directory"),
    "plot-in-missing-dir": (_allocate, ["--plot", "/nonexistent-qbert-dir/plot.png"],
                            r"argument --plot: cannot write .*: /nonexistent-qbert-dir does not exist"),
    "plot-and-no-plot": (_allocate, ["--plot", "p.png", "--no-plot"],
                         r"argument --no-plot: not allowed with argument --plot"),
    "model-missing": (lambda p: _allocate({**p, "model": p["tmp"] / "nope"}), [],
                      r"argument --model: .*nope: no such directory"),
    "data-missing": (lambda p: _allocate({**p, "data": p["tmp"] / "nope.jsonl"}), [],
                     r"argument --data: .*nope.jsonl: no such file"),
    "quantize-plan-missing": (lambda p: _quantize({**p, "data": p["tmp"] / "nope.json"}), [],
                              r"argument --plan: .*nope.json: no such file"),
    "quantize-model-missing": (lambda p: _quantize({**p, "model": p["tmp"] / "nope"}), [],
                               r"argument --model: .*nope: no such directory"),
    "quantize-out-is-a-file": (lambda p: _quantize({**p, "quantized": p["file"]}), [],
                               r"argument --out: cannot create directory .*data.jsonl is not a directory"),
    "quantize-out-below-a-file": (lambda p: _quantize({**p, "quantized": p["file"] / "q"}), [],
                                  r"argument --out: cannot create directory .*data.jsonl is not a directory"),
}


@pytest.mark.parametrize("case", list(PARSE_ERRORS))
def test_bad_option_values_are_one_line_and_exit_2(case, inputs, capsys):
    build, extra, match = PARSE_ERRORS[case]
    assert_user_error([*build(inputs), *extra], capsys, match)


# Checked after parsing, before any model is loaded (the model directory here has no model at all).
RUN_ERRORS = {
    "formats-empty": (["--budget", "3bits", "--formats", ","], r"--formats is empty"),
    "formats-unknown": (["--budget", "3bits", "--formats", "w5a16"], r"--formats w5a16 .*unknown quantization mode"),
    "group-size-48": (["--budget", "3bits", "--group-size", "48"], r"--formats .*group_size"),
    "row-groups-0": (["--budget", "3bits", "--row-groups", "0"], r"--formats .*row_groups must be a positive int"),
    "int8-override": (["--budget", "3bits", "--formats", "w8a8", "--group-size", "128"], r"--formats w8a8 .*takes no group_size"),
    "no-budget": ([], r"--solver milp needs --budget"),
}


@pytest.mark.parametrize("case", list(RUN_ERRORS))
def test_bad_option_combinations_are_one_line_and_exit_2(case, inputs, capsys):
    extra, match = RUN_ERRORS[case]
    assert_user_error(_allocate(inputs, "--no-plot", *extra), capsys, match)


def test_a_plot_without_matplotlib_is_one_line(inputs, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else real_find_spec(name, *a))
    assert_user_error(_allocate(inputs, "--budget", "3bits"), capsys, r"the plot needs matplotlib .* --no-plot")


def test_a_multi_line_message_is_printed_as_one_line(monkeypatch, capsys):
    def refuse(threads, repeats):
        raise cli.UsageError("first part\n  second part\n")

    monkeypatch.setattr(demo, "run_demo", refuse)
    assert_user_error(["demo"], capsys, r"error: first part second part$")


@pytest.mark.parametrize("target", ["allocate-out", "allocate-plot", "quantize-out", "bench-out"])
def test_a_read_only_directory_is_refused_before_any_work(target, inputs, monkeypatch, capsys):
    read_only = inputs["tmp"] / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    # os.access is what the check asks; root would be let through a 0o555 directory, so say what a user hears.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != read_only and real_access(path, mode, **kw))
    argv = {"allocate-out": _allocate({**inputs, "out": read_only / "plan.json"}),
            "allocate-plot": _allocate(inputs, "--plot", str(read_only / "plot.png")),
            "quantize-out": _quantize(inputs, "--out", str(read_only / "q")),
            "bench-out": ["bench", "--out", str(read_only)]}[target]
    assert_user_error(argv, capsys, r"cannot write .*: directory .*read-only is not writable")


def test_a_read_only_file_is_refused(inputs, monkeypatch, capsys):
    plan = inputs["tmp"] / "old-plan.json"
    plan.write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != plan and real_access(path, mode, **kw))
    assert_user_error(_allocate({**inputs, "out": plan}), capsys, r"argument --out: cannot write .*: the file is read-only")


@pytest.mark.parametrize("built_with", [None, "12.8"], ids=["cpu-build", "cuda-build-no-device"])
def test_device_cuda_without_cuda_is_one_line(built_with, inputs, monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", built_with)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_user_error(_allocate(inputs, "--device", "cuda"), capsys, r"argument --device: 'cuda': CUDA is not available")


def test_device_index_past_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'cuda:1': this machine has 1 CUDA device"):
        cli.device("cuda:1")


def test_argument_types_return_what_they_accept(tmp_path):
    assert cli.positive_int("3") == 3 and cli.int_in_range(0, 5)("0") == 0 and cli.int_in_range(0, 5)("5") == 5
    assert cli.finite_float(0.0, 1.0, open_low=True, open_high=True)("1e-3") == 1e-3
    assert cli.finite_float()("-2.5") == -2.5
    assert cli.device("cpu") == torch.device("cpu")
    assert cli.writable_file(str(tmp_path / "plan.json")) == tmp_path / "plan.json"
    assert cli.writable_dir(str(tmp_path / "new" / "nested")) == tmp_path / "new" / "nested"  # created later
    assert cli.existing_dir(str(tmp_path)) == tmp_path
    (tmp_path / "data.jsonl").write_text("{}\n")
    assert cli.existing_file(str(tmp_path / "data.jsonl")) == tmp_path / "data.jsonl"


# ---- the benchmark scripts' own command lines ------------------------------------------------------
# Every script run directly: the suites of `qbert bench` and the Q-BERT table.
SCRIPTS = (*SUITES.values(), "qbert_table")
DENSITY = r"argument --density: .* must be a finite number in \(0, 1\]"
SHARED_SCRIPT_ERRORS = {
    "threads-0": (["--threads", "0"], rf"argument --threads: {AT_LEAST_1} 0$"),
    "threads-negative": (["--threads", "-3"], rf"argument --threads: {AT_LEAST_1} -3$"),
    "threads-word": (["--threads", "two"], rf"argument --threads: {AT_LEAST_1} 'two'$"),
    "out-below-a-file": (["--out", "/dev/null/results"], r"argument --out: cannot create directory .*/dev/null"),
}
# (script, extra arguments, what the line must say)
SCRIPT_ERRORS = {
    "int8_linear-m-0": ("bench_int8_linear", ["--m", "0"], r"argument --m: '0' in '0': must be an integer >= 1"),
    "int8_linear-m-empty-item": ("bench_int8_linear", ["--m", "16,,32"],
                                 r"argument --m: expected a comma-separated list without empty items"),
    "int8_linear-backends-unknown": ("bench_int8_linear", ["--backends", "cpu,gpu"],
                                     r"argument --backends: 'gpu' in 'cpu,gpu': unknown backend; known: cuda"),
    "int8_linear-ao-engine-unknown": ("bench_int8_linear", ["--ao-engines", "qnnpack9"],
                                      r"argument --ao-engines: 'qnnpack9' in 'qnnpack9': unknown torch.ao engine"),
    "int8_gemm-m-negative": ("bench_int8_gemm", ["--m=-16"], r"argument --m: '-16' in '-16': must be an integer"),
    "int8_gemm-backends-unknown": ("bench_int8_gemm", ["--backends", "gpu"], r"argument --backends: 'gpu' in 'gpu'"),
    "lowbit_linear-m-word": ("bench_lowbit_linear", ["--m", "many"], r"argument --m: 'many' in 'many'"),
    "lowbit_linear-backends-empty": ("bench_lowbit_linear", ["--backends", ","], r"argument --backends: expected a"),
    "block_sparse-density-0": ("bench_block_sparse", ["--density", "0"], DENSITY),
    "block_sparse-density-above-1": ("bench_block_sparse", ["--density", "1,1.5"], DENSITY),
    "block_sparse-density-negative": ("bench_block_sparse", ["--density=-0.25"], DENSITY),
    "block_sparse-density-nan": ("bench_block_sparse", ["--density", "nan"], DENSITY),
    "block_sparse-density-inf": ("bench_block_sparse", ["--density", "inf"], DENSITY),
    "block_sparse-density-word": ("bench_block_sparse", ["--density", "half"], DENSITY),
    "block_sparse-density-empty-item": ("bench_block_sparse", ["--density", "0.5,,1"],
                                        r"argument --density: expected"),
    "block_sparse-backends-unregistered": (
        "bench_block_sparse", ["--backends", "cpu"],
        r"argument --backends: 'cpu' in 'cpu': unknown block_sparse_attention backend; known: reference, triton$"),
    "block_sparse-backends-unknown": ("bench_block_sparse", ["--backends", "gpu"], r"argument --backends: 'gpu'"),
    "block_sparse-seq-0": ("bench_block_sparse", ["--seq", "0"], rf"argument --seq: '0' in '0': {AT_LEAST_1} 0"),
    "block_sparse-batch-0": ("bench_block_sparse", ["--batch", "0"], rf"argument --batch: '0' in '0': {AT_LEAST_1}"),
    "qbert_table-rows-unknown": ("qbert_table", ["--rows", "w8a8,w9"],
                                 r"argument --rows: 'w9' in 'w8a8,w9': unknown row; known: fp32, w8a8, "),
    "qbert_table-rows-empty-item": ("qbert_table", ["--rows", "w8a8,"],
                                    r"argument --rows: expected a comma-separated list"),
    "qbert_table-cache-below-a-file": ("qbert_table", ["--cache", "/dev/null/cache"],
                                       r"argument --cache: cannot create directory .*/dev/null"),
}


def assert_script_error(script: str, argv: list[str], capsys, monkeypatch, match: str) -> None:
    """``python -m qbert.benchmarks.<script> argv`` exits with USAGE_EXIT after one stderr line
    ``python -m qbert.benchmarks.<script>: error: ...`` matching ``match``, before it runs anything."""
    module = importlib.import_module(f"qbert.benchmarks.{script}")
    monkeypatch.setattr(module, "run", lambda *args, **kwargs: pytest.fail(f"{script} accepted {argv}"))
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == cli.USAGE_EXIT, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m qbert.benchmarks.{script}: error: "), lines[0]
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(SHARED_SCRIPT_ERRORS))
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_checks_the_shared_options(script, case, capsys, monkeypatch):
    extra, match = SHARED_SCRIPT_ERRORS[case]
    assert_script_error(script, ["--smoke", *extra], capsys, monkeypatch, match)


@pytest.mark.parametrize("case", list(SCRIPT_ERRORS))
def test_benchmark_scripts_check_their_own_options(case, capsys, monkeypatch):
    script, extra, match = SCRIPT_ERRORS[case]
    assert_script_error(script, ["--smoke", *extra], capsys, monkeypatch, match)


def test_benchmark_script_types_return_what_they_accept(monkeypatch):
    received = []
    output = SimpleNamespace(print=lambda: "printed")
    monkeypatch.setattr(bench_block_sparse, "run", lambda *args: received.append(args) or output)
    assert bench_block_sparse.main(["--smoke", "--density", "1,0.5,1e-3", "--backends", "triton", "--seq", "128",
                                    "--threads", "1"]) == "printed"
    assert received == [(True, None, 1, (128,), None, (1.0, 0.5, 1e-3), ["triton"])]


@pytest.mark.parametrize("density", [0.0, 1.5, float("nan")], ids=["0", "above-1", "nan"])
def test_block_sparse_run_refuses_densities_outside_0_1(density):
    with pytest.raises(ValueError, match=r"block_sparse: densities must be in \(0, 1\], got \["):
        bench_block_sparse.run(smoke=True, densities=(1.0, density), progress=False)


def test_a_benchmark_script_run_directly_reports_one_line():
    result = subprocess.run([sys.executable, "-m", "qbert.benchmarks.bench_int8_linear", "--threads", "0"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == cli.USAGE_EXIT, result.stderr
    prefix = "python -m qbert.benchmarks.bench_int8_linear: error: "
    assert result.stderr.splitlines() == [f"{prefix}argument --threads: must be an integer >= 1, got 0"]
    assert result.stdout == ""


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(threads, repeats):
        raise ValueError("an internal bug")

    monkeypatch.setattr(demo, "run_demo", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["demo"])


def test_run_demo_refuses_zero_repeats():
    with pytest.raises(ValueError, match="run_demo: repeats must be >= 1"):
        demo.run_demo(threads=1, repeats=0)


def test_the_qbert_console_script_reports_one_line():
    script = shutil.which("qbert", path=str(Path(sys.executable).parent))
    assert script, f"no qbert console script beside {sys.executable}"
    result = subprocess.run([script, "demo", "--threads", "0"], capture_output=True, text=True, check=False)
    assert result.returncode == cli.USAGE_EXIT
    assert result.stderr.splitlines() == ["qbert demo: error: argument --threads: must be an integer >= 1, got 0"]
    assert result.stdout == ""
