"""w8a8_encoder_layer: the cpu backend's one C++ call against the reference, the layer op by op."""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

import qbert
from qbert.ops import w8a8_encoder_layer
from qbert.ops.w8a8_encoder_layer import PARAMS, layer_params, w8a8_encoder_layer_reference
from qbert.prune.structure import remove_heads

HIDDEN, HEADS, FFN = 48, 4, 96
BATCH, SEQ = 3, 9
EPS = 1e-12


# Head sizes 12 and 16: varlen_attention runs torch's kernel per sequence for the first, qbert's AVX-512 kernel
# (where the CPU has it) for the second; the layer equals its reference bitwise either way.
@pytest.fixture(scope="module", params=[HEADS, HIDDEN // 16], ids=lambda heads: f"d{HIDDEN // heads}")
def layer(request):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=request.param,
                        intermediate_size=FFN, vocab_size=64, max_position_embeddings=32)
    model = qbert.quantize(BertModel(config).eval(), "w8a8", progress=False)
    return model.encoder.layer[0]


def _padding_mask(valid: list[int], dtype: torch.dtype) -> torch.Tensor:
    keep = torch.arange(SEQ)[None, :] < torch.tensor(valid)[:, None]  # [B, S], right padding
    if dtype == torch.bool:
        return keep[:, None, None, :]
    return torch.where(keep, 0.0, torch.finfo(dtype).min)[:, None, None, :].to(dtype)


def _args(layer, rows: int, *, codes: bool = False, mask=None, indices=None, params=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, HIDDEN, generator=g)
    x_q, x_scale = qbert.ops.quantize_per_token(x) if codes else (None, None)
    att = layer.attention.self
    return (x, x_q, x_scale, layer_params(layer) if params is None else params, EPS, EPS,
            att.num_attention_heads, att.scaling, mask, indices, BATCH, SEQ)


def _assert_bitwise(out, ref):
    assert len(out) == 3
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert torch.equal(o, r)


def test_params_follow_the_declared_order(layer):
    # layer_params reads attributes directly; PARAMS names them: both must agree, tensor for tensor.
    declared = [getattr(layer.get_submodule(path), attr) for path, attr in PARAMS]
    assert all(a is b for a, b in zip(layer_params(layer), declared, strict=True))


@pytest.mark.parametrize("codes", [False, True], ids=["quantizes", "codes"])
@pytest.mark.parametrize("mask", [None, torch.float32, torch.bool], ids=["nomask", "float", "bool"])
def test_padded_equals_the_reference(layer, codes, mask):
    # Tier: exact. The cpu row runs the reference's cpu kernels in the reference's order.
    mask = None if mask is None else _padding_mask([SEQ, 5, 2], mask)
    args = _args(layer, BATCH * SEQ, codes=codes, mask=mask)
    _assert_bitwise(w8a8_encoder_layer(*args), w8a8_encoder_layer_reference(*args))


@pytest.mark.parametrize("codes", [False, True], ids=["quantizes", "codes"])
def test_unpadded_equals_the_reference(layer, codes):
    # Tier: exact. The rows are the real tokens; attention scatters them to their positions.
    valid = [SEQ, 5, 2]
    mask = _padding_mask(valid, torch.float32)
    indices = (mask[:, 0, 0, :] == 0).flatten().nonzero().squeeze(1)
    args = _args(layer, sum(valid), codes=codes, mask=mask, indices=indices)
    out = w8a8_encoder_layer(*args)
    assert out[0].shape == (sum(valid), HIDDEN)
    _assert_bitwise(out, w8a8_encoder_layer_reference(*args))


def test_pure_reference_is_within_a_code(layer):
    # Tier: float (the cpu LayerNorm rounds once from float32 sums, the reference's from float64: a code
    # can move by one step).
    args = _args(layer, BATCH * SEQ)
    out = w8a8_encoder_layer(*args)
    with qbert.use_backend("reference"):
        ref = w8a8_encoder_layer(*args)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    assert (out[1].int() - ref[1].int()).abs().max().item() <= 1


def test_pruned_heads_and_no_biases():
    # The attention width (heads x head size) differs from the hidden size after head pruning; biases
    # may be None.
    torch.manual_seed(1)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                        intermediate_size=FFN, vocab_size=64, max_position_embeddings=32)
    model = BertModel(config).eval()
    remove_heads(model, {0: [1]})
    for module in model.encoder.layer[0].modules():
        if isinstance(module, torch.nn.Linear):
            module.bias = None
    layer = qbert.quantize(copy.deepcopy(model), "w8a8", progress=False).encoder.layer[0]
    assert layer.attention.self.num_attention_heads == HEADS - 1
    args = _args(layer, BATCH * SEQ)
    _assert_bitwise(w8a8_encoder_layer(*args), w8a8_encoder_layer_reference(*args))


def test_errors_name_the_constraint(layer):
    args = list(_args(layer, BATCH * SEQ))
    with pytest.raises(ValueError, match="params must hold the 22 tensors of PARAMS, got 21"):
        w8a8_encoder_layer(*args[:3], args[3][:-1], *args[4:])
    params = list(args[3])
    params[0] = None
    with pytest.raises(ValueError, match=r"params has None for attention\.self\.query\.w_q"):
        w8a8_encoder_layer(*args[:3], params, *args[4:])
    with pytest.raises(ValueError, match="x_q and x_scale go together"):
        w8a8_encoder_layer(args[0], torch.zeros(BATCH * SEQ, HIDDEN, dtype=torch.int8), None, *args[3:])
    with pytest.raises(ValueError, match="without indices x must have batch \\* seq = 27 rows, got 26"):
        w8a8_encoder_layer(args[0][:-1], *args[1:])
    with pytest.raises(TypeError, match="x must be float32"):
        w8a8_encoder_layer(args[0].half(), *args[1:])
    with pytest.raises(ValueError, match="indices must have shape"):
        w8a8_encoder_layer(*args[:9], torch.arange(4), *args[10:])


def test_the_kernel_checks_its_own_arguments(layer):
    # The C++ launcher repeats the checks that guard memory: a wrong row count is an error, not a read
    # past the end.
    x, _, _, params, *rest = _args(layer, BATCH * SEQ)
    with pytest.raises(RuntimeError, match="w8a8_encoder_layer_cpu: params must hold 22 entries"):
        torch.ops.qbert.w8a8_encoder_layer_cpu(x, None, None, params[:-1], *rest)
    with pytest.raises(RuntimeError, match="w8a8_encoder_layer_cpu: indices must have shape"):
        torch.ops.qbert.w8a8_encoder_layer_cpu(x, None, None, params, *rest[:5], torch.arange(3), *rest[6:])
    # The unpadded attention takes each sequence's rows as consecutive: indices must ascend, in range.
    for bad, at_row in ((torch.arange(BATCH * SEQ).flip(0), 1), (torch.arange(BATCH * SEQ) + 1, BATCH * SEQ - 1)):
        with pytest.raises(RuntimeError, match=f"indices must ascend strictly within \\[0, batch \\* seq = "
                                               f"{BATCH * SEQ}\\), got .* at row {at_row}"):
            torch.ops.qbert.w8a8_encoder_layer_cpu(x, None, None, params, *rest[:5], bad, *rest[6:])


def test_refuses_to_run_under_compile(layer):
    args = _args(layer, BATCH * SEQ)
    compiled = torch.compile(lambda: w8a8_encoder_layer(*args), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="runs in eager mode only"):
        compiled()
