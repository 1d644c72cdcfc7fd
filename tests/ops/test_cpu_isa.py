"""The cpu backend's C++ ops on every instruction set this CPU can run (AMX-INT8, AVX512-VNNI, AVX-VNNI,
AVX2, scalar), each forced with qbert._C.set_cpu_isa, against the pure-PyTorch references.

Tolerance tiers: exact for int8_gemm and quantize_per_token (integer results; the reference fixes the
rounding rule); for int8_linear one unit in the last place of the output dtype, relative to the row's
scale (the kernels keep the reference's float op order, so they are in fact bit-exact today).
"""

from __future__ import annotations

import pytest
import torch

from qbert import _ext
from qbert.ops.int8_gemm import int8_gemm_reference
from qbert.ops.int8_linear import int8_linear_reference
from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.quant.int8 import INT8_GEMM_MAX_K, INT8_QMAX
from tests._backends import forced_cpu_isa

pytestmark = pytest.mark.skipif(bool(_ext.load_error()), reason="; ".join(_ext.load_error()) or "loaded")

ISAS = ("scalar", "avx2", "avx_vnni", "avx512_vnni", "amx_int8")
INT8_MIN = -128

# Sizes just past a tile (the AVX-512 panel is 6 x 64, the 256-bit one 6 x 16, k-groups of 4 and 64)
# and primes, mixed so that M, N and K each take the small and the ragged values.
ODD_SHAPES = [(1, 1, 1), (1, 257, 129), (7, 13, 257), (13, 7, 1), (7, 7, 7), (129, 257, 13), (257, 129, 7),
              (257, 1, 257), (129, 13, 129), (13, 129, 7)]
BERT_SHAPES = [(128, 768, 768), (16, 3072, 768), (33, 768, 3072)]
# The AMX tile kernel's shapes (K a multiple of 64, N of 16; others go to the AVX-512 kernels): the fewest
# rows it takes, half blocks of 16 columns and of 16 rows, and M past one chunk of packed rows at K = 3072.
AMX_SHAPES = [(8, 16, 64), (17, 48, 64), (40, 80, 192), (100, 2304, 768), (400, 32, 3072)]
# An f32 output past 2 MiB, which the AVX-512 and AMX kernels write with non-temporal stores (N = 784: a
# ragged last 48-column panel and a last 16-column AMX block).
STREAMED_SHAPES = [(680, 784, 64)]
SHAPES = ODD_SHAPES + BERT_SHAPES + AMX_SHAPES + STREAMED_SHAPES
# The largest K the AMX kernel takes (a multiple of 64 within INT8_GEMM_MAX_K), at its smallest tile shape.
AMX_MAX_K = INT8_GEMM_MAX_K // 64 * 64
AMX_MIN_ROWS, AMX_TILE_COLS = 8, 16
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BIASES = (None, torch.float32, torch.float16, torch.bfloat16)


def _shape_id(shape) -> str:
    return "M{}-N{}-K{}".format(*shape)


def _dtype_id(dtype) -> str:
    return "nobias" if dtype is None else str(dtype).removeprefix("torch.")


@pytest.fixture(params=ISAS)
def isa(request):
    """Forces one ISA for the test, skipping ISAs this CPU lacks; restores the automatic choice after."""
    with forced_cpu_isa(request.param) as name:
        yield name


def _int8_operands(M: int, N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes over the whole int8 range, with -128 rows / columns and all-zero rows planted."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(INT8_MIN, INT8_QMAX + 1, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(INT8_MIN, INT8_QMAX + 1, (N, K), dtype=torch.int8, generator=g)
    a[0] = INT8_MIN
    b[:, 0] = INT8_MIN
    if M > 1:
        a[-1] = 0
    if N > 1:
        b[-1] = 0
    return a, b


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_int8_gemm_exact(isa, shape):
    a, b = _int8_operands(*shape)
    torch.testing.assert_close(torch.ops.qbert.int8_gemm_cpu(a, b), int8_gemm_reference(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("K", [INT8_GEMM_MAX_K], ids=lambda k: f"K{k}")
def test_int8_gemm_extreme_sums(isa, K):
    """Every product at its extreme: the largest sum an int32 can hold exactly (-128 * -128 * K), and
    the most negative (-128 * 127 * K); the VNNI sign trick wraps on the way and must come back."""
    a = torch.full((2, K), INT8_MIN, dtype=torch.int8)
    b = torch.full((3, K), INT8_MIN, dtype=torch.int8)
    b[1] = INT8_QMAX
    b[2, ::2] = INT8_QMAX
    torch.testing.assert_close(torch.ops.qbert.int8_gemm_cpu(a, b), int8_gemm_reference(a, b), rtol=0, atol=0)


def test_int8_gemm_extreme_sums_on_tiles(isa):
    """The extreme sums at a shape the AMX kernel takes (the other ISAs run it too)."""
    a = torch.full((AMX_MIN_ROWS, AMX_MAX_K), INT8_MIN, dtype=torch.int8)
    b = torch.full((AMX_TILE_COLS, AMX_MAX_K), INT8_MIN, dtype=torch.int8)
    b[1] = INT8_QMAX
    b[2, ::2] = INT8_QMAX
    a[1] = INT8_QMAX
    torch.testing.assert_close(torch.ops.qbert.int8_gemm_cpu(a, b), int8_gemm_reference(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("bias_dtype", BIASES, ids=_dtype_id)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_int8_linear(isa, shape, out_dtype, bias_dtype):
    M, N, K = shape
    x_q, w_q = _int8_operands(M, N, K, seed=1)
    g = torch.Generator().manual_seed(2)
    x_scale = torch.rand(M, generator=g) / INT8_QMAX
    w_scale = torch.rand(N, generator=g) / INT8_QMAX
    bias = None if bias_dtype is None else torch.randn(N, generator=g).to(bias_dtype)
    out = torch.ops.qbert.int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    ref = int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    eps = torch.finfo(out_dtype).eps  # one ulp, relative
    atol = eps * ref.float().abs().max().item()  # ... and of the output's scale, for values near 0
    torch.testing.assert_close(out, ref, rtol=eps, atol=atol)


def _quantize_input(M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g) * 3
    if M > 1:
        x[-1] = 0  # all-zero row: scale 1, codes 0
    # A row whose scale is exactly 1 (amax = 127), with quotients on .5: round half to even decides them.
    ties = torch.tensor([float(INT8_QMAX), 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5])
    n = min(K, ties.numel())
    x[0, :n] = ties[:n]
    if n < K:
        x[0, n:] = 0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (13, 257), (129, 7), (257, 129), (128, 768), (33, 3072)],
                         ids=lambda s: "M{}-K{}".format(*s))
def test_quantize_per_token_exact(isa, shape, dtype):
    x = _quantize_input(*shape, dtype)
    q, scale = torch.ops.qbert.quantize_per_token_cpu(x)
    q_ref, scale_ref = quantize_per_token_reference(x)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


# K = 201: positions in the vector loops of the AVX-512 (4 x 16 lanes a step) and AVX2 (8 lanes) paths and
# in both paths' tails (the last element).
NONFINITE_K = 201
NONFINITE_POSITIONS = (0, 63, 64, 150, NONFINITE_K - 1)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=_dtype_id)
@pytest.mark.parametrize("value", (float("nan"), float("inf"), float("-inf")), ids=("nan", "+inf", "-inf"))
def test_quantize_per_token_nonfinite_rows(isa, value, dtype):
    # Exact: one row per position holds the value: scale NaN, codes 0; the finite last row as the reference.
    x = _quantize_input(len(NONFINITE_POSITIONS) + 1, NONFINITE_K, dtype)
    for row, position in enumerate(NONFINITE_POSITIONS):
        x[row, position] = value
    q, scale = torch.ops.qbert.quantize_per_token_cpu(x)
    q_ref, scale_ref = quantize_per_token_reference(x)
    assert scale[:-1].isnan().all() and not q[:-1].any() and scale[-1].isfinite()
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# (257, 13, 129): one panel of N, so the work is split over M; the BERT shape splits over N.
@pytest.mark.parametrize("shape", [(257, 13, 129), (128, 768, 768), (5, 300, 200)], ids=_shape_id)
def test_thread_count_does_not_change_results(isa, shape, restore_threads):
    M, N, K = shape
    a, b = _int8_operands(M, N, K, seed=4)
    x_scale, w_scale, bias = torch.rand(M), torch.rand(N), torch.randn(N)
    x = torch.randn(M, K)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append((torch.ops.qbert.int8_gemm_cpu(a, b),
                        torch.ops.qbert.int8_linear_cpu(a, x_scale, b, w_scale, bias, torch.float32),
                        *torch.ops.qbert.quantize_per_token_cpu(x)))
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown ISA 'avx9000'; expected 'auto' or one of scalar"):
        _ext.module().set_cpu_isa("avx9000")


@pytest.mark.parametrize("name", ISAS)
def test_set_cpu_isa_rejects_what_the_cpu_lacks(name):
    C = _ext.module()
    if name in C.cpu_isas():
        pytest.skip(f"this CPU can run {name}, so forcing it is allowed")
    with pytest.raises(ValueError, match=f"this CPU cannot run '{name}'"):
        C.set_cpu_isa(name)


def test_auto_restores_the_best_isa():
    C = _ext.module()
    C.set_cpu_isa("scalar")
    C.set_cpu_isa("auto")
    assert C.cpu_isa() == C.cpu_isas()[-1]


@pytest.mark.parametrize(("call", "match"), [
    (lambda: torch.ops.qbert.int8_gemm_cpu(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.int8)),
     "int8_gemm_cpu: a must be Char"),
    (lambda: torch.ops.qbert.int8_gemm_cpu(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(3, 5, dtype=torch.int8)),
     "int8_gemm_cpu: K mismatch"),
    (lambda: torch.ops.qbert.int8_gemm_cpu(torch.zeros(4, 2, dtype=torch.int8).T, torch.zeros(3, 4, dtype=torch.int8)),
     "int8_gemm_cpu: a must be contiguous"),
    (lambda: torch.ops.qbert.int8_linear_cpu(torch.zeros(2, 4, dtype=torch.int8), torch.ones(3),
                                             torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), None, torch.float32),
     r"int8_linear_cpu: x_scale must have shape \[M=2\]"),
    (lambda: torch.ops.qbert.int8_linear_cpu(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2),
                                             torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), None, torch.int32),
     "int8_linear_cpu: out_dtype must be Float, Half or BFloat16"),
    (lambda: torch.ops.qbert.quantize_per_token_cpu(torch.zeros(2, 4, dtype=torch.float64)),
     "quantize_per_token_cpu: x must be Float, Half or BFloat16"),
    (lambda: torch.ops.qbert.int8_gemm_cpu(torch.zeros(1, INT8_GEMM_MAX_K + 1, dtype=torch.int8),
                                           torch.zeros(1, INT8_GEMM_MAX_K + 1, dtype=torch.int8)),
     rf"int8_gemm_cpu: K must be in \[1, {INT8_GEMM_MAX_K}\] \(beyond it an int32 accumulator can overflow\)"),
    (lambda: torch.ops.qbert.int8_linear_cpu(torch.zeros(1, INT8_GEMM_MAX_K + 1, dtype=torch.int8), torch.ones(1),
                                             torch.zeros(1, INT8_GEMM_MAX_K + 1, dtype=torch.int8), torch.ones(1),
                                             None, torch.float32),
     rf"int8_linear_cpu: K must be in \[1, {INT8_GEMM_MAX_K}\]"),
    (lambda: torch.ops.qbert.int8_linear_cpu(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2),
                                             torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), torch.zeros(3, 1),
                                             torch.float32),
     r"int8_linear_cpu: bias must have shape \[N=3\]"),
    (lambda: torch.ops.qbert.int8_linear_cpu(torch.zeros(2, 4, dtype=torch.int8), torch.ones(4)[::2],
                                             torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), None, torch.float32),
     "int8_linear_cpu: every tensor must be contiguous"),
    (lambda: torch.ops.qbert.quantize_per_token_cpu(torch.zeros(2, 0)),
     r"quantize_per_token_cpu: x must have K >= 1"),
    (lambda: torch.ops.qbert.quantize_per_token_cpu(torch.zeros(8, 2).T),
     "quantize_per_token_cpu: x must be contiguous"),
], ids=["gemm-dtype", "gemm-k-mismatch", "gemm-layout", "linear-x_scale-shape", "linear-out_dtype", "quant-dtype",
        "gemm-k-limit", "linear-k-limit", "linear-bias-shape", "linear-layout", "quant-empty-k", "quant-layout"])
def test_cpp_checks_name_the_op_and_constraint(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
