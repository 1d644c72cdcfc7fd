import subprocess
import sys
import warnings

import pytest
import torch

import qbert
from qbert.ops import _registry
from qbert.ops._registry import BACKENDS, BackendError, FallbackWarning, Op


def _toy_op(refuse: dict[str, list[str]]) -> Op:
    toy = Op("toy")
    for backend in BACKENDS:
        toy.register(backend, lambda x, b=backend: b, lambda x, b=backend: list(refuse.get(b, [])))
    return toy


def test_priority_order_picks_first_backend_without_reasons(monkeypatch):
    monkeypatch.setattr(_registry, "backend_unavailable", lambda backend: [])
    monkeypatch.setattr(_registry, "device_of", lambda args, kwargs: "cuda")
    assert _toy_op({})(torch.zeros(1)) == "cuda"
    assert _toy_op({"cuda": ["sm_70 is not supported"]})(torch.zeros(1)) == "triton"
    monkeypatch.setattr(_registry, "device_of", lambda args, kwargs: "cpu")
    assert _toy_op({})(torch.zeros(1)) == "cpu"
    assert _toy_op({"cpu": ["K must be a multiple of 4"]})(torch.zeros(1)) == "reference"


def test_use_backend_forces_and_nests(monkeypatch):
    monkeypatch.setattr(_registry, "backend_unavailable", lambda backend: [])
    toy = _toy_op({})
    with qbert.use_backend("reference"):
        assert toy(torch.zeros(1)) == "reference"
        with qbert.use_backend("cpu"):
            assert toy(torch.zeros(1)) == "cpu"
        assert toy(torch.zeros(1)) == "reference"
    assert toy(torch.zeros(1)) == "cpu"


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setattr(_registry, "backend_unavailable", lambda backend: [])
    monkeypatch.setenv("QBERT_BACKEND", "reference")
    assert _toy_op({})(torch.zeros(1)) == "reference"


def test_unknown_backend_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="use_backend: unknown backend 'cuda2'; known backends: cuda, triton"), \
            qbert.use_backend("cuda2"):
        pass
    monkeypatch.setenv("QBERT_BACKEND", "fast")
    with pytest.raises(ValueError, match="QBERT_BACKEND: unknown backend 'fast'"):
        qbert.ops.int8_gemm(torch.zeros(1, 1, dtype=torch.int8), torch.zeros(1, 1, dtype=torch.int8))


def test_forced_backend_that_refuses_raises_with_its_reasons(monkeypatch):
    monkeypatch.setattr(_registry, "backend_unavailable", lambda backend: [])
    toy = _toy_op({"cpu": ["K must be a multiple of 4"]})
    with qbert.use_backend("cpu"), pytest.raises(BackendError, match="forced backend 'cpu' cannot run: K must"):
        toy(torch.zeros(1))


def test_forced_backend_without_an_implementation():
    with qbert.use_backend("cuda"), pytest.raises(BackendError, match="cuda"):
        qbert.ops.w8a16_linear(torch.zeros(1, 4), torch.zeros(2, 4, dtype=torch.int8), torch.ones(2))


def test_reference_fallback_on_cuda_warns_or_raises_under_strict(monkeypatch):
    monkeypatch.setattr(_registry, "backend_unavailable", lambda backend: [])
    monkeypatch.setattr(_registry, "device_of", lambda args, kwargs: "cuda")
    toy = _toy_op({"cuda": ["sm_70 is not supported"], "triton": ["no triton"]})
    with pytest.warns(FallbackWarning, match="toy falls back to the PyTorch reference.*cuda: sm_70"):
        assert toy(torch.zeros(1)) == "reference"
    monkeypatch.setenv("QBERT_STRICT", "1")
    with pytest.raises(BackendError, match=r"QBERT_STRICT=1"):
        toy(torch.zeros(1))


def test_reference_on_cpu_is_silent(monkeypatch):
    monkeypatch.setattr(_registry, "backend_unavailable", lambda backend: [])
    monkeypatch.setenv("QBERT_STRICT", "1")
    toy = _toy_op({"cpu": ["c"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert toy(torch.zeros(1)) == "reference"


def test_duplicate_and_unknown_registrations_are_errors():
    toy = Op("toy")
    toy.register("cpu", lambda: 0, list)
    with pytest.raises(ValueError, match="registered twice"):
        toy.register("cpu", lambda: 0, list)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        toy.register("gpu", lambda: 0, list)


def test_cpu_tensors_dispatch_to_the_cpu_backend():
    a = torch.zeros(2, 8, dtype=torch.int8)
    assert _registry.OPS["int8_gemm"].select(a, a) == "cpu"


def test_triton_interpreter_is_never_chosen_automatically(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = torch.zeros(2, 8, dtype=torch.int8)
    assert "runs only when forced" in " ".join(_registry.OPS["int8_gemm"].reasons("triton", a, a))


def test_import_does_not_import_triton_or_initialise_cuda():
    code = ("import sys, torch, qbert, qbert.ops, qbert.nn\n"
            "assert 'triton' not in sys.modules, 'qbert imported triton'\n"
            "assert 'qbert._C' not in sys.modules, 'qbert loaded its extension at import'\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
