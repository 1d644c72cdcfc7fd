import pytest
import torch
from torch import nn

from qbert import ops
from qbert.nn import FORMATS, QLinear, linear_format
from qbert.nn.formats import INT8_MODES
from qbert.ops.int8_linear import int8_linear_reference
from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.ops.w8a16_linear import w8a16_linear_reference
from qbert.quant.lowbit import quantize_lowbit
from tests._backends import assert_error_within
from tests.nn._tiny_models import sqnr_db

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims of x, K = in_features, N = out_features): one token, primes, sizes past a tile, 3 leading dims
SHAPES = [((1,), 1, 1), ((7,), 13, 129), ((2, 5), 64, 33), ((2, 3, 4), 129, 16)]
# A Gaussian layer on Gaussian inputs, by weight bits: uniform codes give about 6 dB per bit (measured:
# 40-43 dB at 8 bits, 19.9 at 4, 13.3 at 3, 6.0 at 2 with K groups of 128); the bounds leave >= 2 dB.
MIN_LAYER_SQNR_DB = {8: 30, 4: 17, 3: 11, 2: 4}


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_id(shape) -> str:
    lead, k, n = shape
    return f"x{list(lead)}-K{k}-N{n}"


def _linear(k: int, n: int, dtype: torch.dtype, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def _x(lead: tuple[int, ...], k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, k, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("mode", INT8_MODES)
def test_from_linear_weight_codes(mode, dtype):
    # Tier: exact. The codes and scales are the reference per-channel quantization of the weight.
    linear = _linear(64, 33, dtype)
    layer = QLinear.from_linear(linear, mode)
    w_q, w_scale = quantize_per_token_reference(linear.weight.detach())
    assert layer.w_q.dtype == torch.int8 and layer.w_scale.dtype == torch.float32
    assert torch.equal(layer.w_q, w_q)
    assert torch.equal(layer.w_scale, w_scale)
    assert layer.bias.dtype == dtype and torch.equal(layer.bias, linear.bias.detach())
    assert (layer.in_features, layer.out_features, layer.mode) == (64, 33, mode)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_w8a8_forward_against_reference(shape, dtype, bias):
    # Tier: same math in float. The activation codes are those of the dispatched quantize_per_token
    # (exact against its reference, tests/ops); the output's error against float64 math on the same codes
    # is at most 2x that of int8_linear_reference (equal to it on the reference backend).
    lead, k, n = shape
    layer = QLinear.from_linear(_linear(k, n, dtype, bias), "w8a8")
    x = _x(lead, k, dtype)
    out = layer(x)
    assert out.shape == (*lead, n) and out.dtype == dtype
    x_q, x_scale = ops.quantize_per_token(x)
    x_q, x_scale = x_q.reshape(-1, k), x_scale.reshape(-1)
    reference = int8_linear_reference(x_q, x_scale, layer.w_q, layer.w_scale, layer.bias, dtype)
    truth = (x_q.double() @ layer.w_q.double().T) * x_scale.double()[:, None] * layer.w_scale.double()
    if bias:
        truth = truth + layer.bias.double()
    assert_error_within(out.reshape(-1, n), truth, reference)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_w8a16_forward_against_reference(shape, dtype, bias):
    # Tier: same math in float: error against float64 math on the same codes at most 2x that of
    # w8a16_linear_reference (equal to it on the reference backend).
    lead, k, n = shape
    layer = QLinear.from_linear(_linear(k, n, dtype, bias), "w8a16")
    x = _x(lead, k, dtype)
    out = layer(x)
    assert out.shape == (*lead, n) and out.dtype == dtype
    x2 = x.reshape(-1, k)
    reference = w8a16_linear_reference(x2, layer.w_q, layer.w_scale, layer.bias)
    truth = (x2.double() @ layer.w_q.double().T) * layer.w_scale.double()
    if bias:
        truth = truth + layer.bias.double()
    assert_error_within(out.reshape(-1, n), truth, reference)


@pytest.mark.parametrize("mode", list(FORMATS))
def test_leading_dims_and_non_contiguous_input(mode):
    # Tier: exact. The same rows give the same outputs whatever the leading dims or the input's strides.
    layer = QLinear.from_linear(_linear(64, 33, torch.float32), mode)
    x = _x((2, 3, 5), 64, torch.float32)
    flat = layer(x.reshape(-1, 64))
    assert torch.equal(layer(x), flat.reshape(2, 3, 5, 33))
    x_t = x.reshape(-1, 64).T.contiguous().T  # same values, column-major strides
    assert not x_t.is_contiguous()
    assert torch.equal(layer(x_t), flat)


@pytest.mark.parametrize("mode", list(FORMATS))
def test_close_to_float_linear(mode):
    # Tier: quality. The quantized layer approximates the float layer it came from.
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    nn.init.normal_(linear.weight)
    x = _x((32,), 256, torch.float32)
    with torch.no_grad():
        layer = QLinear.from_linear(linear, mode)
        assert sqnr_db(linear(x), layer(x)) >= MIN_LAYER_SQNR_DB[layer.format.weight_bits]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mode", list(FORMATS))
def test_state_dict_round_trip(mode, bias):
    layer = QLinear.from_linear(_linear(64, 33, torch.bfloat16, bias), mode)
    state = layer.state_dict()
    assert set(state) == set(FORMATS[mode].weight_shapes(33, 64)) | ({"bias"} if bias else set())
    fresh = QLinear(64, 33, bias=bias, mode=mode, bias_dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    x = _x((5,), 64, torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_shape_mismatch_is_an_error():
    state = QLinear.from_linear(_linear(64, 33, torch.float32), "w8a8").state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for w_q"):
        QLinear(64, 32).load_state_dict(state)


def test_dequantized_weight_is_close_to_the_float_weight():
    # Tier: exact bound. Round to nearest: each weight is off by at most half a step of its row's scale.
    linear = _linear(64, 33, torch.float32)
    layer = QLinear.from_linear(linear, "w8a8")
    error = (layer.dequantized_weight() - linear.weight.detach()).abs()
    assert (error <= layer.w_scale[:, None] / 2 * (1 + torch.finfo(torch.float32).eps)).all()


def test_extra_repr():
    layer = QLinear.from_linear(_linear(64, 33, torch.float32, bias=False), "w8a16")
    assert "in_features=64, out_features=33, bias=False, mode=w8a16" in repr(layer)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: QLinear(8, 4, mode="w4a4"), id="constructor"),
    pytest.param(lambda: QLinear.from_linear(nn.Linear(8, 4), mode="int8"), id="from_linear"),
])
def test_unknown_mode_lists_the_known_ones(make):
    with pytest.raises(ValueError, match=r"unknown quantization mode '\w+'; known modes: w8a8, w8a16"):
        make()


def test_wrong_in_features():
    layer = QLinear.from_linear(_linear(64, 33, torch.float32), "w8a8")
    with pytest.raises(ValueError, match=r"last dim of x must be in_features=64, got x of shape \[5, 63\]"):
        layer(torch.zeros(5, 63))


def test_from_linear_needs_a_linear():
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
        QLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_casting_after_quantization_is_an_error():
    layer = QLinear.from_linear(_linear(64, 33, torch.float32), "w8a16").half()
    match = "w_scale must be float32, got torch.float16.*cast first, then quantize"
    with pytest.raises(TypeError, match=match):
        layer(torch.zeros(5, 64, dtype=torch.float16))


@pytest.mark.parametrize("mode", list(FORMATS))
def test_compile_fullgraph(mode):
    layer = QLinear.from_linear(_linear(64, 33, torch.float32), mode)
    x = _x((2, 5), 64, torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))


def test_bad_sizes():
    with pytest.raises(ValueError, match="in_features and out_features must be at least 1"):
        QLinear(0, 4)


# ---- QLinear.from_codes ----------------------------------------------------------------------------------

FROM_CODES_FORMATS = [linear_format(mode) for mode in FORMATS] + [
    linear_format("w4a16", group_size=32, symmetric=True), linear_format("w3a16", row_groups=3),
    linear_format("w2a8", group_size=-1), linear_format("w8a16", group_size=32)]


def _stored_codes(linear: nn.Linear, fmt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round to nearest's (codes, scale, zero) in from_codes's layout."""
    if not fmt.packed:
        return *quantize_per_token_reference(linear.weight.detach()), None
    q = quantize_lowbit(linear.weight.detach(), fmt.scheme)
    return q.codes, q.scale, q.zero


@pytest.mark.parametrize("fmt", FROM_CODES_FORMATS, ids=lambda f: f.describe().replace(" ", "-"))
def test_from_linear_is_from_codes_of_round_to_nearest(fmt):
    # Tier: exact: the same buffers, bias included.
    linear = _linear(64, 33, torch.float32)
    expected = QLinear.from_linear(linear, fmt)
    layer = QLinear.from_codes(linear, fmt, *_stored_codes(linear, fmt))
    assert layer.format == expected.format
    assert dict(layer.named_buffers()).keys() == dict(expected.named_buffers()).keys()
    for name, buffer in expected.named_buffers():
        assert torch.equal(dict(layer.named_buffers())[name], buffer), name
    x = _x((5,), 64, torch.float32)
    assert torch.equal(layer(x), expected(x))


W8A8_CODES = (torch.zeros(33, 64, dtype=torch.int8), torch.ones(33))
W4_SHAPE = (2, 33)  # [K groups of 32, N] for K = 64
W4A16_CODES = (torch.zeros(33, 64, dtype=torch.uint8), torch.ones(W4_SHAPE), torch.zeros(W4_SHAPE, dtype=torch.uint8))
W4A16_G32 = linear_format("w4a16", group_size=32)
W4A16_G32_SYM = linear_format("w4a16", group_size=32, symmetric=True)


def _replace(codes: tuple, index: int, value) -> tuple:
    return (*codes[:index], value, *codes[index + 1:])


@pytest.mark.parametrize("fmt,operands,match", [
    ("w8a8", _replace(W8A8_CODES, 0, torch.zeros(33, 63, dtype=torch.int8)),
     r"codes of a w8a8 \[33, 64\] layer must be torch.int8 \[33, 64\], got torch.int8 \[33, 63\]"),
    ("w8a8", _replace(W8A8_CODES, 0, torch.zeros(33, 64, dtype=torch.int32)),
     r"codes of a w8a8 \[33, 64\] layer must be torch.int8 \[33, 64\], got torch.int32 \[33, 64\]"),
    ("w8a16", _replace(W8A8_CODES, 1, torch.ones(33, dtype=torch.float64)),
     r"w_scale of a w8a16 \[33, 64\] layer must be torch.float32 \[33\], got torch.float64 \[33\]"),
    ("w8a8", _replace(W8A8_CODES, 1, torch.ones(1, 33)),
     r"w_scale of a w8a8 \[33, 64\] layer must be torch.float32 \[33\], got torch.float32 \[1, 33\]"),
    ("w8a8", _replace(W8A8_CODES, 0, torch.full((33, 64), -128, dtype=torch.int8)),
     r"w8a8 codes must be in \[-127, 127\], got \[-128, -128\]"),
    ("w8a8", (*W8A8_CODES, torch.zeros(33, dtype=torch.uint8)), "w8a8 stores no zero points, got a w_zero tensor"),
    (W4A16_G32, _replace(W4A16_CODES, 0, torch.full((33, 64), 16, dtype=torch.uint8)),
     r"w4a16 g32 asym codes must be in \[0, 15\], got \[16, 16\]"),
    (W4A16_G32, _replace(W4A16_CODES, 0, torch.zeros(33, 64, dtype=torch.int8)),
     r"codes of a w4a16 g32 asym \[33, 64\] layer must be torch.uint8 \[33, 64\], got torch.int8"),
    (W4A16_G32, _replace(W4A16_CODES, 1, torch.ones(33, 2)),
     r"w_scale of a w4a16 g32 asym \[33, 64\] layer must be torch.float32 \[2, 33\], got torch.float32 \[33, 2\]"),
    (W4A16_G32, _replace(W4A16_CODES, 2, None),
     r"w_zero of a w4a16 g32 asym \[33, 64\] layer must be torch.uint8 \[2, 33\], got NoneType"),
    (W4A16_G32, _replace(W4A16_CODES, 2, torch.zeros(W4_SHAPE)),
     r"w_zero of a w4a16 g32 asym \[33, 64\] layer must be torch.uint8 \[2, 33\], got torch.float32 \[2, 33\]"),
    (W4A16_G32_SYM, W4A16_CODES, "w4a16 g32 sym stores no zero points, got a w_zero tensor"),
    (W4A16_G32_SYM, (torch.zeros(33, 64, dtype=torch.uint8), [[1.0] * 33] * 2),
     r"w_scale of a w4a16 g32 sym \[33, 64\] layer must be torch.float32 \[2, 33\], got list"),
    (W4A16_G32, _replace(W4A16_CODES, 2, torch.full(W4_SHAPE, 16, dtype=torch.uint8)),
     r"w4a16 g32 asym zero points must be in \[0, 15\], got up to 16"),
], ids=["codes-shape", "codes-dtype", "scale-dtype", "scale-shape", "int8-range", "int8-zero", "packed-range",
        "packed-dtype", "packed-scale-shape", "zero-missing", "zero-dtype", "sym-zero", "scale-list", "zero-range"])
def test_from_codes_errors_name_the_tensor(fmt, operands, match):
    with pytest.raises(ValueError, match=f"^QLinear.from_codes: {match}"):
        QLinear.from_codes(_linear(64, 33, torch.float32), fmt, *operands)


def test_from_codes_needs_a_linear():
    with pytest.raises(TypeError, match="QLinear.from_codes: expected an nn.Linear, got Conv1d"):
        QLinear.from_codes(nn.Conv1d(4, 4, 1), "w8a8", *W8A8_CODES)
