"""A fused encoder's CPU forward runs torch's own ops serially where every layer is one qbert call
(qbert.nn.fused.serial_torch; csrc/cpu/parallel.h says why), and hands torch its threads back everywhere
else: after the forward, also when it raises, and around layers that run op by op."""

import contextlib
import copy

import pytest
import torch

import qbert
from qbert import _ext
from qbert.nn import fused as fused_module
from tests.nn import _tiny_models as tiny

pytestmark = pytest.mark.skipif(bool(_ext.load_error()), reason="; ".join(_ext.load_error()) or "loaded")

THREADS = 2


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _fused():
    return qbert.quantize(copy.deepcopy(tiny.build(tiny.BASE_MODELS["bert"], "bert")), "w8a8")


def _threads_seen_by(module: torch.nn.Module) -> list[int]:
    """torch.get_num_threads() inside each call of ``module``, appended as it runs."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    return seen


def test_set_serial_torch_round_trip(threads):
    module = _ext.module()
    assert module.set_serial_torch(True) is False
    try:
        assert torch.get_num_threads() == 1
        assert module.set_serial_torch(True) is True  # already on: unchanged
    finally:
        assert module.set_serial_torch(False) is True
    assert torch.get_num_threads() == THREADS


def test_one_call_forward_runs_torch_serially_with_the_same_result(threads, monkeypatch):
    model = _fused()
    seen = _threads_seen_by(model.embeddings)
    with torch.no_grad():
        serial = model(**tiny.inputs()).last_hidden_state
    assert seen == [1] and torch.get_num_threads() == THREADS
    # The same forward with torch at its threads throughout: bitwise the same (the row-wise torch ops and
    # qbert's kernels do not depend on the thread count).
    monkeypatch.setattr(fused_module, "_serial_eligible", lambda owner: False)
    monkeypatch.setattr(fused_module, "serial_torch", lambda on: contextlib.nullcontext())
    with torch.no_grad():
        parallel = model(**tiny.inputs()).last_hidden_state
    assert seen == [1, THREADS]
    torch.testing.assert_close(serial, parallel, rtol=0, atol=0)


def test_a_forward_that_raises_gives_the_threads_back(threads):
    model = _fused()
    ids = tiny.inputs()["input_ids"].clone()
    ids[0, 0] = model.config.vocab_size  # out of the embedding's range
    with pytest.raises(IndexError), torch.no_grad():
        model(input_ids=ids)
    assert torch.get_num_threads() == THREADS


def test_op_by_op_layers_run_torch_at_its_threads(threads):
    # A hook on a layer's sub-module makes every layer run op by op (qbert.nn.fused): their torch ops
    # (sdpa among them) get torch's threads; the embeddings still run serially.
    model = _fused()
    around = _threads_seen_by(model.embeddings)
    inside = _threads_seen_by(model.encoder.layer[0].attention.self)
    with torch.no_grad():
        model(**tiny.inputs())
    assert around == [1] and inside == [THREADS]


def test_training_forward_keeps_torch_threads(threads):
    model = _fused().train()
    seen = _threads_seen_by(model.embeddings)
    with torch.no_grad():
        model(**tiny.inputs())
    assert seen == [THREADS]
