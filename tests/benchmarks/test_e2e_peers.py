"""The end-to-end benchmark's CPU peers (ONNX Runtime fp32 / int8, OpenVINO int8) on a tiny BERT, the rows
they give when a runtime is missing, and the fidelity metric on padded batches."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from qbert.benchmarks import _harness as H
from qbert.benchmarks import _onnx_peers as peers
from qbert.benchmarks import bench_e2e

CPU = torch.device("cpu")
THREADS = 1
# A padded batch shaped unlike the export sample, so the dynamic axes and the mask path are exercised.
BATCH, SEQ, VALID = 3, 12, (12, 5, 9)  # valid tokens per row
# Same math in float: the fused graph reorders sums over 2 layers of a 64-wide model.
FP32_REL_TOL = 1e-5
# int8 weights per channel and int8 activations keep a random-init BERT's per-token cosine above this
# (0.99997 measured on this model; 0.991 on the real MiniLM). A broken graph gives about 0.
INT8_MIN_COSINE = 0.99

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                               reason="onnxruntime is not installed (pip install qbert[bench])")
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None
                                    or importlib.util.find_spec("nncf") is None,
                                    reason="openvino / nncf are not installed (pip install qbert[bench])")


def padded_inputs(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (BATCH, SEQ), generator=gen)
    mask = (torch.arange(SEQ) < torch.tensor(VALID)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def tiny():
    """The smoke BERT, its ONNX exports (removed afterwards) and a padded batch with its float output."""
    model = bench_e2e.build_model(smoke=True, device=CPU)
    exports = peers.Exports(model)
    inputs = padded_inputs(model.config.vocab_size)
    with torch.inference_mode():
        ref = model(**inputs).last_hidden_state
    yield model, exports, inputs, ref
    exports.close()


def test_fidelity_counts_only_the_valid_tokens():
    ref = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = ref.clone()
    out[1, 2:] = -ref[1, 2:]  # the pad tokens' outputs are anything
    assert bench_e2e.fidelity(out, ref, mask) == {"cosine": pytest.approx(1.0), "sqnr_db": float("inf")}
    unmasked = bench_e2e.fidelity(out, ref)
    assert unmasked["cosine"] == pytest.approx(0.5)  # 6 tokens at cosine 1, 2 at -1
    assert unmasked["sqnr_db"] < bench_e2e.DB_PER_DECADE  # the noise is as large as a quarter of the signal


def test_padding_ratio_is_pad_tokens_over_all_tokens():
    inputs = padded_inputs(vocab=10)
    workload = bench_e2e.Workload("w", {"encoder": (bench_e2e.EAGER,)}, (BATCH,), SEQ, "test",
                                  inputs={BATCH: inputs})
    assert workload.padding(BATCH) == pytest.approx(1 - sum(VALID) / (BATCH * SEQ), abs=1e-4)
    assert bench_e2e.Workload("w", {}, (1,), SEQ, "test", inputs={1: {"input_ids": inputs["input_ids"][:1]}}
                              ).padding(1) == 0.0
    assert bench_e2e.Workload("w", {}, (1,), SEQ, "test", error="missing").padding(1) is None


@needs_ort
def test_ort_peers_match_the_float_model(tiny):
    model, exports, inputs, ref = tiny
    feed = peers.feed(inputs)
    fp32 = peers.ort_fp32(exports, THREADS)(feed)
    valid = inputs["attention_mask"].bool()
    err = (fp32 - ref)[valid].abs().max().item()
    assert err <= FP32_REL_TOL * ref[valid].abs().max().item(), err
    # The optimizer fused every layer's attention (the peer refuses to build otherwise).
    assert exports.fusions["Attention"] == model.config.num_hidden_layers
    int8 = peers.ort_int8(exports, THREADS)(feed)
    assert bench_e2e.fidelity(int8, ref, inputs["attention_mask"])["cosine"] > INT8_MIN_COSINE


@needs_openvino
def test_openvino_int8_matches_the_float_model(tiny):
    model, exports, inputs, ref = tiny
    calibration = padded_inputs(model.config.vocab_size)
    calibration["input_ids"] = calibration["input_ids"].flip(0)  # other rows than the compared batch
    out = peers.openvino_int8(exports, THREADS, calibration)(peers.feed(inputs))
    assert bench_e2e.fidelity(out, ref, inputs["attention_mask"])["cosine"] > INT8_MIN_COSINE


def test_feed_adds_an_all_ones_mask_when_there_is_none():
    ids = torch.tensor([[3, 1, 4]])
    feed = peers.feed({"input_ids": ids})
    assert (feed["attention_mask"] == 1).all() and feed["attention_mask"].shape == (1, 3)


def test_missing_runtimes_are_rows_with_the_reason(monkeypatch):
    """With onnxruntime and openvino unimportable, their rows are listed as not installed; the other rows
    run, and every fidelity is measured over the batch's valid tokens."""
    for package in ("onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    model = bench_e2e.build_model(smoke=True, device=CPU)
    inputs = padded_inputs(model.config.vocab_size)
    workload = bench_e2e.Workload("tiny padded", {"encoder": (bench_e2e.EAGER,)}, (BATCH,), SEQ, "test", model,
                                  {BATCH: inputs}, inputs)
    masks = []
    fidelity = bench_e2e.fidelity

    def recording_fidelity(out, ref, mask=None):
        masks.append(mask)
        return fidelity(out, ref, mask)

    monkeypatch.setattr(bench_e2e, "fidelity", recording_fidelity)
    exports = peers.Exports(model)
    try:
        with torch.inference_mode():
            results = bench_e2e.run_workload(workload, CPU, THREADS, {"warmup": 0, "repeats": 1}, exports,
                                             progress=False)
    finally:
        exports.close()
    rows = {r.impl: r for r in results}
    assert list(rows) == [v.name for v in bench_e2e.variants(workload, CPU)]
    for name in (peers.ORT_FP32, peers.ORT_INT8):
        assert rows[name].status == H.STATUS_UNSUPPORTED
        assert rows[name].reason == "onnxruntime is not installed: pip install qbert[bench]"
    assert rows[peers.OPENVINO_INT8].reason == "openvino is not installed: pip install qbert[bench]"
    timed = [r for r in results if r.status == H.STATUS_OK]
    assert {r.impl for r in timed} >= {"fp32", bench_e2e.FUSED} and all(r.time_us > 0 for r in timed)
    assert len(masks) == len(timed) - 1  # every row but the reference itself
    assert all(mask is inputs["attention_mask"] for mask in masks)


def test_peers_are_refused_outside_encoder_eager_and_on_cuda():
    assert bench_e2e.peer_refusal("encoder", bench_e2e.EAGER) == ""
    assert "encoder scope" in bench_e2e.peer_refusal("layer", bench_e2e.EAGER)
    assert "no compiled mode" in bench_e2e.peer_refusal("encoder", bench_e2e.COMPILED)
    workload = bench_e2e.Workload("w", {}, (1,), SEQ, "test")
    rows = bench_e2e.variants(workload, torch.device("cuda"))
    peer_rows = [v for v in rows if v.peer]
    assert [v.name for v in peer_rows] == [peers.ORT_FP32, peers.ORT_INT8, peers.OPENVINO_INT8]
    for variant in peer_rows:
        assert not variant.baseline
        with pytest.raises(peers.PeerUnavailable, match="CPU peer"):
            variant.build()
