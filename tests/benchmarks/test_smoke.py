"""Each benchmark's --smoke mode runs and writes its results, so the benchmarks cannot rot."""

from __future__ import annotations

import json

import pytest
import torch
from qbert.benchmarks import SUITES, suite_module
from qbert.benchmarks import _harness as H

from qbert import cli

# The linear-layer suites, with a row of qbert's own layer that each smoke run must time successfully.
# (block_sparse has its own smoke test: tests/benchmarks/test_block_sparse_smoke.py.)
QBERT_ROW = {"int8_linear": "qbert w8a8", "lowbit_linear": "qbert w4a16", "e2e": "qbert w8a8"}
OWN_SMOKE_TEST = {"block_sparse"}


def test_every_suite_has_a_smoke_test():
    assert set(SUITES) == set(QBERT_ROW) | OWN_SMOKE_TEST


def _check_written(output, suite: str, tmp_path) -> None:
    assert {p.suffix for p in output.paths.values()} >= {".json", ".csv", ".md"}
    for path in output.paths.values():
        assert path.parent == tmp_path and path.stat().st_size > 0
        assert path.name.endswith(f"-{suite}{path.suffix}")
    data = json.loads(output.paths["json"].read_text())
    for key in ("device", "torch", "triton", "transformers", "threads", "date", "git_commit"):
        assert key in data["meta"]
    assert len(data["results"]) == len(output.results)


@pytest.mark.parametrize("suite", list(QBERT_ROW))
def test_smoke_runs_and_writes(suite, tmp_path):
    output = suite_module(suite).main(["--smoke", "--out", str(tmp_path), "--threads", "2"])
    _check_written(output, suite, tmp_path)
    assert not [r for r in output.results if r.status == H.STATUS_FAILED], output.markdown
    float_rows = [r for r in output.results if "F.linear" in r.impl or r.impl in ("fp32", "fp16")]
    assert float_rows and all(r.status == H.STATUS_OK for r in float_rows), output.markdown
    assert any(r.impl.startswith(QBERT_ROW[suite]) and r.status == H.STATUS_OK for r in output.results), \
        output.markdown
    for r in output.results:
        assert r.status == H.STATUS_OK or r.reason, f"{r.impl} is {r.status} without a reason"


def test_cli_bench_prints_the_table(tmp_path, capsys):
    assert cli.main(["bench", "int8_linear", "--smoke", "--out", str(tmp_path)]) == 0
    assert "| impl |" in capsys.readouterr().out


def test_mismatch_is_exact_for_integers_and_relative_for_floats():
    ints = torch.tensor([1, 2, 3], dtype=torch.int32)
    assert H.mismatch(ints, ints.clone()) == ""
    assert "1 of 3" in H.mismatch(ints + torch.tensor([0, 0, 1], dtype=torch.int32), ints)
    ref = torch.tensor([100.0, -50.0])
    assert H.mismatch(ref * (1 + H.FLOAT_REL_TOL[torch.float32] / 10), ref) == ""
    assert "exceeds" in H.mismatch(ref + 1, ref)


def test_speedups_compare_rows_with_baselines_of_the_same_case():
    case, other = {"M": 1}, {"M": 2}
    rows = [H.Result(case, "base", baseline=True, time_us=10.0), H.Result(case, "fast", time_us=5.0),
            H.Result(other, "fast", time_us=1.0), H.Result(case, "refused", status=H.STATUS_UNSUPPORTED,
                                                           reason="why")]
    H.attach_speedups(rows)
    assert rows[1].speedup == {"base": 2.0}
    assert rows[0].speedup == {} and rows[2].speedup == {} and rows[3].speedup == {}
    assert "unsupported: why" in H.markdown_table(rows, {"suite": "t", "device": "d", "threads": 1, "torch": "x",
                                                          "triton": "x", "transformers": "x",
                                                          "git_commit": "unknown", "date": "today"})
