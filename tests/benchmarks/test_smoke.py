"""Each benchmark's --smoke mode runs and writes its results, so the benchmarks cannot rot."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from qbert.benchmarks import SUITES, bench_e2e, bench_int8_gemm, suite_module
from qbert.benchmarks import _harness as H
from qbert.benchmarks import _onnx_peers as peers
from qbert.benchmarks.shapes import SMOKE_SQUARE

from qbert import cli

# The linear-layer suites, with a row of qbert's own layer that each smoke run must time successfully.
QBERT_ROW = {"int8_linear": "qbert w8a8", "int8_gemm": "qbert int8_gemm", "lowbit_linear": "qbert w4a16",
             "e2e": "qbert w8a8"}
OWN_SMOKE_TEST = {"block_sparse", "profile", "contention"}  # tests/benchmarks/test_<suite>_smoke.py
SHARED_RUN = {"e2e"}  # its smoke run (a minute) is made once, by the e2e_smoke fixture, for all its tests


def test_every_suite_has_a_smoke_test():
    assert set(SUITES) == set(QBERT_ROW) | OWN_SMOKE_TEST


def _check_written(output, suite: str, tmp_path) -> None:
    assert {p.suffix for p in output.paths.values()} >= {".json", ".csv", ".md"}
    assert output.paths["json"].name.endswith(f"-{suite}.json")
    for path in output.paths.values():  # the reports, and plots named after them
        assert path.parent == tmp_path and path.stat().st_size > 0
        assert path.name.startswith(output.paths["json"].stem)
    data = json.loads(output.paths["json"].read_text())
    for key in ("device", "torch", "triton", "transformers", "threads", "date", "git_commit"):
        assert key in data["meta"]
    assert len(data["results"]) == len(output.results)


def _smoke(suite: str, out_dir) -> H.BenchOutput:
    return suite_module(suite).main(["--smoke", "--out", str(out_dir), "--threads", "2"])


@pytest.fixture(scope="module")
def e2e_smoke(tmp_path_factory):
    """The e2e suite's smoke run through its command line, and the folder it wrote to."""
    out_dir = tmp_path_factory.mktemp("e2e")
    return _smoke("e2e", out_dir), out_dir


@pytest.mark.parametrize("suite", [s for s in QBERT_ROW if s not in SHARED_RUN])
def test_smoke_runs_and_writes(suite, tmp_path):
    _check_smoke_output(_smoke(suite, tmp_path), suite, tmp_path)


def test_e2e_smoke_runs_and_writes(e2e_smoke):
    output, out_dir = e2e_smoke
    _check_smoke_output(output, "e2e", out_dir)


def _check_smoke_output(output: H.BenchOutput, suite: str, tmp_path) -> None:
    _check_written(output, suite, tmp_path)
    assert not [r for r in output.results if r.status == H.STATUS_FAILED], output.markdown
    # CUDA-graph rows (e2e) cannot run on the CPU, nor rows of an e2e workload whose packages are missing;
    # test_e2e_smoke_* check that they say so.
    unbuilt = {w["model"] for w in output.meta.get("workloads", []) if w["error"]}
    runnable = [r for r in output.results if (torch.cuda.is_available() or r.case.get("mode") != bench_e2e.GRAPH)
                and r.case.get("model") not in unbuilt]
    float_rows = [r for r in runnable if "F.linear" in r.impl or r.impl in ("fp32", "fp16")]
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


def test_int8_gemm_smoke_rows_metrics_targets_and_plots(tmp_path):
    output = bench_int8_gemm.run(smoke=True, out_dir=tmp_path, progress=False)
    m, n, k = 16, 96, 40
    rows = {(r.impl, r.case["M"], r.case["N"], r.case["K"]): r for r in output.results}
    backends = bench_int8_gemm.default_backends(H.default_device())
    # Every qbert op has a row per backend dispatch can pick here, and at least one of them was timed (on
    # the CPU that is the cpu backend; on a GPU a backend may refuse an op, e.g. triton has no requant).
    for op in bench_int8_gemm.QBERT_OPS:
        mine = [rows[(f"qbert {op.label} [{backend}]", m, n, k)] for backend in backends]
        assert any(r.status == H.STATUS_OK and r.time_us > 0 for r in mine), output.markdown
    # The bytes model: int8_gemm reads M*K + N*K int8 and writes M*N int32.
    gemm = next(rows[(f"qbert int8_gemm [{b}]", m, n, k)] for b in backends
                if rows[(f"qbert int8_gemm [{b}]", m, n, k)].status == H.STATUS_OK)
    assert gemm.metrics["ops/B"] == pytest.approx(2 * m * n * k / (m * k + n * k + 4 * m * n))
    assert gemm.throughput == pytest.approx(2 * m * n * k / gemm.time_us / 1e6)
    side = SMOKE_SQUARE.n  # torch._int_mm runs this case on every device (CUDA refuses M <= 16)
    chain = rows[("_int_mm+dequant+gelu+quantize", side, side, side)]
    assert chain.status == H.STATUS_OK and chain.baseline and "codes != ref" in chain.metrics
    # Targets are computed from the rows' measured ratios, with the worst case reported.
    targets = output.meta["targets"]
    assert len(targets) == 3 * len(backends)  # three targets per backend
    for t in targets:  # n/a only with the reason (e.g. torch._int_mm refuses M <= 16 on CUDA)
        assert t["verdict"] in ("PASS", "MISS") or (t["verdict"] == "n/a" and t["reason"]), t
    square = next(t for t in targets if t["baseline"] == "_int_mm")
    measured = [r.speedup["_int_mm"] for r in output.results
                if r.impl == square["row"] and r.case["model"] == bench_int8_gemm.SQUARE_MODEL]
    assert square["min"] == min(measured) and square["verdict"] == ("PASS" if min(measured) >= 0.9 else "MISS")
    peak = output.meta["ceilings"]["int8_peak"]
    assert peak["tops"] == max(peak["measured_tops"].values()) > 0
    assert "### Targets" in output.markdown and "Measured ceilings" in output.markdown
    for plot in ("roofline.png", "speedup.png"):
        assert output.paths[plot].stat().st_size > 0


def test_requant_mismatch_allows_only_the_stated_slack():
    q = torch.tensor([[1, -5, 127]], dtype=torch.int8)
    scale = torch.tensor([0.5])
    assert bench_int8_gemm.requant_mismatch((q, scale), (q.clone(), scale.clone()), 0, 1e-5) == ""
    off_by_one = (q + torch.tensor([[0, 1, 0]], dtype=torch.int8), scale)
    assert "up to 1" in bench_int8_gemm.requant_mismatch(off_by_one, (q, scale), 0, 1e-5)
    assert bench_int8_gemm.requant_mismatch(off_by_one, (q, scale), 1, 1e-5) == ""
    assert "scales differ" in bench_int8_gemm.requant_mismatch((q, scale * 1.01), (q, scale), 1, 1e-3)


def test_e2e_smoke_scopes_modes_and_targets(e2e_smoke):
    output = e2e_smoke[0]
    cuda = torch.cuda.is_available()
    random = [r for r in output.results if r.case["model"] == bench_e2e.SMOKE_RANDOM_MODEL]
    for scope in bench_e2e.SCOPES:
        for impl in (bench_e2e.FUSED, bench_e2e.UNFUSED):
            eager = [r for r in random if r.impl == impl and r.case["scope"] == scope
                     and r.case["mode"] == bench_e2e.EAGER]
            assert eager and all(r.status == H.STATUS_OK and r.metrics["cosine"] > 0.99 for r in eager), \
                output.markdown
    graphs = [r for r in output.results if r.case["mode"] == bench_e2e.GRAPH]
    if cuda:
        assert all(r.status == H.STATUS_OK for r in graphs if r.impl == "fp16"), output.markdown
    else:
        peer_names = (peers.ORT_FP32, peers.ORT_INT8, peers.OPENVINO_INT8)
        assert graphs and all(r.status == H.STATUS_UNSUPPORTED for r in graphs)
        assert all("CUDA graphs need a CUDA device" in r.reason for r in graphs if r.impl not in peer_names)
        assert all(r.reason == bench_e2e.peer_refusal(r.case["scope"], r.case["mode"])
                   for r in graphs if r.impl in peer_names)
    targets = output.meta["targets"]
    cases = 0 if cuda else sum(len(w["batches"]) for w in output.meta["workloads"])
    assert len(targets) == len(bench_e2e.TARGETS) * len(bench_e2e.MODES) + len(bench_e2e.PEER_TARGETS) * cases
    for t in targets:
        if t["mode"] == bench_e2e.EAGER or cuda:
            assert t["verdict"] == ("PASS" if t["ratio"] >= t["target"] else "MISS") or t["reason"], t
    assert "### Targets" in output.markdown


CPU_ROWS = ("fp32", bench_e2e.AO_NAME, peers.ORT_FP32, peers.ORT_INT8, peers.OPENVINO_INT8, bench_e2e.FUSED,
            bench_e2e.UNFUSED, "qbert w8a16", "qbert w4a16", "qbert w4a8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the peers and the real-text workload are the CPU run's")
def test_e2e_smoke_peers_and_real_text(e2e_smoke):
    output = e2e_smoke[0]
    workloads = {w["model"]: w for w in output.meta["workloads"]}
    assert list(workloads) == [bench_e2e.SMOKE_RANDOM_MODEL, bench_e2e.REAL_MODEL]
    encoder_eager = {}
    for r in output.results:
        if r.case["scope"] == "encoder" and r.case["mode"] == bench_e2e.EAGER:
            encoder_eager.setdefault((r.case["model"], r.case["batch"]), {})[r.impl] = r
    assert len(encoder_eager) == sum(len(w["batches"]) for w in workloads.values())
    ort_installed = importlib.util.find_spec("onnxruntime") is not None
    for (model, batch), rows in encoder_eager.items():
        assert tuple(rows) == CPU_ROWS, (model, batch)
        assert rows[peers.ORT_INT8].baseline and not rows[peers.ORT_FP32].baseline
        if workloads[model]["error"]:  # the real-text packages are missing: every row says so
            assert all(r.status == H.STATUS_UNSUPPORTED and r.reason == workloads[model]["error"]
                       for r in rows.values())
            continue
        if not ort_installed:
            assert rows[peers.ORT_INT8].reason == "onnxruntime is not installed: pip install qbert[bench]"
            continue
        ort = rows[peers.ORT_INT8]
        assert ort.status == H.STATUS_OK, ort.reason
        # int8 per-channel weights and int8 activations: the tiny random BERT keeps 0.9999 and the real
        # MiniLM 0.99 per-token cosine (pad tokens excluded); a broken export gives about 0.
        assert ort.metrics["cosine"] > 0.98, (model, ort.metrics)
        assert rows[peers.ORT_FP32].metrics["cosine"] > 0.9999, (model, rows[peers.ORT_FP32].metrics)
        # Every timed row has its ratio to fp32 and to ORT int8.
        assert {"fp32", peers.ORT_INT8} <= set(rows[bench_e2e.FUSED].speedup), rows[bench_e2e.FUSED].speedup
        assert peers.ORT_INT8 in rows["fp32"].speedup
        openvino = rows[peers.OPENVINO_INT8]
        if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
            assert openvino.status == H.STATUS_OK and openvino.metrics["cosine"] > 0.95, openvino
        else:
            assert openvino.reason.endswith("is not installed: pip install qbert[bench]"), openvino.reason
    real = workloads[bench_e2e.REAL_MODEL]
    if not real["error"]:
        (batch, padding), = real["padding"].items()
        assert 0 < padding < 1 and f"{100 * padding:.1f}% of the tokens are padding" in output.markdown
        assert {r.case["padding"] for r in output.results if r.case["model"] == bench_e2e.REAL_MODEL} == {padding}
    assert {r.case["padding"] for r in output.results if r.case["model"] == bench_e2e.SMOKE_RANDOM_MODEL} == {0.0}
    assert output.meta["peers"]["versions"].keys() == set(peers.PACKAGES)
