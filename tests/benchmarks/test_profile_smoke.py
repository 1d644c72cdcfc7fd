"""The profile suite (benchmarks/profile_forward.py): every op lands in one category, the categories and the
rest add up to the profiled wall time, and the fused W8A8 chain's own ops carry time."""

from __future__ import annotations

import json

import pytest
from qbert.benchmarks import _harness as H
from qbert.benchmarks import profile_forward as P

GEMM = P.CATEGORIES[0][0]


def test_ops_fall_in_their_category():
    assert P.category("qbert::int8_linear_cpu") == GEMM
    assert P.category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention (softmax(QK^T)V)"
    assert P.category("aten::index_select") == "row gather / scatter (embedding lookups, unpadding)"
    assert P.category("aten::view") == P.OTHER


def test_smoke_profile_adds_up(tmp_path):
    output = P.main(["--smoke", "--out", str(tmp_path), "--threads", "2"])
    assert output.paths["json"].name.endswith("-profile.json")
    data = json.loads(output.paths["json"].read_text())
    assert len(data["results"]) == len(output.results)
    cases = {tuple(r.case.items()) for r in output.results}
    assert len(cases) >= 2  # the random BERT at its batches, and MiniLM on real text
    for case in cases:
        rows = {r.impl: r for r in output.results if tuple(r.case.items()) == case}
        if any(r.status != H.STATUS_OK for r in rows.values()):
            pytest.fail(f"{case}: {[r.reason for r in rows.values()]}")
        total = rows.pop("total (profiled)").time_us
        assert sum(r.time_us for r in rows.values()) == pytest.approx(total, rel=1e-9)
        assert rows[GEMM].time_us > 0 and rows["add + LayerNorm + quantize"].time_us > 0
        assert sum(r.metrics["share"] for r in rows.values()) == pytest.approx(1, abs=0.01)
