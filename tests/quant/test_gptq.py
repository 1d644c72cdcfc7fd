"""GPTQ rounding of one weight matrix (qbert.quant.gptq) against round to nearest and a naive OBQ."""

import contextlib

import pytest
import torch
from torch import nn

import qbert
from qbert.nn import QLinear, linear_format
from qbert.nn.formats import LinearFormat
from qbert.nn.qat import fake_quantize_weight
from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.quant.gptq import (
    DEFAULT_DAMP,
    GPTQError,
    gptq_quantize,
    input_hessian,
    reconstruction_error,
)
from qbert.quant.int8 import INT8_QMAX
from qbert.quant.lowbit import LowBitScheme, expand_rows, implicit_zero, quantize_lowbit
from qbert.quant.packing import unpack
from tests._backends import assert_error_within

# A layer of N outputs on K inputs: K = 80 is not a multiple of the 32-wide K groups (the last group has
# 16 columns) and below the default group of 128 (one group wider than the row); N = 24 takes 4 row groups.
N, K = 24, 80
TOKENS = 256  # calibration tokens, more than K: the undamped H is already positive definite
INPUT_MIXING = 0.3  # X = Z A * 0.3 + b: correlated features with a common offset, like real activations
ROW_GROUPS = 4
GROUP = 32

FORMATS = [
    linear_format("w8a8"),
    linear_format("w8a16"),
    linear_format("w8a16", group_size=GROUP),  # packed 8-bit codes
    linear_format("w4a16"),  # g128 over K = 80: one lazy group holding the whole row
    linear_format("w4a16", group_size=GROUP),
    linear_format("w4a16", group_size=GROUP, symmetric=True),
    linear_format("w4a16", group_size=-1),
    linear_format("w3a16", row_groups=ROW_GROUPS),
    linear_format("w3a16", row_groups=1, symmetric=True),
    linear_format("w2a16"),
    linear_format("w2a16", group_size=-1, symmetric=True),
    linear_format("w4a8", group_size=GROUP),
    linear_format("w3a8", group_size=-1),
    linear_format("w2a8", group_size=GROUP, symmetric=True),
]


def _fmt_id(fmt: LinearFormat) -> str:
    return fmt.describe().replace(" ", "-")


def _lazy(fmt: LinearFormat, act_order: bool) -> bool:
    """K groups whose range GPTQ takes from the updated weights when their first column is reached."""
    return fmt.packed and fmt.group_size is not None and not act_order


def _layer(n: int = N, k: int = K, tokens: int = TOKENS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W float32 [n, k], X float32 [tokens, k]) with correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g)
    mixing = torch.randn(k, k, generator=g)
    x = torch.randn(tokens, k, generator=g) @ mixing * INPUT_MIXING + torch.randn(k, generator=g)
    return weight, x


def _per_row(scale: torch.Tensor, zero: torch.Tensor | None, n: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored scale and zero [K groups, row groups] -> float32 [K groups, N] (symmetric: the implicit zero)."""
    scale = expand_rows(scale, n)
    return scale, torch.full_like(scale, implicit_zero(bits)) if zero is None else expand_rows(zero, n).float()


def _lowbit_grid(weight: torch.Tensor, scheme: LowBitScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest's ranges of ``weight`` [N, K] under ``scheme``: scale and zero [K groups, N]."""
    q = quantize_lowbit(weight.float(), scheme)
    return _per_row(q.scale, q.zero, weight.shape[0], scheme.bits)


def _round_column(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  fmt: LinearFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized) of a float32 column [N] under per-row ``scale`` / ``zero`` [N], written from the
    rules of qbert.quant.int8 and qbert.quant.lowbit (round half to even in float32; scales are nonzero
    for the random weights used here)."""
    if not fmt.packed:
        codes = torch.round(column / scale).clamp(-INT8_QMAX, INT8_QMAX)
        return codes, codes * scale
    q = torch.round(column / scale)
    if fmt.symmetric:
        qmax = implicit_zero(fmt.weight_bits) - 1
        q = q.clamp(-qmax, qmax)
    codes = (q + zero).clamp(0, (1 << fmt.weight_bits) - 1)
    return codes, (codes - zero) * scale


def _naive_obq(weight: torch.Tensor, hessian: torch.Tensor, fmt: LinearFormat, *, damp: float = DEFAULT_DAMP,
               act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """OBQ in float64 with one explicit inverse, one column at a time, no Cholesky, no blocks.

    Hinv = (H + damping)^-1 (dead inputs get the mean diagonal, then damp * mean is added: the module
    docstring). For each column q in order (feature order, or decreasing H[q, q] with act_order):
    quantize W[:, q] in float32 on the format's grid; err = (W[:, q] - deq) / Hinv[q, q];
    W -= err Hinv[q, :] (the columns already quantized have Hinv[q, j] = 0 and column q becomes deq);
    then drop q: Hinv -= Hinv[:, q] Hinv[q, :] / Hinv[q, q]. Per-channel and row-group ranges (and, with
    act_order, every K group's) come from the original W; a lazy K group's range from the current W when
    its first column is reached. Returns (codes, dequantized) float32 [N, K] in feature order."""
    n, k = weight.shape
    h = hessian.double().clone()
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    diag = h.diagonal()
    dead = diag == 0
    mean = diag[~dead].mean()
    diag[dead] = mean
    diag += damp * mean
    hinv = torch.linalg.inv(h)
    w = weight.double().clone()
    if fmt.packed:
        scale, zero = _lowbit_grid(weight, fmt.scheme)  # the lazy groups' entries are replaced below
        group = fmt.scheme.kernel_group_size(k)
        per_row = LowBitScheme(fmt.weight_bits, fmt.symmetric)
    codes, dequantized = torch.zeros(n, k), torch.zeros(n, k)
    for q in order.tolist():
        if not fmt.packed:
            column_scale, column_zero = quantize_per_token_reference(weight.float())[1], None
        else:
            if _lazy(fmt, act_order) and q % group == 0:
                group_scale, group_zero = _lowbit_grid(w[:, q:q + group].float(), per_row)
                scale[q // group], zero[q // group] = group_scale[0], group_zero[0]
            column_scale, column_zero = scale[q // group], zero[q // group]
        codes[:, q], dequantized[:, q] = _round_column(w[:, q].float(), column_scale, column_zero, fmt)
        err = (w[:, q] - dequantized[:, q].double()) / hinv[q, q]
        w -= err[:, None] * hinv[q][None, :]
        hinv = hinv - hinv[:, q:q + 1] @ hinv[q:q + 1, :] / hinv[q, q]
    return codes, dequantized


def _rtn_codes(weight: torch.Tensor, fmt: LinearFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round to nearest's stored (codes, scale, zero)."""
    if not fmt.packed:
        return *quantize_per_token_reference(weight.float()), None
    q = quantize_lowbit(weight, fmt.scheme)
    return q.codes, q.scale, q.zero


def _assert_same_weight(a, b) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scale, b.scale)
    assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)
    assert torch.equal(a.dequantized, b.dequantized)


def test_input_hessian_is_two_xtx_over_tokens():
    # Tier: float64 math; leading dims are tokens.
    _, x = _layer()
    h = input_hessian(x.reshape(4, TOKENS // 4, K))
    assert h.dtype == torch.float64 and h.shape == (K, K)
    torch.testing.assert_close(h, 2 * x.double().T @ x.double() / TOKENS, rtol=1e-12, atol=0)


def test_reconstruction_error_is_the_mean_output_error():
    # tr(dW H dW^T) / 2 = mean over tokens of ||x dW^T||^2 for H = 2 X^T X / T (float64 math).
    weight, x = _layer()
    quantized = fake_quantize_weight(weight, linear_format("w4a16", group_size=GROUP))
    direct = (x.double() @ (quantized.double() - weight.double()).T).pow(2).sum(dim=1).mean().item()
    assert reconstruction_error(weight, quantized, input_hessian(x)) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_error_at_most_round_to_nearest(fmt, act_order):
    # Tier: quality, on the objective GPTQ minimizes: the layer-output error under the calibration H.
    weight, x = _layer()
    h = input_hessian(x)
    gptq = gptq_quantize(weight, h, fmt, act_order=act_order)
    assert reconstruction_error(weight, gptq.dequantized, h) <= reconstruction_error(
        weight, fake_quantize_weight(weight, fmt), h)


OBQ_CASES = [pytest.param(n, fmt, id=f"N{n}-{_fmt_id(fmt)}") for n in (N, 1) for fmt in FORMATS
             if fmt.row_groups is None or n % fmt.row_groups == 0]


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("n,fmt", OBQ_CASES)
def test_matches_naive_obq(n, fmt, act_order):
    # Tier: exact codes. The naive solve and GPTQ's Cholesky / lazy blocks differ by float64 rounding
    # (~1e-13 relative); a code could only differ where a float32 quotient lands within that of a rounding
    # boundary, which random float64 data does not hit (measured: every code equal).
    weight, x = _layer(n=n)
    h = input_hessian(x)
    gptq = gptq_quantize(weight, h, fmt, act_order=act_order)
    codes, dequantized = _naive_obq(weight, h, fmt, act_order=act_order)
    assert torch.equal(gptq.codes, codes.to(gptq.codes.dtype))
    assert torch.equal(gptq.dequantized, dequantized)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_diagonal_hessian_is_round_to_nearest(fmt, act_order):
    # Tier: exact. Uncorrelated inputs: every error stays in its own column.
    weight, _ = _layer()
    diagonal = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5)
    gptq = gptq_quantize(weight, diagonal, fmt, act_order=act_order)
    codes, scale, zero = _rtn_codes(weight, fmt)
    assert torch.equal(gptq.codes, codes) and torch.equal(gptq.scale, scale)
    assert (gptq.zero is None and zero is None) or torch.equal(gptq.zero, zero)
    assert torch.equal(gptq.dequantized, fake_quantize_weight(weight, fmt))


def _same_math_truth_and_baseline(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fmt: LinearFormat
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 math of the layer on the dequantized weight (a8 formats: on the per-token int8 activation
    codes of quantize_per_token_reference), and PyTorch's float32 linear on the same operands."""
    if fmt.activation_bits is None:
        truth = x.double() @ weight.double().T + bias.double()
        return truth, nn.functional.linear(x, weight, bias)
    x_q, x_scale = quantize_per_token_reference(x)
    truth = (x_q.double() @ weight.double().T) * x_scale.double()[:, None] + bias.double()
    return truth, nn.functional.linear(x_q.float() * x_scale[:, None], weight, bias)


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "default"])
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_result_is_exactly_representable(fmt, backend):
    # Tier: exact for the stored weight; same math in float for the forward: error against float64 math
    # on the same codes at most 2x that of PyTorch's float32 linear (tests._backends.assert_error_within).
    weight, x = _layer()
    gptq = gptq_quantize(weight, input_hessian(x), fmt)
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    layer = QLinear.from_codes(linear, fmt, gptq.codes, gptq.scale, gptq.zero)
    assert torch.equal(layer.dequantized_weight(), gptq.dequantized)
    stored = unpack(layer.w_packed, fmt.weight_bits, K) if fmt.packed else layer.w_q
    assert torch.equal(stored, gptq.codes)
    inputs = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), qbert.use_backend(backend) if backend else contextlib.nullcontext():
        out = layer(inputs)
    truth, baseline = _same_math_truth_and_baseline(inputs.reshape(-1, K), gptq.dequantized, linear.bias.detach(),
                                                    fmt)
    assert_error_within(out.reshape(-1, N), truth, baseline)


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_same_codes_whatever_the_dtype_of_the_operands(fmt):
    # Tier: exact. H is accumulated and GPTQ runs in float64, the grid in float32, whatever the inputs.
    weight, x = _layer()
    reference = gptq_quantize(weight, input_hessian(x), fmt)
    h64 = input_hessian(x.double())
    assert torch.equal(h64, input_hessian(x))
    _assert_same_weight(gptq_quantize(weight, h64, fmt), reference)
    # An H handed over in float32 (same values) and a weight in float64 (same values).
    h32 = input_hessian(x).float()
    _assert_same_weight(gptq_quantize(weight, h32, fmt), gptq_quantize(weight, h32.double(), fmt))
    _assert_same_weight(gptq_quantize(weight.double(), input_hessian(x), fmt), reference)
    # A bfloat16 weight is the float32 weight of the same values.
    bf16 = weight.bfloat16()
    _assert_same_weight(gptq_quantize(bf16, input_hessian(x), fmt), gptq_quantize(bf16.float(), input_hessian(x), fmt))


DEAD = [5, 40, 70]  # one input feature in each K group of 32 (K = 80: groups 0-31, 32-63, 64-79)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_dead_inputs_keep_their_weights(fmt, act_order):
    # Tier: exact. An input that is zero on every token (H[k, k] = 0) has no curvature: its column gets no
    # updates, so its codes are the nearest ones of the original weights on the grid GPTQ stored. Where the
    # ranges are static (per-channel, row groups, int8, act_order's static groups, and the first lazy K
    # group, whose range is taken before any update) that grid is round to nearest's: the same codes. A
    # later lazy K group's range follows its live columns' updates, so its dead columns round to nearest on
    # that moved grid, which need not be round to nearest's.
    weight, x = _layer()
    x[:, DEAD] = 0
    gptq = gptq_quantize(weight, input_hessian(x), fmt, act_order=act_order)
    rtn_codes, *_ = _rtn_codes(weight, fmt)
    if fmt.packed:
        scale, zero = _per_row(gptq.scale, gptq.zero, N, fmt.weight_bits)
    group = fmt.scheme.kernel_group_size(K) if fmt.packed else K
    for q in DEAD:
        grid = (scale[q // group], zero[q // group]) if fmt.packed else (gptq.scale, None)
        codes, _ = _round_column(weight[:, q], *grid, fmt)
        assert torch.equal(gptq.codes[:, q], codes.to(gptq.codes.dtype)), q
        if not _lazy(fmt, act_order) or q < group:
            assert torch.equal(gptq.codes[:, q], rtn_codes[:, q]), q


def test_all_zero_inputs_are_an_error():
    weight, x = _layer()
    with pytest.raises(GPTQError, match=r"gptq: enc.q: every calibration input of this layer is zero \(H = 0\)"):
        gptq_quantize(weight, input_hessian(torch.zeros_like(x)), linear_format("w4a16"), name="enc.q")


def test_singular_hessian_needs_damping():
    # H = v v^T (rank 1, no zero diagonal entry, exact in float64): singular without damping; the default
    # damping makes it positive definite.
    weight, _ = _layer()
    v = torch.arange(1, K + 1, dtype=torch.float64)
    h = torch.outer(v, v)
    fmt = linear_format("w4a16", group_size=GROUP)
    match = rf"gptq: enc.q: the damped input Hessian is not positive definite \(damp=0\); a larger damp \(e.g. " \
            rf"{DEFAULT_DAMP:g}\)"
    with pytest.raises(GPTQError, match=match):
        gptq_quantize(weight, h, fmt, damp=0, name="enc.q")
    damped = gptq_quantize(weight, h, fmt)
    assert torch.isfinite(damped.dequantized).all()
    assert reconstruction_error(weight, damped.dequantized, h) <= reconstruction_error(
        weight, fake_quantize_weight(weight, fmt), h)


NAN, INF = float("nan"), float("inf")


def _with(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[3] = value
    return tensor


@pytest.mark.parametrize("change,match", [
    (lambda w, h: (w, h[:-1, :-1]), (r"the input Hessian must be \[K, K\] = \[80, 80\] for a weight of shape "
                                     r"\[24, 80\], got \[79, 79\]")),
    (lambda w, h: (w, h.diagonal()), r"the input Hessian must be \[K, K\] = \[80, 80\] .*got \[80\]"),
    (lambda w, h: (w[0], h), (r"the weight must be a non-empty float \[N, K\] tensor, got torch.float32 of "
                              r"shape \[80\]")),
    (lambda w, h: (w.to(torch.int32), h), r"the weight must be a non-empty float \[N, K\] tensor, got torch.int32"),
    (lambda w, h: (w[:0], h), r"the weight must be a non-empty float \[N, K\] tensor, .* shape \[0, 80\]"),
    (lambda w, h: (_with(w, NAN), h), "the weight has non-finite values"),
    (lambda w, h: (_with(w, INF), h), "the weight has non-finite values"),
    (lambda w, h: (w, _with(h, NAN)), "the input Hessian has non-finite values"),
    (lambda w, h: (w, _with(h, -INF)), "the input Hessian has non-finite values"),
], ids=["h-shape", "h-1d", "w-1d", "w-int", "w-empty", "w-nan", "w-inf", "h-nan", "h-inf"])
def test_bad_operands_are_errors_naming_the_layer(change, match):
    weight, x = _layer()
    weight, h = change(weight, input_hessian(x))
    with pytest.raises(GPTQError, match=f"^gptq: enc.q: {match}"):
        gptq_quantize(weight, h, linear_format("w4a16"), name="enc.q")


@pytest.mark.parametrize("options,match", [
    ({"damp": -1}, r"damp must be a float >= 0 .*got -1"),
    ({"damp": True}, r"damp must be a float >= 0 .*got True"),
    ({"damp": "x"}, r"damp must be a float >= 0 .*got 'x'"),
    ({"damp": NAN}, r"damp must be a float >= 0 .*got nan"),
    ({"block_size": 0}, "block_size must be a positive int, got 0"),
    ({"block_size": 1.5}, "block_size must be a positive int, got 1.5"),
    ({"block_size": True}, "block_size must be a positive int, got True"),
], ids=["damp-negative", "damp-bool", "damp-str", "damp-nan", "block-0", "block-float", "block-bool"])
def test_bad_options_are_errors(options, match):
    weight, x = _layer()
    with pytest.raises(GPTQError, match=f"^gptq: {match}"):
        gptq_quantize(weight, input_hessian(x), linear_format("w4a16"), **options)


BLOCK_SIZES = (1, 7, 128)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("fmt", [linear_format("w8a8"), linear_format("w3a8", group_size=-1),
                                 linear_format("w3a16", row_groups=ROW_GROUPS),
                                 linear_format("w4a16", group_size=GROUP)], ids=_fmt_id)
def test_block_size_does_not_change_the_result(fmt, act_order):
    # Tier: exact codes. Lazy updates are a reordering of the same float64 sums (~1e-13 relative); no code
    # sits that close to a rounding boundary here (measured). Lazy K groups of 32 round block sizes 1 and
    # 7 up to one group, so that a group never spans two blocks.
    weight, x = _layer()
    h = input_hessian(x)
    results = [gptq_quantize(weight, h, fmt, block_size=size, act_order=act_order) for size in BLOCK_SIZES]
    for other in results[1:]:
        _assert_same_weight(other, results[0])
