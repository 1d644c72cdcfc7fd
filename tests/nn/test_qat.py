"""Quantization-aware training: fake-quant layers, straight-through gradients, prepare_qat / convert."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qbert
from qbert.nn import QLinear, linear_format
from qbert.nn.formats import FORMATS
from qbert.nn.plan import Plan
from qbert.nn.qat import (
    QAT_SUMMARY_ATTR,
    FakeQuantLinear,
    convert,
    distillation_loss,
    fake_quantize_per_token,
    fake_quantize_weight,
    prepare_qat,
)
from qbert.nn.quantize import SUMMARY_ATTR
from qbert.ops.quantize_per_token import quantize_per_token_reference
from tests.nn._tiny_models import build, inputs, linear_names

N, K, TOKENS = 48, 96, 7  # K is not a multiple of the default group (128): a padded last K group
ROW_GROUPS = 12
FORMAT_CASES = [FORMATS[m] for m in FORMATS] + [
    linear_format("w3a16", row_groups=ROW_GROUPS), linear_format("w2a16", row_groups=1),
    linear_format("w4a8", group_size=-1, symmetric=True), linear_format("w8a16", group_size=32),
]
FORMAT_IDS = [f.describe().replace(" ", "-") for f in FORMAT_CASES]
# Model-level tier "same math in float": QLinear sums in another order (and the a8 formats multiply the
# scales after an exact integer GEMM), so the fake-quant and converted models agree to float rounding,
# relative to the largest logit (measured: at most 1e-7 on these seeded cases, 0 for some formats).
MODEL_REL_TOL = 1e-5
Q = "bert.encoder.layer.0.attention.self.query"
FFN = "bert.encoder.layer.1.output.dense"


def _linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias)


def _x(seed=1):
    return torch.randn(TOKENS, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", FORMAT_CASES, ids=FORMAT_IDS)
def test_fake_quantized_weight_is_what_qlinear_stores(fmt):
    # Tier: exact: the same quantize rule and the same dequantization arithmetic.
    linear = _linear()
    expected = QLinear.from_linear(linear, fmt).dequantized_weight()
    assert torch.equal(fake_quantize_weight(linear.weight, fmt), expected)
    assert torch.equal(FakeQuantLinear.from_linear(linear, fmt).quantized_weight(), expected)


def test_fake_quantized_activations_are_per_token_int8():
    # Tier: exact: the codes and scales of quantize_per_token's reference, dequantized.
    x = _x() * torch.linspace(0.1, 10, TOKENS)[:, None]
    q, scale = quantize_per_token_reference(x)
    assert torch.equal(fake_quantize_per_token(x), q.float() * scale[:, None])
    assert torch.equal(fake_quantize_per_token(x.view(1, TOKENS, K)), (q.float() * scale[:, None]).view(1, TOKENS, K))


@pytest.mark.parametrize("fmt", FORMAT_CASES, ids=FORMAT_IDS)
def test_straight_through_gradients(fmt):
    # The float weight (and bias, and input) get exactly the gradients of the same loss taken with respect
    # to the quantized weight (and the quantized activations for a8 formats): STE. Tier: exact.
    linear = _linear()
    layer = FakeQuantLinear.from_linear(linear, fmt)
    x = _x().requires_grad_()
    upstream = torch.randn(TOKENS, N, generator=torch.Generator().manual_seed(2))
    (layer(x) * upstream).sum().backward()

    w_fq = fake_quantize_weight(linear.weight, fmt).requires_grad_()
    x_fq = (fake_quantize_per_token(x) if fmt.activation_bits else x.detach().clone()).requires_grad_()
    bias = linear.bias.detach().clone().requires_grad_()
    (F.linear(x_fq, w_fq, bias) * upstream).sum().backward()
    assert linear.weight.grad is layer.weight.grad  # shared parameter
    assert torch.equal(layer.weight.grad, w_fq.grad)
    assert torch.equal(layer.bias.grad, bias.grad)
    assert torch.equal(x.grad, x_fq.grad)
    assert not torch.equal(w_fq.detach(), linear.weight.detach())  # the forward did quantize


def test_a8_formats_quantize_the_activations():
    # Same weight format, with and without int8 activations: the outputs differ by the activation error,
    # and the a8 output is the float product of the quantized activations.
    linear, x = _linear(), _x()
    a8 = FakeQuantLinear.from_linear(linear, "w4a8")
    a16 = FakeQuantLinear.from_linear(linear, "w4a16")
    with torch.no_grad():
        w_fq = fake_quantize_weight(linear.weight, a8.format)
        assert torch.equal(a8(x), F.linear(fake_quantize_per_token(x), w_fq, linear.bias))
        assert torch.equal(a16(x), F.linear(x, w_fq, linear.bias))
        assert not torch.equal(a8(x), a16(x))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16", "w4a16", "w3a8", "w2a16"])
def test_convert_gives_the_fake_quant_outputs(mode):
    model = build("BertForSequenceClassification")
    prepare_qat(model, mode)
    # Train a few steps first, so convert quantizes weights that QAT has moved.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    labels = torch.tensor([0, 1])
    model.train()
    for _ in range(3):
        F.cross_entropy(model(**inputs()).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        fake = model(**inputs()).logits
    convert(model)
    assert not linear_names(model, FakeQuantLinear)
    with torch.no_grad():
        real = model(**inputs()).logits
    assert (real - fake).abs().max() <= MODEL_REL_TOL * fake.abs().max()


def test_prepare_selects_the_layers_quantize_swaps_and_shares_parameters():
    model = build("BertForSequenceClassification")
    reference = qbert.quantize(build("BertForSequenceClassification"), "w4a16", skip=("*.layer.1.*",))
    params_before = {name: p for name, p in model.named_parameters()}
    prepare_qat(model, "w4a16", skip=("*.layer.1.*",))
    assert linear_names(model, FakeQuantLinear) == linear_names(reference, QLinear)
    assert "classifier" in linear_names(model)  # the head stays float
    assert {name: p for name, p in model.named_parameters()} == params_before  # the very same objects
    summary = getattr(model, QAT_SUMMARY_ATTR)
    assert summary.mode == "w4a16 g128 asym" and set(summary.swapped) == linear_names(model, FakeQuantLinear)
    assert summary.kept_float["classifier"] == "head"
    convert(model)
    assert getattr(model, SUMMARY_ATTR) == summary and not hasattr(model, QAT_SUMMARY_ATTR)
    assert linear_names(model, QLinear) == linear_names(reference, QLinear)


def test_plan_driven_prepare_and_convert():
    model = build("BertForSequenceClassification")
    plan = Plan({Q: linear_format("w2a16", row_groups=4), FFN: linear_format("w8a8"),
                 "classifier": linear_format("w4a16")})
    prepare_qat(model, plan)
    modules = dict(model.named_modules())
    assert linear_names(model, FakeQuantLinear) == set(plan.layers)
    for name, fmt in plan.layers.items():
        assert modules[name].format == fmt
    assert getattr(model, QAT_SUMMARY_ATTR).mode == "plan"
    convert(model)
    modules = dict(model.named_modules())
    assert linear_names(model, QLinear) == set(plan.layers)
    for name, fmt in plan.layers.items():
        assert modules[name].format == fmt
    # A mapping of names to mode strings is a plan too.
    other = prepare_qat(build("BertForSequenceClassification"), {Q: "w3a16"})
    assert linear_names(other, FakeQuantLinear) == {Q}


def test_shared_layer_stays_shared():
    shared = _linear()
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(N, K), nn.ReLU(), shared)
    prepare_qat(model, "w4a16")
    assert isinstance(model[0], FakeQuantLinear) and model[0] is model[4]
    convert(model)
    assert isinstance(model[0], QLinear) and model[0] is model[4]


def test_errors():
    model = build("BertForSequenceClassification")
    with pytest.raises(ValueError, match="unknown quantization mode 'w5a16'"):
        prepare_qat(model, "w5a16")
    with pytest.raises(TypeError, match="skip must be a sequence"):
        prepare_qat(model, "w4a16", skip="classifier")
    with pytest.raises(ValueError, match="plan names 'bert.nope', which is no module"):
        prepare_qat(model, {"bert.nope": "w4a16"})
    with pytest.raises(ValueError, match="a plan names every layer's format"):
        prepare_qat(model, {Q: "w4a16"}, group_size=64)
    with pytest.raises(ValueError, match="has no FakeQuantLinear layers; call prepare_qat first"):
        convert(model)
    with pytest.raises(TypeError, match="the model itself is an nn.Linear"):
        prepare_qat(_linear(), "w4a16")
    prepare_qat(model, "w4a16")
    with pytest.raises(ValueError, match="already has FakeQuantLinear layers"):
        prepare_qat(model, "w4a16")
    with pytest.raises(TypeError, match="expected an nn.Linear, got FakeQuantLinear"):
        FakeQuantLinear.from_linear(model.get_submodule(Q), "w4a16")
    with pytest.raises(ValueError, match="row_groups=5 must divide the 48 output rows"):
        FakeQuantLinear.from_linear(_linear(), linear_format("w4a16", row_groups=5))
    with pytest.raises(ValueError, match="last dim of x must be in_features=96"):
        FakeQuantLinear.from_linear(_linear(), "w4a16")(torch.randn(2, K + 1))


def test_distillation_loss():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 5, generator=g)
    student = torch.randn(4, 5, generator=g, requires_grad=True)
    temperature = 2.0
    assert distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-7)
    p = F.softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    expected = temperature**2 * (p * (p.log() - log_q)).sum(-1).mean()
    loss = distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"student logits \[4, 5\] and teacher logits \[4, 4\]"):
        distillation_loss(student, teacher[:, :4])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(student, teacher, 0.0)
