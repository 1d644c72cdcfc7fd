"""The block-sparse attention benchmark's --smoke mode runs, validates and writes its results."""

from __future__ import annotations

import json

import pytest
from qbert.benchmarks import _harness as H
from qbert.benchmarks import bench_block_sparse


@pytest.mark.slow
def test_block_sparse_smoke_runs_and_writes(tmp_path):
    output = bench_block_sparse.main(["--smoke", "--out", str(tmp_path), "--threads", "2"])
    assert {p.suffix for p in output.paths.values()} >= {".json", ".csv", ".md"}
    for path in output.paths.values():
        assert path.parent == tmp_path and path.stat().st_size > 0
        assert path.name.endswith(f"-block_sparse{path.suffix}")
    data = json.loads(output.paths["json"].read_text())
    assert len(data["results"]) == len(output.results) and data["meta"]["block_size"] == 64
    assert not [r for r in output.results if r.status == H.STATUS_FAILED], output.markdown
    for r in output.results:
        assert r.status == H.STATUS_OK or r.reason, f"{r.impl} is {r.status} without a reason"
    qbert_rows = [r for r in output.results if r.impl.startswith("qbert") and r.status == H.STATUS_OK]
    # Every layout kind of the smoke sweep (dense, sliding window, BigBird) ran in both modes.
    assert {(r.case["layout"], r.case["mode"]) for r in qbert_rows} == \
        {(k, m) for k in ("dense", "sliding_window", "bigbird") for m in bench_block_sparse.MODES}, output.markdown
    for r in qbert_rows:
        assert r.metrics["layout_build_us"] > 0 and "SDPA dense" in r.speedup
    sdpa = [r for r in output.results if r.impl.startswith("SDPA")]
    assert sdpa and all(r.status == H.STATUS_OK for r in sdpa), output.markdown


def test_layouts_reach_the_target_density_or_say_why():
    sliding = bench_block_sparse.layout_for("sliding_window", 4096, 0.125, heads=12)
    assert abs(sliding.layout.density - 0.125) < 0.02 and sliding.params == {"window": 4}
    big = bench_block_sparse.layout_for("bigbird", 4096, 0.125, heads=12)
    assert abs(big.layout.density - 0.125) < 0.01 and big.layout.heads == 12 and big.params["random_blocks"] == 1
    short = bench_block_sparse.layout_for("bigbird", 512, 0.125, heads=12)
    assert short.layout is None and "BigBird has at least 5 of 8 blocks per row" in short.reason
