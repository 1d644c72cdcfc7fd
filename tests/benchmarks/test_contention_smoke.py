"""The contention suite (benchmarks/contention.py): both wait policies run in child processes, every row is
timed idle and busy, and the slowdown is busy over idle of the same row."""

from __future__ import annotations

import json
import subprocess

import pytest
from qbert.benchmarks import _harness as H
from qbert.benchmarks import contention as C


def test_smoke_contention(tmp_path):
    output = C.main(["--smoke", "--out", str(tmp_path), "--threads", "2"])
    data = json.loads(output.paths["json"].read_text())
    assert len(data["results"]) == len(output.results)
    ok = [r for r in output.results if r.status == H.STATUS_OK]
    assert {r.case["wait policy"] for r in ok} == set(C.POLICIES)
    assert {r.case["load"] for r in ok} == set(C.LOADS)
    assert {r.impl for r in ok} >= {C.QBERT, C.ORT}
    idle = {(tuple((k, v) for k, v in r.case.items() if k != "load"), r.impl): r.time_us
            for r in ok if r.case["load"] == "idle"}
    for r in ok:
        key = (tuple((k, v) for k, v in r.case.items() if k != "load"), r.impl)
        assert r.metrics["slowdown"] == pytest.approx(r.time_us / idle[key], rel=1e-3)
    targets = data["meta"]["targets"]
    assert {(t["model"], t["wait policy"]) for t in targets} == {(r.case["model"], r.case["wait policy"]) for r in ok}
    assert "### Target" in output.markdown


def _row(model: str, impl: str, load: str, slowdown: float) -> H.Result:
    case = {"model": model, "batch": 1, "threads": 2, "wait policy": "default", "load": load}
    return H.Result(case, impl, time_us=1.0, metrics={"slowdown": slowdown})


def test_target_compares_the_busy_slowdowns():
    results = [_row("a", C.QBERT, "idle", 1.0), _row("a", C.QBERT, "busy", 1.5), _row("a", C.ORT, "busy", 2.0),
               _row("b", C.QBERT, "busy", 2.5), _row("b", C.ORT, "busy", 2.0), _row("c", C.QBERT, "busy", 1.0)]
    verdicts = {t["model"]: t["verdict"] for t in C.evaluate_targets(results, threads=2)}
    assert verdicts == {"a": "PASS", "b": "MISS", "c": "n/a"}


def test_busy_load_starts_and_stops_its_processes(monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(C.subprocess, "Popen", popen)
    with C.load("idle"):
        assert not started
    with C.load("busy"):
        assert len(started) == C.BUSY_PROCESSES and all(p.poll() is None for p in started)
    assert all(p.poll() is not None for p in started)


def test_a_failing_worker_is_an_error(monkeypatch):
    monkeypatch.setattr(C, "MODULE", "qbert.benchmarks.no_such_module")
    with pytest.raises(RuntimeError, match="contention worker .* failed with exit status 1"):
        C._measure(None, True, [1])
