"""GPU cases of the cuda backend of the int8 GEMM family that the generic op tests do not reach.

tests/ops/test_int8_gemm.py, test_int8_linear.py and test_int8_linear_requant.py already run the cuda row
on their generic shapes. Here: every tile configuration the plan can pick (M from 1 to 16384, so the
small-M, mma.sync and, on sm_90a, wgmma kernels and their persistent loops all run), ragged and
unaligned operands (the launcher's zero-padded copy), the requantizing epilogue's cross-tile row max at
BERT shapes, CUDA-graph capture, the fused BERT chain against the unfused one, and compute-sanitizer runs.
Tiers: exact for int32 results; same math in float for the epilogues (as in the generic tests).
"""

from __future__ import annotations

import copy

import pytest
import torch

import qbert
from qbert.ops import int8_gemm, int8_linear, int8_linear_requant
from qbert.ops._registry import backend_unavailable
from qbert.ops.int8_gemm import int8_gemm_reference
from qbert.ops.int8_linear import int8_linear_reference
from qbert.ops.int8_linear_requant import int8_linear_requant_reference
from tests._backends import int8_linear_operands
from tests.cuda import _nvcc


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    reasons = backend_unavailable("cuda")
    return "; ".join(reasons) if reasons else None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

# Token counts from one token to a long batch: each side of every tile-height choice in
# csrc/cuda/int8_gemm/int8_gemm_kernel.cuh's plan, and enough row blocks for several persistent iterations.
M_SWEEP = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 1000, 4096, 16384)
BERT_NK = ((768, 768), (2304, 768), (3072, 768), (768, 3072), (1024, 1024), (4096, 1024), (1024, 4096))


def _operands(m, n, k, bias_dtype=torch.float16):
    return int8_linear_operands(m, n, k, "cuda", bias_dtype)


@pytest.mark.parametrize("m", M_SWEEP)
@pytest.mark.parametrize("n,k", [(768, 768), (3072, 768), (13, 48), (257, 1040)], ids=lambda v: str(v))
def test_int8_gemm_exact_every_config(m, n, k):
    x_q, _, w_q, _, _ = _operands(m, n, k)
    with qbert.use_backend("cuda"):
        out = int8_gemm(x_q, w_q)
    assert torch.equal(out, int8_gemm_reference(x_q, w_q))


@pytest.mark.parametrize("m", [4096, 8192])
@pytest.mark.parametrize("n,k", BERT_NK, ids=lambda v: str(v))
def test_int8_gemm_exact_bert_shapes(m, n, k):
    x_q, _, w_q, _, _ = _operands(m, n, k)
    with qbert.use_backend("cuda"):
        assert torch.equal(int8_gemm(x_q, w_q), int8_gemm_reference(x_q, w_q))


def test_int8_gemm_square_8192():
    x_q, _, w_q, _, _ = _operands(8192, 8192, 8192)
    with qbert.use_backend("cuda"):
        assert torch.equal(int8_gemm(x_q, w_q), int8_gemm_reference(x_q, w_q))


@pytest.mark.parametrize("k", [1, 7, 31, 100, 769])
def test_ragged_k_takes_the_padded_copy(k):
    x_q, _, w_q, _, _ = _operands(37, 41, k)
    with qbert.use_backend("cuda"):
        assert torch.equal(int8_gemm(x_q, w_q), int8_gemm_reference(x_q, w_q))


def test_unaligned_view():
    # A row-aligned K but a base pointer 1 byte into the storage: the launcher must not assume alignment.
    x_q, _, w_q, _, _ = _operands(65, 96, 128)
    storage = torch.empty(65 * 128 + 1, dtype=torch.int8, device="cuda")
    view = storage[1:].view(65, 128)
    view.copy_(x_q)
    with qbert.use_backend("cuda"):
        assert torch.equal(int8_gemm(view, w_q), int8_gemm_reference(x_q, w_q))


@pytest.mark.parametrize("m", [1, 17, 129, 4096])
@pytest.mark.parametrize("n,k", [(768, 768), (3072, 768), (769, 3072)], ids=lambda v: str(v))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_int8_linear_epilogues(m, n, k, out_dtype, activation):
    # Tier: same math in float (the epilogue's float32 ops are the reference's, in its order; erff may
    # differ from torch's by an ulp).
    args = _operands(m, n, k)
    with qbert.use_backend("cuda"):
        out = int8_linear(*args, out_dtype=out_dtype, activation=activation)
    torch.testing.assert_close(out, int8_linear_reference(*args, out_dtype, activation))


@pytest.mark.parametrize("m", [1, 16, 33, 128, 1000, 4096, 16384])
@pytest.mark.parametrize("n,k", [(3072, 768), (4096, 1024), (768, 768), (257, 96)], ids=lambda v: str(v))
def test_requant_row_max_across_column_tiles(m, n, k):
    # Each output row spans several column tiles (CTAs); the per-token scale must be the max over all.
    # A planted outlier in the last column makes any tile-local max visibly wrong.
    x_q, x_scale, w_q, w_scale, bias = _operands(m, n, k)
    bias[-1] = 1e3
    with qbert.use_backend("cuda"):
        y_q, y_scale = int8_linear_requant(x_q, x_scale, w_q, w_scale, bias, activation="gelu")
    ref_q, ref_scale = int8_linear_requant_reference(x_q, x_scale, w_q, w_scale, bias, "gelu")
    torch.testing.assert_close(y_scale, ref_scale)
    assert (y_q.int() - ref_q.int()).abs().max().item() <= 1


def test_requant_is_deterministic_and_reusable():
    # The arrival counters are reset per call: back-to-back calls (and another shape in between) agree.
    args = _operands(4096, 3072, 768)
    with qbert.use_backend("cuda"):
        first = int8_linear_requant(*args, activation="gelu")
        int8_linear_requant(*_operands(300, 768, 768), activation="none")
        second = int8_linear_requant(*args, activation="gelu")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cuda_graph_capture():
    args = _operands(512, 3072, 768)
    with qbert.use_backend("cuda"):
        expected = int8_linear_requant(*args, activation="gelu")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            int8_linear_requant(*args, activation="gelu")  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = int8_linear_requant(*args, activation="gelu")
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_fused_bert_chain_matches_unfused(dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=4)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval().to("cuda", dtype)
    fused = qbert.quantize(copy.deepcopy(model), "w8a8")
    unfused = qbert.quantize(copy.deepcopy(model), "w8a8", fuse=False)
    ids = torch.randint(0, config.vocab_size, (8, 128), device="cuda")
    with torch.no_grad():
        a = fused(input_ids=ids).last_hidden_state.float()
        b = unfused(input_ids=ids).last_hidden_state.float()
        ref = model(input_ids=ids).last_hidden_state.float()
    cos = torch.nn.functional.cosine_similarity
    assert cos(a.flatten(1), b.flatten(1)).min().item() > 0.999
    assert cos(a.flatten(1), ref.flatten(1)).mean().item() > 0.99


_SANITIZED = """
import torch, qbert
from qbert.ops import add_layernorm_quantize, int8_gemm, int8_linear, int8_linear_requant, quantize_per_token
g = torch.Generator().manual_seed(0)
with qbert.use_backend("cuda"):
    for m, n, k in ((1, 13, 7), (17, 96, 128), (129, 257, 1040), (300, 769, 768)):
        x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g).cuda()
        w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g).cuda()
        x_s, w_s = torch.rand(m, generator=g).cuda() / 100, torch.rand(n, generator=g).cuda() / 100
        bias = torch.randn(n, generator=g).cuda().half()
        int8_gemm(x_q, w_q)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            int8_linear(x_q, x_s, w_q, w_s, bias, out_dtype=dtype, activation="gelu")
        int8_linear_requant(x_q, x_s, w_q, w_s, bias, activation="gelu")
        x = torch.randn(m, k, generator=g).cuda().half()
        quantize_per_token(x)
        add_layernorm_quantize(x, x, torch.ones(k, device="cuda"), torch.zeros(k, device="cuda"), 1e-12)
    torch.cuda.synchronize()
"""


@pytest.mark.slow
@pytest.mark.skipif(_nvcc.SANITIZER is None, reason="compute-sanitizer not found (PATH, CUDA_HOME)")
@pytest.mark.parametrize("sanitizer_tool", _nvcc.SANITIZER_TOOLS)
def test_compute_sanitizer(sanitizer_tool):
    # Small shapes: the requantizing kernel's grid then fits on the GPU however the instrumentation
    # changes occupancy, so its row-block wait cannot be starved.
    _nvcc.assert_sanitizer_clean(sanitizer_tool, _SANITIZED)
