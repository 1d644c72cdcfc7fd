import subprocess
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qbert
from qbert import _ext
from qbert.ops import _cuda, _registry
from qbert.ops._registry import BACKENDS, INTERPRETER_BF16_DOT, BackendError, FallbackWarning, Op, Row


def _toy_row(backend: str, limits=None, **declared) -> Row:
    """A row that returns its backend's name; cpu and cuda rows name a (toy) kernel, as they must."""
    kernel = f"toy_{backend}" if backend in ("cpu", "cuda") else ()
    return Row(lambda x: backend, kernel=kernel, limits=limits, **declared)


def _toy_op(refuse: dict[str, list[str]]) -> Op:
    """Every backend, each refusing with the reasons ``refuse`` gives it (its limits)."""
    rows = {b: _toy_row(b, lambda x, b=b: list(refuse.get(b, []))) for b in BACKENDS if b != "reference"}
    return Op("toy", lambda x: "reference", **rows)


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


def test_duplicate_and_unknown_registrations_are_errors(monkeypatch):
    monkeypatch.setattr(_registry, "OPS", {})
    _registry.op("toy", lambda: 0)
    with pytest.raises(ValueError, match="registered twice"):
        _registry.op("toy", lambda: 0)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        Op("toy", lambda: 0, gpu=Row(lambda: 0))


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


# ---- the rules derived from a row's declaration ------------------------------------------------------

def test_rows_are_listed_reference_first_whatever_the_keyword_order():
    toy = Op("toy", lambda x: "reference", cuda=_toy_row("cuda"), cpu=_toy_row("cpu"), triton=_toy_row("triton"))
    assert list(toy.rows) == ["reference", "cpu", "triton", "cuda"]


def test_undeclared_dtype_is_refused_with_a_reason_naming_it(monkeypatch):
    monkeypatch.setattr(_registry, "backend_unavailable", lambda backend: [])
    toy = Op("toy", lambda x: "reference", cpu=_toy_row("cpu", dtypes=(torch.float32, torch.float16)))
    assert toy.rows["cpu"].supports(torch.zeros(1, dtype=torch.float16)) == []
    reason = "bfloat16 inputs are not among its declared dtypes (float32, float16)"
    assert toy.reasons("cpu", torch.zeros(1, dtype=torch.bfloat16)) == [reason]
    assert toy(torch.zeros(1, dtype=torch.bfloat16)) == "reference"
    with qbert.use_backend("cpu"), pytest.raises(BackendError, match=r"forced backend 'cpu' cannot run: bfloat16"):
        toy(torch.zeros(1, dtype=torch.bfloat16))


def test_declared_reasons_come_before_the_limits():
    row = _toy_row("cpu", lambda x: ["K must be a multiple of 4"], dtypes=(torch.float32,))
    assert row.supports(torch.zeros(1, dtype=torch.float16)) == [
        "float16 inputs are not among its declared dtypes (float32)", "K must be a multiple of 4"]


@pytest.mark.parametrize("interpreter", ["1", "0"])
def test_bf16_dot_refuses_bfloat16_under_the_interpreter_only(monkeypatch, interpreter):
    monkeypatch.setenv("TRITON_INTERPRET", interpreter)
    dot, no_dot = _toy_row("triton", bf16_dot=True), _toy_row("triton")
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    assert dot.supports(bf16) == ([INTERPRETER_BF16_DOT] if interpreter == "1" else [])
    assert dot.supports(bf16.float()) == [] and no_dot.supports(bf16) == []
    with FakeTensorMode():  # the interpreter's rule: on CUDA tensors the compiled kernels run bfloat16
        assert dot.supports(torch.empty(1, dtype=torch.bfloat16, device="cuda")) == []


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA device: ``gpu(capability, archs)`` sets its compute capability and this build's archs;
    the tensors are fake (shapes and devices only), so no GPU is needed."""
    def pretend(capability: tuple[int, int], archs: str) -> torch.Tensor:
        monkeypatch.setattr(_cuda, "_capability", lambda index: capability)
        monkeypatch.setattr(_cuda, "_build_reasons", _cuda._build_reasons.__wrapped__)  # uncached
        monkeypatch.setattr(_ext, "build_info", lambda: {"with_cuda": True, "cuda_archs": archs})
        with FakeTensorMode():
            return torch.empty(1, device="cuda")
    return pretend


@pytest.mark.parametrize("capability,archs,cuda_reasons,triton_reasons", [
    ((7, 5), "8.0", ["needs compute capability 8.0+, got 7.5"], ["needs compute capability 9.0+, got 7.5"]),
    ((8, 6), "8.0", [], ["needs compute capability 9.0+, got 8.6"]),
    ((9, 0), "8.0", [("qbert._C has machine code for 8.0, none of which runs on compute capability 9.0; "
                      "rebuild with QBERT_CUDA_ARCHS including 9.0")], []),
    ((9, 0), "8.0;9.0a", [], []),
], ids=["sm75", "sm86", "sm90-no-code", "sm90"])
def test_min_capability_and_build_archs(gpu, capability, archs, cuda_reasons, triton_reasons):
    # A cuda row needs the build's floor (8.0) by default and machine code for the device; a triton row
    # needs what it declares and no qbert._C code.
    x = gpu(capability, archs)
    toy = Op("toy", lambda x: "reference", cuda=_toy_row("cuda"), triton=_toy_row("triton", min_capability=(9, 0)))
    assert toy.rows["cuda"].min_capability == _cuda.MIN_CAPABILITY
    assert toy.rows["cuda"].supports(x) == cuda_reasons
    assert toy.rows["triton"].supports(x) == triton_reasons


@pytest.mark.parametrize("rows,match", [
    ({"cpu": Row(lambda x: x)}, "the cpu row must name the torch.ops.qbert kernels it calls"),
    ({"triton": Row(kernel="toy_triton")}, "a triton row calls no qbert._C kernel"),
    ({"cuda": Row(kernel="toy_cuda", bf16_dot=True)}, "bf16_dot is a rule of the Triton interpreter; the cuda row"),
    ({"cpu": Row(kernel="toy_cpu", min_capability=(8, 0))}, "the cpu row never runs CUDA tensors"),
    ({"cuda": Row(kernel="toy_cuda", min_capability=(7, 0))}, r"every cuda row needs compute capability \(8, 0\)"),
], ids=["cpu-without-kernel", "triton-kernel", "bf16-dot-on-cuda", "cpu-capability", "cuda-below-floor"])
def test_declarations_a_backend_cannot_make_are_errors(rows, match):
    with pytest.raises(ValueError, match=f"toy: {match}"):
        Op("toy", lambda x: x, **rows)


@pytest.mark.parametrize("kernel", [(), ("int8_gemm_cpu", "quantize_per_token_cpu")], ids=["none", "two"])
def test_a_row_without_fn_calls_exactly_one_kernel(kernel):
    with pytest.raises(ValueError, match="a row without fn calls its kernel with the op's arguments"):
        Row(kernel=kernel)


def test_a_row_without_fn_calls_its_kernel_with_the_same_arguments():
    row = _registry.OPS["int8_gemm"].rows["cpu"]
    assert row.fn is None and row.kernels == ("int8_gemm_cpu",)
    a = torch.tensor([[1, -2, 3]], dtype=torch.int8)
    b = torch.tensor([[4, 5, 6], [-1, 0, 1]], dtype=torch.int8)
    assert row(a, b).tolist() == [[4 - 10 + 18, -1 + 3]]
