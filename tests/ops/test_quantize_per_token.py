import pytest
import torch

import qbert
from qbert.ops import quantize_per_token
from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.quant.int8 import INT8_QMAX
from tests._backends import device_backends

SHAPES = [(1, 1), (7, 13), (129, 257), (3, 5, 768), (128, 3072)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device,backend", device_backends("quantize_per_token", reference=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exact_against_reference(device, backend, dtype, shape):
    # Tier: exact (codes and scales), including an all-zero row.
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 10).to(dtype)
    x.view(-1, shape[-1])[0] = 0
    x = x.to(device)
    with qbert.use_backend(backend):
        q, scale = quantize_per_token(x)
    q_ref, scale_ref = quantize_per_token_reference(x.reshape(-1, shape[-1]))
    assert q.shape == x.shape and scale.shape == x.shape[:-1]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(q.reshape(-1, shape[-1]), q_ref, rtol=0, atol=0)
    torch.testing.assert_close(scale.reshape(-1), scale_ref, rtol=0, atol=0)
    assert scale.isfinite().all()


@pytest.mark.parametrize("device,backend", device_backends("quantize_per_token"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_round_half_to_even(device, backend, dtype):
    # amax = 127 gives scale 1, so x / scale hits the .5 ties exactly.
    x = torch.tensor([[INT8_QMAX, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]], dtype=dtype, device=device)
    with qbert.use_backend(backend):
        q, scale = quantize_per_token(x)
    assert scale.item() == 1.0
    assert q.tolist() == [[INT8_QMAX, 0, 2, 2, 0, -2, -2, 4]]


NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
# K = 129 and positions in the first vector, in a long vector loop and in the tail of the row.
NONFINITE_K = 129
POSITIONS = (0, 70, 128)


@pytest.mark.parametrize("device,backend", device_backends("quantize_per_token"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("position", POSITIONS, ids=lambda p: f"at{p}")
@pytest.mark.parametrize("value", NONFINITE.values(), ids=NONFINITE.keys())
def test_nonfinite_row_gets_nan_scale_and_zero_codes(device, backend, dtype, position, value):
    # Exact: row 2 of 5 holds a NaN or an infinity: scale NaN, codes 0 (so it dequantizes to NaN); the
    # other rows are bit-identical to the all-finite result, and every other backend equals the reference.
    g = torch.Generator().manual_seed(position)
    x = (torch.randn(5, NONFINITE_K, generator=g) * 3).to(dtype).to(device)
    with qbert.use_backend(backend):
        q_clean, scale_clean = quantize_per_token(x)
        x[2, position] = value
        q, scale = quantize_per_token(x)
    others = [0, 1, 3, 4]
    assert torch.equal(q[others], q_clean[others]) and torch.equal(scale[others], scale_clean[others])
    assert scale[2].isnan() and not q[2].any() and (q[2].float() * scale[2]).isnan().all()
    if backend == "reference":
        return
    q_ref, scale_ref = quantize_per_token_reference(x)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device,backend", device_backends("quantize_per_token"))
def test_row_whose_scale_underflows_gets_unit_scale_and_zero_codes(device, backend):
    # float32 subnormals so small that amax / 127 rounds to 0: scale 1 and codes 0, as an all-zero row.
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-20
    x = torch.tensor([[tiny, -tiny, 0.0, tiny / 2], [1.0, 2.0, 3.0, 127.0]], device=device)
    assert (x[0].abs().amax() / 127).item() == 0
    with qbert.use_backend(backend):
        q, scale = quantize_per_token(x)
    assert scale.tolist() == [1.0, 1.0] and q.tolist() == [[0, 0, 0, 0], [1, 2, 3, 127]]


def test_zero_row_gives_finite_scale_and_zero_codes():
    q, scale = quantize_per_token(torch.zeros(3, 16))
    assert torch.equal(q, torch.zeros(3, 16, dtype=torch.int8))
    assert scale.isfinite().all() and (scale > 0).all()


def test_dequantized_error_is_within_half_a_step():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    q, scale = quantize_per_token(x)
    assert ((q.float() * scale[:, None] - x).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


def test_opcheck():
    torch.library.opcheck(torch.ops.qbert.quantize_per_token.default, (torch.randn(5, 3, 32),))


def test_compile_fullgraph():
    x = torch.randn(4, 48)
    compiled = torch.compile(lambda x: quantize_per_token(x * 2), fullgraph=True, backend="aot_eager")
    q, scale = compiled(x)
    q_ref, scale_ref = quantize_per_token_reference(x * 2)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


@pytest.mark.parametrize("x,error,match", [
    (torch.zeros(4, 8, dtype=torch.int32), TypeError, "quantize_per_token: x must be float32 or float16 or bfloat16"),
    (torch.zeros(()), ValueError, "at least 1 dims"),
    (torch.zeros(4, 0), ValueError, "at least 1"),
    (torch.zeros(8, 4).T, ValueError, "x must be contiguous"),
], ids=["dtype", "scalar", "empty-k", "contiguity"])
def test_errors(x, error, match):
    with pytest.raises(error, match=match):
        quantize_per_token(x)
