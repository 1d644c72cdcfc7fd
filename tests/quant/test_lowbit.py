import pytest
import torch

from qbert.quant.lowbit import LowBitScheme, dequantize_lowbit, expand_rows, implicit_zero, quantize_lowbit
from qbert.quant.packing import BITS_CHOICES


def _bert_weight(n=768, k=768, seed=0):
    # A BERT-like weight: Gaussian rows whose spread differs per output row and per head-sized block,
    # so that finer row groups can track the range.
    g = torch.Generator().manual_seed(seed)
    row_spread = torch.exp(torch.randn(n, 1, generator=g) * 0.5)
    return torch.randn(n, k, generator=g) * 0.04 * row_spread


def _relative_error(weight, scheme):
    q = quantize_lowbit(weight, scheme)
    n, k = weight.shape
    dq = dequantize_lowbit(q.codes, expand_rows(q.scale, n), expand_rows(q.zero, n), scheme.bits,
                           scheme.kernel_group_size(k))
    return ((dq - weight).norm() / weight.norm()).item()


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", BITS_CHOICES)
def test_more_row_groups_lower_error(bits, symmetric):
    # Q-BERT's group-wise quantization: 1 > 12 (per head) > 128 > 768 (per channel) row groups.
    weight = _bert_weight()
    errors = [_relative_error(weight, LowBitScheme(bits, symmetric, row_groups=g)) for g in (1, 12, 128, 768)]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors), errors


@pytest.mark.parametrize("bits", BITS_CHOICES)
def test_smaller_k_groups_lower_error(bits):
    weight = _bert_weight()
    errors = [_relative_error(weight, LowBitScheme(bits, group_size=g)) for g in (None, 256, 128, 64, 32)]
    assert errors == sorted(errors, reverse=True), errors


def test_more_bits_lower_error():
    weight = _bert_weight()
    errors = [_relative_error(weight, LowBitScheme(b, group_size=128)) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01, errors


@pytest.mark.parametrize("bits", BITS_CHOICES)
def test_codes_follow_the_documented_rules(bits):
    # Tier: exact; the rules of the module docstring, written out for one group.
    w = torch.tensor([[-0.7, -0.1, 0.0, 0.25, 0.5]])
    levels = (1 << bits) - 1
    q = quantize_lowbit(w, LowBitScheme(bits, symmetric=False))
    scale = (0.5 - -0.7) / levels
    zero = min(max(round(0.7 / scale), 0), levels)
    expected = torch.clamp(torch.round(w / torch.tensor(scale, dtype=torch.float32)) + zero, 0, levels)
    assert torch.equal(q.codes, expected.to(torch.uint8))
    assert q.zero.item() == zero and q.scale.item() == pytest.approx(scale)
    qs = quantize_lowbit(w, LowBitScheme(bits, symmetric=True))
    qmax = implicit_zero(bits) - 1
    s = torch.tensor(0.7, dtype=torch.float32) / qmax
    assert qs.zero is None
    assert torch.equal(qs.codes, (torch.round(w / s).clamp(-qmax, qmax) + implicit_zero(bits)).to(torch.uint8))


def test_zero_group_and_exact_zero():
    w = torch.zeros(4, 64)
    w[1, 3] = 0.5
    for scheme in (LowBitScheme(3), LowBitScheme(3, symmetric=True), LowBitScheme(2, group_size=32)):
        q = quantize_lowbit(w, scheme)
        dq = dequantize_lowbit(q.codes, expand_rows(q.scale, 4), expand_rows(q.zero, 4), scheme.bits,
                               scheme.kernel_group_size(64))
        assert torch.equal(dq[0], torch.zeros(64)) and dq[1, 0] == 0  # zero stays exactly zero


@pytest.mark.parametrize("scheme,n,k,expected", [
    # 768x768 4-bit per 128-group asym: 768*768/2 code bytes, 6*768 float scales, 6*768 uint8 zeros.
    (LowBitScheme(4, group_size=128), 768, 768, {"codes": 294912, "scales": 18432, "zeros": 4608}),
    # 3-bit costs 3 bits per weight; K=13 pads to one 32-wide chunk per row.
    (LowBitScheme(3, symmetric=True), 768, 768, {"codes": 221184, "scales": 3072, "zeros": 0}),
    (LowBitScheme(2, row_groups=12), 768, 3072, {"codes": 589824, "scales": 48, "zeros": 12}),
    (LowBitScheme(8, symmetric=True), 5, 13, {"codes": 160, "scales": 20, "zeros": 0}),
], ids=["w4g128", "w3sym", "w2rows12", "w8pad"])
def test_exact_size_accounting(scheme, n, k, expected):
    assert scheme.nbytes(n, k) == expected


def test_stored_shapes():
    q = quantize_lowbit(_bert_weight(96, 100), LowBitScheme(4, group_size=32))
    assert q.codes.shape == (96, 100) and q.scale.shape == (4, 96) and q.zero.shape == (4, 96)
    q = quantize_lowbit(_bert_weight(96, 100), LowBitScheme(4, row_groups=12))
    assert q.scale.shape == (1, 12) and expand_rows(q.scale, 96).shape == (1, 96)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, r"bits must be one of"),
    ({"bits": 4, "group_size": 48}, "group_size must be a positive multiple of 32"),
    ({"bits": 4, "row_groups": 0}, "row_groups must be a positive int"),
    ({"bits": 4, "group_size": 32, "row_groups": 12}, "not both"),
], ids=["bits", "group", "rows", "both"])
def test_scheme_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowBitScheme(**kwargs)


def test_row_groups_must_divide_rows():
    with pytest.raises(ValueError, match="row_groups=12 must divide the 100 output rows"):
        quantize_lowbit(torch.randn(100, 64), LowBitScheme(4, row_groups=12))
