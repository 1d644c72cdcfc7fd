import math

import pytest
import torch

import qbert
from qbert.ops import block_sparse_attention
from qbert.ops._registry import OPS, triton_interpreter
from qbert.ops.block_sparse_attention import (
    BACKWARD_NAME,
    NAME,
    attention_reference,
    block_sparse_attention_op,
    token_mask,
)
from qbert.sparse import BlockLayout
from tests._backends import assert_error_within, device_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_SIZES = [16, 32, 64, 128]
HEAD_DIMS = [32, 64, 128]
# Per block size, a length that ends mid-block (the ragged last block) and one that ends on a block edge.
RAGGED_SEQ = {16: 101, 32: 77, 64: 129, 128: 200}
EVEN_SEQ = {16: 96, 32: 64, 64: 128, 128: 128}
BATCH, HEADS = 2, 2


def _id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else str(value)


def _skip_interpreter_bf16(device, backend, dtype):
    if (device, backend, dtype) == ("cpu", "triton", torch.bfloat16):
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (the op refuses it there)")


def _layout(heads, seq, block_size, seed, density=0.5):
    """A random per-head layout; head 0's first query block sees nothing (its rows output zeros)."""
    g = torch.Generator().manual_seed(seed)
    blocks = math.ceil(seq / block_size)
    mask = torch.rand(heads, blocks, blocks, generator=g) < density
    mask |= torch.eye(blocks, dtype=torch.bool)
    mask[0, 0] = False
    return BlockLayout(mask, block_size)


def _padding(batch, seq):
    """Batch 0 has only real keys; batch 1 pads its last third (Hugging Face's attention_mask: True = real)."""
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1:, seq - seq // 3:] = False
    return mask


def _qkv(batch, heads, seq, head_dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, head_dim, generator=g).to(dtype).to(device) for _ in range(3)]


def _allowed(layout, seq, key_padding_mask):
    counts, indices = layout.csr("cpu")
    return token_mask(counts, indices, layout.block_size, seq, key_padding_mask)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("even", [False, True], ids=["ragged", "even"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=lambda b: f"block{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_forward_against_reference(device, backend, dtype, block_size, head_dim, even):
    # Tier: same math in float: error against float64 attention at most 2x that of PyTorch computing
    # the same masked attention in the input dtype (flash-attention's rule).
    _skip_interpreter_bf16(device, backend, dtype)
    seq = (EVEN_SEQ if even else RAGGED_SEQ)[block_size]
    seed = block_size * 7 + head_dim + seq
    layout = _layout(HEADS, seq, block_size, seed)
    kpm = _padding(BATCH, seq)
    q, k, v = _qkv(BATCH, HEADS, seq, head_dim, dtype, device, seed)
    with qbert.use_backend(backend):
        out = block_sparse_attention(q, k, v, layout, kpm.to(device))
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    allowed = _allowed(layout, seq, kpm)
    scale = head_dim ** -0.5
    truth, _ = attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), allowed, scale)
    same_dtype, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), allowed, scale)
    assert_error_within(out.cpu(), truth, same_dtype)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=lambda b: f"block{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_gradients_against_autograd(device, backend, dtype, block_size, head_dim):
    # Tier: same math in float: dq, dk, dv against float64 autograd through the reference math, error at
    # most 2x that of autograd through the same math in the input dtype.
    _skip_interpreter_bf16(device, backend, dtype)
    seq = RAGGED_SEQ[block_size]
    seed = block_size * 5 + head_dim
    layout = _layout(HEADS, seq, block_size, seed)
    kpm = _padding(BATCH, seq)
    q, k, v = _leaves(_qkv(BATCH, HEADS, seq, head_dim, dtype, device, seed))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with qbert.use_backend(backend):
        out = block_sparse_attention(q, k, v, layout, kpm.to(device))
        got = _grads(out, (q, k, v), grad_out.to(device))

    allowed = _allowed(layout, seq, kpm)
    scale = head_dim ** -0.5
    leaves64 = _leaves([q.cpu(), k.cpu(), v.cpu()], torch.float64)
    truth = _grads(attention_reference(*leaves64, allowed, scale)[0], leaves64, grad_out.double())
    leaves = _leaves([q.cpu(), k.cpu(), v.cpu()])
    same_dtype = _grads(attention_reference(*leaves, allowed, scale)[0], leaves, grad_out)
    for name, g, t, b in zip(("dq", "dk", "dv"), got, truth, same_dtype):
        assert g.dtype == dtype and g.shape == q.shape, name
        assert_error_within(g.cpu(), t, b)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=lambda b: f"block{b}")
def test_even_length_gradients(device, backend, block_size):
    # The kernels drop the sequence-end masks when seq is a multiple of the block (the GPU's usual case).
    seq, head_dim, dtype = EVEN_SEQ[block_size], 64, torch.float16
    layout = _layout(HEADS, seq, block_size, block_size)
    q, k, v = _leaves(_qkv(1, HEADS, seq, head_dim, dtype, device, block_size))
    with qbert.use_backend(backend):
        out = block_sparse_attention(q, k, v, layout)
        got = _grads(out, (q, k, v), torch.ones_like(out))
    allowed = _allowed(layout, seq, None)
    leaves64 = _leaves([q.cpu(), k.cpu(), v.cpu()], torch.float64)
    truth_out, _ = attention_reference(*leaves64, allowed, head_dim ** -0.5)
    truth = _grads(truth_out, leaves64, torch.ones_like(truth_out))
    leaves = _leaves([q.cpu(), k.cpu(), v.cpu()])
    base_out, _ = attention_reference(*leaves, allowed, head_dim ** -0.5)
    assert_error_within(out.detach().cpu(), truth_out, base_out)
    for g, t, b in zip(got, truth, _grads(base_out, leaves, torch.ones_like(base_out))):
        assert_error_within(g.cpu(), t, b)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_id)
def test_rows_without_keys_give_zeros_and_zero_gradients(device, backend, dtype):
    # Query block 0 sees only key block 2, which is all padding in batch 1; query block 1 sees no block at
    # all (layout). Those rows output exactly zero with lse = -inf, and all gradients stay finite; keys
    # that no query sees (block 3 and the padding) get exactly zero dk and dv.
    block_size, seq, head_dim = 16, 60, 32
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 2] = True
    mask[0, 2, :3] = True
    mask[0, 3, 0] = True
    layout = BlockLayout(mask, block_size)
    kpm = torch.ones(2, seq, dtype=torch.bool)
    kpm[1, 32:48] = False
    q, k, v = _leaves(_qkv(2, 1, seq, head_dim, dtype, device, 3))
    with qbert.use_backend(backend):
        out, lse = block_sparse_attention_op(q, k, v, *layout.csr(device), *layout.csr_transposed(device),
                                             block_size, kpm.to(device), head_dim ** -0.5)
        dq, dk, dv = _grads(out, (q, k, v), torch.ones_like(out))
    empty_rows = torch.zeros(2, 1, seq, dtype=torch.bool)
    empty_rows[:, :, 16:32] = True
    empty_rows[1, :, :16] = True
    unseen_keys = torch.zeros(2, 1, seq, dtype=torch.bool)
    unseen_keys[:, :, 48:] = True
    unseen_keys[1, :, 32:48] = True
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), f"{name} has NaN"
    assert (out.cpu()[empty_rows] == 0).all() and (dq.cpu()[empty_rows] == 0).all()
    assert (lse.cpu()[empty_rows] == float("-inf")).all() and lse.cpu()[~empty_rows].isfinite().all()
    assert (out.cpu()[~empty_rows].abs().sum(-1) > 0).all()
    assert (dk.cpu()[unseen_keys] == 0).all() and (dv.cpu()[unseen_keys] == 0).all()


@pytest.mark.parametrize("device,backend", device_backends(NAME))
def test_lse_and_its_gradient(device, backend):
    # Tier: same math in float (float32). The op's second output, lse, and the backward's grad_lse path.
    block_size, seq, head_dim = 32, 70, 64
    layout = _layout(HEADS, seq, block_size, 11)
    kpm = _padding(BATCH, seq)
    q, k, v = _leaves(_qkv(BATCH, HEADS, seq, head_dim, torch.float32, device, 11))
    scale = 0.3
    with qbert.use_backend(backend):
        out, lse = block_sparse_attention_op(q, k, v, *layout.csr(device), *layout.csr_transposed(device),
                                             block_size, kpm.to(device), scale)
        finite = lse.isfinite()
        got = _grads((out * out).sum() + lse[finite].sum(), (q, k, v), None)

    def loss(*leaves):
        o, s = attention_reference(*leaves, _allowed(layout, seq, kpm), scale)
        return (o * o).sum() + s[finite.cpu()].sum(), s

    leaves64 = _leaves([q.cpu(), k.cpu(), v.cpu()], torch.float64)
    leaves = _leaves([q.cpu(), k.cpu(), v.cpu()])
    (truth_loss, truth_lse), (base_loss, base_lse) = loss(*leaves64), loss(*leaves)
    assert_error_within(lse.detach().cpu()[finite.cpu()], truth_lse[finite.cpu()], base_lse[finite.cpu()])
    for g, t, b in zip(got, _grads(truth_loss, leaves64, None), _grads(base_loss, leaves, None)):
        assert_error_within(g.cpu(), t, b)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
def test_one_layout_broadcast_over_heads(device, backend):
    # A one-head layout serves every head: the same result as that layout repeated per head.
    block_size, seq, head_dim, heads = 32, 90, 32, 3
    shared = _layout(1, seq, block_size, 5)
    repeated = BlockLayout(shared.mask.expand(heads, -1, -1), block_size)
    q, k, v = _leaves(_qkv(1, heads, seq, head_dim, torch.float32, device, 5))
    with qbert.use_backend(backend):
        results = []
        for layout in (shared, repeated):
            out = block_sparse_attention(q, k, v, layout)
            results.append((out, *_grads(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
def test_strided_inputs(device, backend):
    # Hugging Face hands q, k, v as [B, S, H, D] projections viewed as [B, H, S, D]: strided, with a unit
    # stride along head_dim. The result equals that of contiguous copies.
    block_size, seq, head_dim = 16, 40, 32
    layout = _layout(HEADS, seq, block_size, 9)
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(BATCH, seq, 3, HEADS, head_dim, generator=g).to(device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    kpm = _padding(BATCH, seq).to(device)
    with qbert.use_backend(backend):
        strided = block_sparse_attention(q, k, v, layout, kpm, scale=0.2)
        contiguous = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout, kpm, scale=0.2)
    torch.testing.assert_close(strided, contiguous)


def test_token_mask_matches_the_layouts_own_expansion():
    layout = _layout(HEADS, 77, 32, 4)
    torch.testing.assert_close(_allowed(layout, 77, None)[0], layout.token_mask(77))


def test_reference_matches_sdpa_on_a_dense_layout():
    # With every block active and no padding, the reference is plain softmax attention.
    q, k, v = _qkv(BATCH, HEADS, 50, 32, torch.float32, "cpu", 2)
    layout = BlockLayout(torch.ones(1, 4, 4, dtype=torch.bool), 16)
    with qbert.use_backend("reference"):
        out = block_sparse_attention(q, k, v, layout)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_triton_refusals_name_their_reason():
    q, k, v = _qkv(1, 1, 16, 32, torch.bfloat16, "cpu", 0)
    layout = BlockLayout(torch.ones(1, 1, 1, dtype=torch.bool), 16)
    args = (q, k, v, *layout.csr("cpu"), 16, None, 0.1)
    supports = OPS[NAME].rows["triton"].supports
    assert ("the Triton interpreter computes bf16 tl.dot wrongly" in supports(*args)) == triton_interpreter()
    strided = q.float().transpose(-1, -2).contiguous().transpose(-1, -2)
    reasons = supports(strided, strided, strided, *args[3:])
    assert reasons == [("the triton kernels need a unit stride along head_dim (q, k, v have another; "
                        ".contiguous() gives one)")]
    lse = torch.zeros(1, 1, 16)
    backward = (strided, None, strided, strided, strided, strided, lse, *args[3:5], *layout.csr_transposed("cpu"),
                *args[5:])
    assert OPS[BACKWARD_NAME].rows["triton"].supports(*backward) == reasons


def _meta_strided(shape, strides, dtype=torch.float16):
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


@pytest.mark.parametrize("case", ["token-stride", "mask-stride", "grid"])
def test_triton_refuses_sizes_that_overflow_its_int32_offsets(case):
    # Shapes only (meta tensors, no memory): offsets within one (batch, head) past 2**31 - 1, and more
    # (batch, head) programs than the CUDA grid's y axis holds.
    batch, heads, seq = (70000, 1, 16) if case == "grid" else (1, 1, 4096)
    stride = 2**20 if case == "token-stride" else 32
    q = _meta_strided((batch, heads, seq, 32), (heads * seq * stride, seq * stride, stride, 1))
    blocks = math.ceil(seq / 16)
    counts = torch.zeros(1, blocks, dtype=torch.int32, device="meta")
    indices = torch.zeros(1, blocks, blocks, dtype=torch.int32, device="meta")
    kpm = _meta_strided((batch, seq), (seq * 2**20, 2**20), torch.bool) if case == "mask-stride" else None
    reasons = OPS[NAME].rows["triton"].supports(q, q, q, counts, indices, 16, kpm, 0.1)
    expected = {"token-stride": "q's tokens are 1048576 elements apart: offsets up to 4224 * 1048576",
                "mask-stride": "key_padding_mask's tokens are 1048576 elements apart",
                "grid": "batch * heads = 70000 programs exceed the CUDA grid's 65535 along y"}[case]
    assert any(expected in r for r in reasons), reasons


def _op_args(requires_grad, device="cpu"):
    layout = _layout(HEADS, 20, 16, 1)
    q, k, v = _qkv(BATCH, HEADS, 20, 32, torch.float32, device, 1)
    if requires_grad:
        q, k, v = _leaves([q, k, v])
    return (q, k, v, *layout.csr(device), *layout.csr_transposed(device), 16, _padding(BATCH, 20).to(device),
            32 ** -0.5)


@pytest.mark.parametrize("device,backend", device_backends(NAME))
def test_opcheck(device, backend):
    with qbert.use_backend(backend):
        torch.library.opcheck(torch.ops.qbert.block_sparse_attention.default, _op_args(True, device))
        q, k, v, *layout_args = _op_args(False, device)
        out, lse = torch.ops.qbert.block_sparse_attention(q, k, v, *layout_args)
        grads = (torch.randn_like(out), torch.randn_like(lse))
        torch.library.opcheck(torch.ops.qbert.block_sparse_attention_backward.default,
                              (*grads, q, k, v, out, lse, *layout_args))


def test_compile_fullgraph():
    layout = _layout(HEADS, 40, 16, 6)
    kpm = _padding(BATCH, 40)
    q, k, v = _leaves(_qkv(BATCH, HEADS, 40, 32, torch.float32, "cpu", 6))
    compiled = torch.compile(lambda q, k, v, m: block_sparse_attention(q, k, v, layout, m).sum(-1),
                             fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, kpm)
    expected = block_sparse_attention(q, k, v, layout, kpm).sum(-1)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(got)
    for a, b in zip(_grads(got, (q, k, v), grad), _grads(expected, (q, k, v), grad)):
        torch.testing.assert_close(a, b)


_LAYOUT = BlockLayout(torch.ones(HEADS, 2, 2, dtype=torch.bool), 16)


@pytest.mark.parametrize("change,error,match", [
    ({"q": torch.zeros(BATCH, HEADS, 20, 32, dtype=torch.int8)}, TypeError,
     "block_sparse_attention: q must be float32 or float16 or bfloat16, got int8"),
    ({"k": torch.zeros(BATCH, HEADS, 20, 32, dtype=torch.float16)}, TypeError, "k must have q's dtype"),
    ({"q": torch.zeros(HEADS, 20, 32)}, ValueError, r"q must be 4-D, got shape \[2, 20, 32\]"),
    ({"v": torch.zeros(BATCH, HEADS, 19, 32)}, ValueError, "seq_q == seq_k"),
    ({"q": torch.zeros(BATCH, HEADS, 20, 48), "k": torch.zeros(BATCH, HEADS, 20, 48),
      "v": torch.zeros(BATCH, HEADS, 20, 48)}, ValueError, r"head_dim must be one of \(32, 64, 128\), got 48"),
    ({"layout": torch.ones(HEADS, 2, 2, dtype=torch.bool)}, TypeError, "layout must be a qbert.sparse.BlockLayout"),
    ({"layout": BlockLayout(torch.ones(3, 2, 2, dtype=torch.bool), 16)}, ValueError,
     "the layout has 3 heads; it must have 1"),
    ({"layout": BlockLayout(torch.ones(1, 3, 3, dtype=torch.bool), 16)}, ValueError,
     "seq=20 at block_size=16 needs 2x2 blocks, the layout has 3x3"),
    ({"key_padding_mask": torch.ones(BATCH, 20)}, TypeError, "key_padding_mask must be bool"),
    ({"key_padding_mask": torch.ones(BATCH, 21, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must be \[batch=2, seq=20\]"),
    ({"key_padding_mask": torch.ones(BATCH, 20, dtype=torch.bool, device="meta")}, ValueError, "one device"),
    ({"scale": float("nan")}, ValueError, "scale must be finite"),
], ids=["q-dtype", "k-dtype", "q-ndim", "seq-mismatch", "head-dim", "layout-type", "layout-heads",
        "layout-blocks", "mask-dtype", "mask-shape", "device", "scale"])
def test_errors(change, error, match):
    q, k, v = _qkv(BATCH, HEADS, 20, 32, torch.float32, "cpu", 0)
    args = {"q": q, "k": k, "v": v, "layout": _LAYOUT, "key_padding_mask": None, "scale": None}
    args.update(change)
    with pytest.raises(error, match=match):
        block_sparse_attention(**args)


@pytest.mark.parametrize("change,match", [
    ({"block_size": 8}, r"block_size must be one of \(16, 32, 64, 128\), got 8"),
    ({"kv_counts": torch.zeros(HEADS, 2, dtype=torch.int64)}, "kv_counts must be int32"),
    ({"kv_indices": torch.zeros(HEADS, 2, 3, dtype=torch.int32)}, r"kv_indices \[layout heads, 2, 2\]"),
    ({"q_counts": torch.zeros(1, 2, dtype=torch.int32), "q_indices": torch.zeros(1, 2, 2, dtype=torch.int32)},
     "the layout and its transpose must have one head count"),
    ({"kv_indices": torch.zeros(HEADS, 2, 2, dtype=torch.int32).transpose(1, 2)}, "kv_indices must be contiguous"),
], ids=["block-size", "csr-dtype", "csr-shape", "csr-heads", "csr-contiguity"])
def test_op_errors(change, match):
    q, k, v = _qkv(BATCH, HEADS, 20, 32, torch.float32, "cpu", 0)
    (kv_counts, kv_indices), (q_counts, q_indices) = _LAYOUT.csr("cpu"), _LAYOUT.csr_transposed("cpu")
    args = {"q": q, "k": k, "v": v, "kv_counts": kv_counts, "kv_indices": kv_indices, "q_counts": q_counts,
            "q_indices": q_indices, "block_size": 16, "key_padding_mask": None, "scale": 0.1}
    args.update(change)
    with pytest.raises((TypeError, ValueError), match=match):
        block_sparse_attention_op(**args)


def _csr_args(**change):
    q, k, v = _qkv(BATCH, HEADS, 40, 32, torch.float32, "cpu", 0)
    layout = _layout(HEADS, 40, 16, 3)  # 3 x 3 blocks, head 0's first row empty
    (kv_counts, kv_indices), (q_counts, q_indices) = layout.csr("cpu"), layout.csr_transposed("cpu")
    args = {"q": q, "k": k, "v": v, "kv_counts": kv_counts.clone(), "kv_indices": kv_indices.clone(),
            "q_counts": q_counts.clone(), "q_indices": q_indices.clone(), "block_size": 16,
            "key_padding_mask": None, "scale": 0.1}
    for name, (index, value) in change.items():
        args[name][index] = value
    return args


# Values that would send a kernel out of bounds (a count past the row, an index outside [0, blocks), a
# repeated block), and a transposed CSR that is not the layout's transpose (wrong dK / dV).
CSR_CASES = {
    "count-past-row": ({"kv_counts": ((1, 2), 4)}, r"kv_counts\[1, 2\] = 4 is outside \[0, blocks=3\]"),
    "negative-count": ({"q_counts": ((0, 1), -1)}, r"q_counts\[0, 1\] = -1 is outside \[0, blocks=3\]"),
    "index-past-end": ({"kv_indices": ((1, 0, 0), 3)}, r"kv_indices\[1, 0\] = \[3, .*\] is not a permutation"),
    "negative-index": ({"q_indices": ((0, 2, 1), -5)},
                       r"q_indices\[0, 2\] = .* is not a permutation of \[0, blocks=3\)"),
    "repeated-block": ({"kv_indices": ((0, 1, 1), 0), "kv_counts": ((0, 1), 3)},
                       r"kv_indices\[0, 1\] = .* is not a permutation"),
    "not-the-transpose": ({"q_counts": ((1, 0), 0)}, "q_counts / q_indices must be the transpose of the layout"),
}


@pytest.mark.parametrize("change,match", CSR_CASES.values(), ids=CSR_CASES.keys())
def test_csr_values_are_checked(change, match):
    args = _csr_args(**change)
    with pytest.raises(ValueError, match=f"{NAME}: {match}"):
        block_sparse_attention_op(**args)
    # The backward checks them too (its ops are called directly in the same way).
    clean = _csr_args()
    out, lse = block_sparse_attention_op(**clean)
    layout_args = [args[n] for n in ("kv_counts", "kv_indices", "q_counts", "q_indices")]
    with pytest.raises(ValueError, match=f"{BACKWARD_NAME}: {match}"):
        torch.ops.qbert.block_sparse_attention_backward(out, None, clean["q"], clean["k"], clean["v"], out, lse,
                                                        *layout_args, 16, None, 0.1)


def test_backward_errors():
    q, k, v, *layout_args = _op_args(False)
    out, lse = block_sparse_attention_op(q, k, v, *layout_args)
    with pytest.raises(ValueError, match=r"block_sparse_attention_backward: lse must be float32 \[2, 2, 20\]"):
        torch.ops.qbert.block_sparse_attention_backward(out, None, q, k, v, out, lse.double(), *layout_args)
    with pytest.raises(ValueError, match="grad_out must be float32"):
        torch.ops.qbert.block_sparse_attention_backward(out[:, :1], None, q, k, v, out, lse, *layout_args)
