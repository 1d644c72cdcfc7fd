"""Q-BERT and HAWQ-V2 sensitivities: the formulas, and Q_b exactly as QLinear stores the weight."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from qbert.hessian import (
    TraceEstimate,
    eigen_sensitivity,
    hawq_sensitivity,
    qbert_sensitivity,
    quantization_error,
    quantize_dequantize,
)
from qbert.nn import QLinear, linear_format
from tests.hessian._quadratic import least_squares

EIG_REL_TOL = 1e-3
FORMATS = [linear_format("w8a16"), linear_format("w4a16"), linear_format("w3a16", row_groups=4),
           linear_format("w2a16", group_size=-1, symmetric=True), linear_format("w8a16", group_size=32)]


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
