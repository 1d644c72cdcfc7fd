"""varlen_attention on every backend against the pure-PyTorch reference (scaled_dot_product_attention per
sequence).

Tier: same math in float. The error of a backend against the reference computed in float64 is at most
ERROR_FACTOR times that of the reference itself in float32 (torch's kernel, the same-dtype PyTorch path),
plus FLOAT_FLOOR for outputs that float32 represents exactly; the forced lower ISAs, which run torch's
kernel per sequence, are exact.
"""

from __future__ import annotations

import pytest
import torch

import qbert
from qbert.ops import varlen_attention
from qbert.ops.varlen_attention import varlen_attention_reference
from tests._backends import device_backends, forced_cpu_isa

NAME = "varlen_attention"
ERROR_FACTOR = 2.0
FLOAT_FLOOR = 1e-6
SCALE = 0.125

# (lengths, heads, head size): one sequence at BERT's shape, a batch of them, lengths around a 16-key
# vector and an 8-query block (with empty sequences), head sizes past a 64-wide tile, one not a multiple
# of 16 (torch's kernel on every ISA), MiniLM's 12 x 32.
CASES = [((128,), 12, 64), ((128,) * 3, 12, 64), ((1,), 1, 16), ((7, 0, 13, 1), 2, 16), ((17, 33, 129), 3, 32),
         ((257,), 2, 80), ((9, 16), 2, 48), ((5, 7), 3, 12), ((42, 30, 17, 9), 12, 32), ((0,), 2, 16)]


def _case_id(case) -> str:
    lengths, heads, d = case
    return f"L{'-'.join(map(str, lengths))}-h{heads}-d{d}"


def _inputs(lengths, heads, d, magnitude: float = 2.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    q, k, v = (torch.randn(rows, heads * d, generator=g) * magnitude for _ in range(3))
    return q, k, v, torch.tensor(lengths, dtype=torch.int64)


def _assert_same_math(out, q, k, v, lengths, heads, scaling=SCALE):
    if not out.numel():  # no rows at all
        assert out.shape == q.shape
        return
    exact = varlen_attention_reference(q.double(), k.double(), v.double(), lengths, heads, scaling)
    torch_error = (varlen_attention_reference(q, k, v, lengths, heads, scaling).double() - exact).abs().max()
    error = (out.double() - exact).abs().max()
    assert error <= ERROR_FACTOR * torch_error + FLOAT_FLOOR, (error.item(), torch_error.item())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device,backend", device_backends(NAME, reference=False))
def test_against_reference(device, backend, case):
    lengths, heads, d = case
    q, k, v, lens = _inputs(lengths, heads, d)
    with qbert.use_backend(backend):
        out = varlen_attention(q, k, v, lens, heads, SCALE)
    assert out.shape == q.shape and out.dtype == torch.float32
    _assert_same_math(out, q, k, v, lens, heads)


@pytest.mark.parametrize("magnitude", [8.0, 30.0], ids=["peaked", "saturated"])
def test_peaked_softmax(magnitude):
    # Scores of hundreds: most probabilities underflow (the kernel's exp flushes below e^-87 to 0), the row
    # max dominates; the result stays finite and within the tier.
    q, k, v, lens = _inputs((128, 31), 4, 64, magnitude)
    with qbert.use_backend("cpu"):
        out = varlen_attention(q, k, v, lens, 4, SCALE)
    assert out.isfinite().all()
    _assert_same_math(out, q, k, v, lens, 4)


def test_negative_scaling():
    q, k, v, lens = _inputs((40, 9), 2, 32)
    with qbert.use_backend("cpu"):
        out = varlen_attention(q, k, v, lens, 2, -SCALE)
    _assert_same_math(out, q, k, v, lens, 2, -SCALE)


def test_sequences_do_not_see_each_other():
    # Changing one sequence's keys and values leaves every other sequence's output unchanged, bit for bit.
    q, k, v, lens = _inputs((20, 33, 7), 2, 32)
    with qbert.use_backend("cpu"):
        out = varlen_attention(q, k, v, lens, 2, SCALE)
        k2, v2 = k.clone(), v.clone()
        k2[20:53] += 1.0
        v2[20:53] -= 3.0
        changed = varlen_attention(q, k2, v2, lens, 2, SCALE)
    assert torch.equal(out[:20], changed[:20]) and torch.equal(out[53:], changed[53:])
    assert not torch.equal(out[20:53], changed[20:53])


def test_thread_count_does_not_change_the_bits():
    # Each (sequence, head, query chunk) is one thread's work in a fixed order: the split changes with the
    # thread count, the arithmetic does not.
    q, k, v, lens = _inputs((128, 5, 64), 12, 64)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with qbert.use_backend("cpu"):
                outs.append(varlen_attention(q, k, v, lens, 12, SCALE))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.fixture(params=("scalar", "avx2", "avx_vnni"))
def lower_isa(request):
    with forced_cpu_isa(request.param) as name:
        yield name


@pytest.mark.parametrize("case", CASES[:4], ids=_case_id)
def test_without_avx512_torch_runs_each_sequence(lower_isa, case):
    # Tier: exact. Below AVX-512 the cpu row is the reference itself, one torch call per sequence.
    lengths, heads, d = case
    q, k, v, lens = _inputs(lengths, heads, d)
    with qbert.use_backend("cpu"):
        out = varlen_attention(q, k, v, lens, heads, SCALE)
    assert torch.equal(out, varlen_attention_reference(q, k, v, lens, heads, SCALE))


@pytest.mark.parametrize("change,error,match", [
    ("dtype", TypeError, "q must be float32"),
    ("shape", ValueError, "one shape"),
    ("ndim", ValueError, "must be 2-D"),
    ("lengths_dtype", TypeError, "lengths must be int64"),
    ("negative", ValueError, "non-negative"),
    ("sum", ValueError, r"sum to the rows of q \(T=12\)"),
    ("heads", ValueError, "divide the width A=32"),
    ("strided", ValueError, "k must be contiguous"),
])
def test_bad_input_is_named(change, error, match):
    q, k, v, lens = _inputs((5, 7), 2, 16)
    heads = 2
    if change == "dtype":
        q = q.half()
    elif change == "shape":
        v = v[:, :16].contiguous()
    elif change == "ndim":
        q, k, v = (t.view(12, 2, 16) for t in (q, k, v))
    elif change == "lengths_dtype":
        lens = lens.int()
    elif change == "negative":
        lens = torch.tensor([13, -1])
    elif change == "sum":
        lens = torch.tensor([5, 8])
    elif change == "heads":
        heads = 3
    elif change == "strided":
        k = torch.randn(32, 12).t()
    with pytest.raises(error, match=match):
        varlen_attention(q, k, v, lens, heads, SCALE)


def test_opcheck():
    torch.library.opcheck(torch.ops.qbert.varlen_attention.default, (*_inputs((9, 16), 2, 32), 2, SCALE))


def test_compile_fullgraph():
    q, k, v, lens = _inputs((9, 16), 2, 32)
    compiled = torch.compile(lambda q, k, v, lens: varlen_attention(q * 2, k, v, lens, 2, SCALE), fullgraph=True,
                             backend="eager")
    with qbert.use_backend("cpu"):
        torch.testing.assert_close(compiled(q, k, v, lens), varlen_attention(q * 2, k, v, lens, 2, SCALE),
                                   rtol=0, atol=0)
