"""Q-BERT and HAWQ-V2 sensitivities: the formulas, Q_b exactly as QLinear stores the weight, and the GPTQ
error ratios that scale them for GPTQ rounding."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from qbert.hessian import (
    TraceEstimate,
    eigen_sensitivity,
    gptq_error_ratios,
    hawq_sensitivity,
    qbert_sensitivity,
    quantization_error,
    quantize_dequantize,
)
from qbert.nn import QLinear, Rounding, linear_format
from qbert.quant.gptq import GPTQError, gptq_quantize, input_hessian, reconstruction_error
from tests.hessian._quadratic import least_squares
from tests.nn import _tiny_models as T

EIG_REL_TOL = 1e-3
FORMATS = [linear_format("w8a16"), linear_format("w4a16"), linear_format("w3a16", row_groups=4),
           linear_format("w2a16", group_size=-1, symmetric=True), linear_format("w8a16", group_size=32)]
# GPTQ's grids: int8 per channel, lazy K groups (a group narrower than the tiny model's K = 64), row groups,
# one range per channel.
GPTQ_FORMATS = [linear_format("w8a16"), linear_format("w4a16", group_size=32), linear_format("w3a16", row_groups=4),
                linear_format("w2a16", group_size=-1, symmetric=True)]
# GPTQ is greedy, so r <= 1 is not a theorem; on these layers (fewer tokens than inputs) it is far below 1.
RATIO_SLACK = 1e-6
# The by-hand H sums the tokens in another order than input_hessians: same math in float64.
RATIO_REL_TOL = 1e-6
CALIBRATION_BATCHES, CALIBRATION_SHAPE = 2, (2, 12)
QKV_AND_OUTPUT = 4  # the first attention block's query, key, value and output projections
INT8_GRID_STEP = 2.0**-7  # a power of two: 127 * step / 127 == step exactly, so the weights below sit on the grid


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe().replace(" ", "-"))
def test_quantize_dequantize_is_what_qlinear_stores(fmt):
    linear = _model()[0]
    expected = QLinear.from_linear(linear, fmt).dequantized_weight()
    assert torch.equal(quantize_dequantize(linear.weight, fmt), expected)  # exact: same codes, same math


def test_hawq_sensitivity_is_mean_eigenvalue_times_quantization_error():
    model = _model()
    traces = {"0": TraceEstimate((3.0, 5.0)), "2": 2.5}
    omega = hawq_sensitivity(model, traces, FORMATS[:2])
    for fmt in FORMATS[:2]:
        assert omega["0"][fmt] == pytest.approx(4.0 / (64 * 16) * quantization_error(model[0].weight, fmt))
        assert omega["2"][fmt] == pytest.approx(2.5 / (16 * 8) * quantization_error(model[2].weight, fmt))
    assert omega["0"][FORMATS[0]] < omega["0"][FORMATS[1]]  # 8 bits perturb less than 4


def test_eigen_sensitivity_scales_the_quantization_error():
    model = _model()
    omega = eigen_sensitivity(model, {"2": 7.0}, FORMATS[:1])
    assert omega == {"2": {FORMATS[0]: pytest.approx(7.0 * quantization_error(model[2].weight, FORMATS[0]))}}


def test_qbert_sensitivity_is_abs_mean_plus_std_of_subset_eigenvalues():
    model, batches, loss_fn, _ = least_squares(n=120, batches=4)
    subsets = [batches[:2], batches[2:]]
    exact = []
    for subset in subsets:
        x = torch.cat([b["x"] for b in subset])
        exact.append(torch.linalg.eigvalsh((2 * x.T @ x / x.shape[0]).double())[-1].item())
    omega = qbert_sensitivity(model, ["0"], subsets, loss_fn, max_iter=500, progress=False)
    assert omega["0"] == pytest.approx(abs(statistics.fmean(exact)) + statistics.pstdev(exact), rel=EIG_REL_TOL)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="formats is empty"):
        hawq_sensitivity(model, {"0": 1.0}, [])
    with pytest.raises(ValueError, match="no module 'head'"):
        hawq_sensitivity(model, {"head": 1.0}, FORMATS)
    with pytest.raises(ValueError, match="subsets is empty"):
        qbert_sensitivity(model, ["0"], [], lambda m, b: m(b["x"]).sum(), progress=False)
    with pytest.raises(ValueError, match=r"expected a weight \[N, K\]"):
        quantize_dequantize(torch.ones(4), FORMATS[0])


# ---- GPTQ rounding -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert():
    """A tiny random BertModel, its linear layers and calibration batches (dicts of model inputs)."""
    model = T.build("BertModel")
    g = torch.Generator().manual_seed(T.SEED)
    batches = [{"input_ids": torch.randint(0, T.VOCAB, CALIBRATION_SHAPE, generator=g)}
               for _ in range(CALIBRATION_BATCHES)]
    names = sorted(T.linear_names(model), key=list(dict(model.named_modules())).index)
    return model, names, batches


@pytest.fixture(scope="module")
def bert_ratios(bert):
    model, names, batches = bert
    return gptq_error_ratios(model, names, GPTQ_FORMATS, batches, progress=False)


def _layer_hessian(model, name, batches):
    """H = 2 X^T X / T of the inputs of module ``name`` over every batch, collected by a hook."""
    inputs = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        handle.remove()
    return input_hessian(torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]))


def test_nearest_is_the_default_and_unchanged():
    model = _model()
    traces = {"0": 3.0, "2": 2.5}
    assert hawq_sensitivity(model, traces, FORMATS) == hawq_sensitivity(model, traces, FORMATS, rounding="nearest")
    assert eigen_sensitivity(model, traces, FORMATS) == eigen_sensitivity(model, traces, FORMATS,
                                                                         rounding=Rounding("nearest"))


def test_gptq_ratios_are_below_one_on_a_tiny_bert(bert, bert_ratios):
    _, names, _ = bert
    assert list(bert_ratios) == names and all(list(row) == GPTQ_FORMATS for row in bert_ratios.values())
    values = [r for row in bert_ratios.values() for r in row.values()]
    assert all(0 < r <= 1 + RATIO_SLACK for r in values), bert_ratios
    assert min(values) < 1  # GPTQ does reduce the output error somewhere


@pytest.mark.parametrize("name", ["encoder.layer.0.attention.self.key", "encoder.layer.1.intermediate.dense"],
                         ids=["key-shares-qkv-stage", "ffn-up"])
@pytest.mark.parametrize("rounding", [Rounding("gptq"), Rounding("gptq", damp=0.1, block_size=16, act_order=True)],
                         ids=lambda r: r.describe().replace(" ", "-"))
def test_gptq_ratio_by_hand(bert, bert_ratios, name, rounding):
    """r(b) = e(GPTQ) / e(nearest) under the layer's input Hessian of the float model."""
    model, _, batches = bert
    ratios = (bert_ratios if rounding == Rounding("gptq")
              else gptq_error_ratios(model, [name], GPTQ_FORMATS, batches, rounding, progress=False))
    weight = model.get_submodule(name).weight.detach()
    hessian = _layer_hessian(model, name, batches)
    for fmt in GPTQ_FORMATS:
        gptq = gptq_quantize(weight, hessian, fmt, damp=rounding.damp, block_size=rounding.block_size,
                             act_order=rounding.act_order).dequantized
        nearest = quantize_dequantize(weight, fmt)
        expected = reconstruction_error(weight, gptq, hessian) / reconstruction_error(weight, nearest, hessian)
        assert ratios[name][fmt] == pytest.approx(expected, rel=RATIO_REL_TOL), fmt.describe()


def test_gptq_sensitivities_are_the_nearest_ones_times_the_ratios(bert, bert_ratios):
    model, names, batches = bert
    names = names[:QKV_AND_OUTPUT]  # two stages are enough: the forwards stop after them
    traces = {name: float(i + 1) for i, name in enumerate(names)}
    for sensitivity in (hawq_sensitivity, eigen_sensitivity):
        nearest = sensitivity(model, traces, GPTQ_FORMATS)
        gptq = sensitivity(model, traces, GPTQ_FORMATS, rounding="gptq", calibration=batches, progress=False)
        assert list(gptq) == names
        for name in names:
            for fmt in GPTQ_FORMATS:
                assert gptq[name][fmt] == pytest.approx(nearest[name][fmt] * bert_ratios[name][fmt],
                                                        rel=RATIO_REL_TOL), (sensitivity.__name__, name, fmt)


def test_a_diagonal_input_hessian_gives_ratio_one():
    """Inputs that are scaled one-hot rows: H is diagonal, GPTQ rounds to nearest exactly, r = 1 exactly. The
    next layer reads their ReLU'd, mixed outputs (a full H) and GPTQ reduces its error."""
    model = _model()
    k = model[0].in_features
    scales = torch.linspace(0.5, 2.0, k)
    batches = [{"input": torch.diag(scales)}, {"input": -torch.diag(scales)}]
    assert torch.count_nonzero(_layer_hessian(model, "0", batches).fill_diagonal_(0)) == 0
    ratios = gptq_error_ratios(model, ["0", "2"], GPTQ_FORMATS, batches, progress=False)
    assert ratios["0"] == dict.fromkeys(GPTQ_FORMATS, 1.0)
    assert all(r < 1 for r in ratios["2"].values()), ratios["2"]
    traces = {"0": 1.0}
    assert hawq_sensitivity(model, traces, GPTQ_FORMATS, rounding="gptq", calibration=batches,
                            progress=False) == hawq_sensitivity(model, traces, GPTQ_FORMATS)


def test_exactly_representable_weights_give_ratio_one():
    """Round to nearest's error is 0 (the int8 weights sit on their grid): nothing to reduce, r = 1."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 8)
    codes = torch.randint(-127, 128, (8, 32)).float()
    codes[:, 0] = 127  # each row's amax: its scale is the grid step
    with torch.no_grad():
        linear.weight.copy_(codes * INT8_GRID_STEP)
    model = nn.Sequential(linear)
    batches = [{"input": torch.randn(16, 32)}]
    int8 = linear_format("w8a16")
    assert torch.equal(quantize_dequantize(linear.weight, int8), linear.weight.detach())
    assert gptq_error_ratios(model, ["0"], [int8], batches, progress=False) == {"0": {int8: 1.0}}


def test_gptq_errors():
    model = _model()
    batches = [{"input": torch.randn(4, 64)}]
    with pytest.raises(ValueError, match=r"hawq_sensitivity: rounding='gptq' needs calibration=batches"):
        hawq_sensitivity(model, {"0": 1.0}, FORMATS, rounding="gptq")
    with pytest.raises(ValueError, match=r"eigen_sensitivity: rounding='gptq' needs calibration=batches"):
        eigen_sensitivity(model, {"0": 1.0}, FORMATS, rounding=Rounding("gptq", damp=0.1))
    with pytest.raises(ValueError, match=r"hawq_sensitivity: calibration is only used by rounding='gptq'"):
        hawq_sensitivity(model, {"0": 1.0}, FORMATS, calibration=batches)
    with pytest.raises(ValueError, match=r"hawq_sensitivity: rounding must be one of 'nearest', 'gptq'"):
        hawq_sensitivity(model, {"0": 1.0}, FORMATS, rounding="rtn")
    with pytest.raises(ValueError, match=r"gptq_error_ratios: rounding must be GPTQ"):
        gptq_error_ratios(model, ["0"], FORMATS, batches, "nearest")
    with pytest.raises(ValueError, match=r"gptq_error_ratios: formats is empty"):
        gptq_error_ratios(model, ["0"], [], batches)
    with pytest.raises(ValueError, match=r"no module 'head'"):
        gptq_error_ratios(model, ["head"], FORMATS, batches)
    with pytest.raises(ValueError, match=r"calibration batch 1 has the keys \['x'\]"):
        gptq_error_ratios(model, ["0"], FORMATS, [{"x": torch.randn(4, 64)}])
    with pytest.raises(GPTQError, match=r"gptq: 0: every calibration input of this layer is zero"):
        gptq_error_ratios(model, ["0"], FORMATS, [{"input": torch.zeros(4, 64)}], progress=False)
