import pytest
import torch

import qbert
from qbert.ops import int8_gemm
from qbert.ops.int8_gemm import int8_gemm_reference
from qbert.quant.int8 import INT8_GEMM_MAX_K
from tests._backends import device_backends, int8_codes

# Ragged sizes around tile edges plus BERT-base projections (M = tokens).
SHAPES = [(1, 1, 1), (1, 7, 13), (7, 13, 129), (13, 257, 7), (129, 13, 257), (257, 129, 64),
          (128, 768, 768), (16, 3072, 768), (33, 768, 3072)]


@pytest.mark.parametrize("device,backend", device_backends("int8_gemm", reference=False))
@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda v: str(v))
def test_exact_against_reference(device, backend, m, n, k):
    # Tier: exact. The reference computes in float64, where every partial sum is an exact integer.
    g = torch.Generator().manual_seed(m * 10007 + n * 101 + k)
    a, b = int8_codes(m, k, generator=g).to(device), int8_codes(n, k, generator=g).to(device)
    with qbert.use_backend(backend):
        c = int8_gemm(a, b)
    assert c.dtype == torch.int32 and c.shape == (m, n)
    torch.testing.assert_close(c, int8_gemm_reference(a, b), rtol=0, atol=0)


def test_reference_is_exact_at_the_extremes():
    # All -128: every product is 2**14, the largest magnitude an int8 product can have.
    k = 1024
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    assert torch.equal(int8_gemm_reference(a, b), torch.full((2, 3), 128 * 128 * k, dtype=torch.int32))


def test_extremes_exact_on_default_backend():
    a = torch.tensor([[-128, 127, -128, 127]], dtype=torch.int8)
    b = torch.tensor([[-128, -128, 127, 127], [127, 127, 127, 127]], dtype=torch.int8)
    expected = torch.tensor([[128 * 128 - 127 * 128 - 128 * 127 + 127 * 127, -127 * 128 * 2 + 127 * 127 * 2]])
    assert torch.equal(int8_gemm(a, b), expected.to(torch.int32))


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    torch.library.opcheck(torch.ops.qbert.int8_gemm.default,
                          (int8_codes(7, 64, generator=g), int8_codes(13, 64, generator=g)))


def test_compile_fullgraph():
    g = torch.Generator().manual_seed(1)
    a, b = int8_codes(9, 32, generator=g), int8_codes(5, 32, generator=g)
    compiled = torch.compile(lambda a, b: int8_gemm(a, b) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(a, b), int8_gemm_reference(a, b) * 2)


@pytest.mark.parametrize("a,b,error,match", [
    (torch.zeros(7, 64), torch.zeros(13, 64, dtype=torch.int8), TypeError, "int8_gemm: a must be int8, got float32"),
    (torch.zeros(7, 64, dtype=torch.int8), torch.zeros(13, 64, dtype=torch.int32), TypeError, "b must be int8"),
    (torch.zeros(7, 64, dtype=torch.int8), torch.zeros(13, 65, dtype=torch.int8), ValueError,
     r"K mismatch: a is \[M=7, K=64\], b is \[N=13, K=65\]"),
    (torch.zeros(2, 7, 64, dtype=torch.int8), torch.zeros(13, 64, dtype=torch.int8), ValueError, "a must be 2-D"),
    (torch.zeros(64, 7, dtype=torch.int8).T, torch.zeros(13, 64, dtype=torch.int8), ValueError,
     "a must be contiguous"),
    (torch.zeros(7, 0, dtype=torch.int8), torch.zeros(13, 0, dtype=torch.int8), ValueError, "K.*at least 1"),
    (torch.zeros(7, 64, dtype=torch.int8), torch.zeros(13, 64, dtype=torch.int8, device="meta"), ValueError,
     "one device"),
], ids=["dtype-a", "dtype-b", "k-mismatch", "ndim", "contiguity", "empty-k", "device"])
def test_errors(a, b, error, match):
    with pytest.raises(error, match=match):
        int8_gemm(a, b)


def test_k_limit_is_checked():
    k = INT8_GEMM_MAX_K + 1
    a = torch.zeros(1, k, dtype=torch.int8)
    with pytest.raises(ValueError, match=f"K={k} exceeds {INT8_GEMM_MAX_K}"):
        int8_gemm(a, a)
