"""QLinear, quantize and save/load with the packed low-bit formats and per-layer plans."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import qbert
from qbert.io import KEY_LAYERS, PLACEHOLDER_SHAPE, PLACEHOLDER_SUFFIX
from qbert.nn import QLinear, linear_bytes, linear_format
from qbert.nn.formats import FORMATS, INT8_MODES
from qbert.nn.plan import Plan
from qbert.ops.lowbit_linear import lowbit_linear_reference
from qbert.ops.w4a8_linear import w4a8_linear_reference
from qbert.quant.lowbit import LowBitScheme, quantize_lowbit
from qbert.quant.packing import pack
from tests._backends import assert_error_within
from tests.nn._tiny_models import build, first_output, linear_names
from tests.ops._lowbit import w4a8_truth

PACKED_MODES = [m for m in FORMATS if m not in INT8_MODES]
Q = "encoder.layer.0.attention.self.query"
FFN1 = "encoder.layer.1.intermediate.dense"


def _linear(k=96, n=64, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("fmt", [
    linear_format("w4a16"), linear_format("w3a16", group_size=32), linear_format("w2a16", row_groups=8),
    linear_format("w4a8", symmetric=True), linear_format("w8a16", group_size=64),
    linear_format("w3a8", group_size=-1),
], ids=lambda f: f.describe().replace(" ", "-"))
def test_from_linear_stores_the_reference_quantization(fmt):
    # Tier: exact: the buffers are quantize_lowbit's codes (packed), scales and zeros.
    linear = _linear()
    layer = QLinear.from_linear(linear, fmt)
    q = quantize_lowbit(linear.weight.detach(), fmt.scheme)
    assert torch.equal(layer.w_packed, pack(q.codes, fmt.weight_bits))
    assert torch.equal(layer.w_scale, q.scale)
    assert (q.zero is None and not hasattr(layer, "w_zero")) or torch.equal(layer.w_zero, q.zero)
    assert {name: tuple(buf.shape) for name, buf in layer.named_buffers() if name != "bias"} == \
        fmt.weight_shapes(64, 96)


@pytest.mark.parametrize("fmt", [linear_format("w4a16"), linear_format("w3a16", row_groups=8),
                                 linear_format("w4a8"), linear_format("w2a8", row_groups=4)],
                         ids=lambda f: f.describe().replace(" ", "-"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_forward_is_the_op_on_the_stored_codes(fmt, dtype):
    # Tier: same math in float: against float64 math on the stored codes with the kernel-ready
    # (row-expanded) scales; the op's reference in the activation dtype is the baseline.
    linear = _linear().to(dtype)
    layer = QLinear.from_linear(linear, fmt)
    x = torch.randn(2, 5, 96).to(dtype)
    scales, zeros = layer.kernel_scales()
    args = (x.reshape(10, 96), layer.w_packed, scales, zeros, fmt.weight_bits, fmt.scheme.kernel_group_size(96),
            layer.bias)
    if fmt.activation_bits:
        truth, baseline = w4a8_truth(*args), w4a8_linear_reference(*args)
    else:
        truth = args[0].double() @ layer.dequantized_weight().double().T + layer.bias.double()
        baseline = lowbit_linear_reference(*args)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 5, 64)
    assert_error_within(out.reshape(10, 64), truth, baseline)


def test_dequantized_weight_matches_row_groups():
    layer = QLinear.from_linear(_linear(), linear_format("w4a16", row_groups=4))
    w = layer.dequantized_weight()
    # 4 row groups of 16 rows: each group's codes span one shared range.
    for g in range(4):
        rows = w[16 * g:16 * (g + 1)]
        step = layer.w_scale[0, g]
        assert torch.allclose(rows / step, torch.round(rows / step), atol=1e-4)


@pytest.mark.parametrize("mode", PACKED_MODES)
def test_state_dict_round_trip(mode):
    layer = QLinear.from_linear(_linear(), mode)
    fresh = QLinear(96, 64, mode=mode)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), layer(x))


def test_extra_repr_describes_the_format():
    layer = QLinear.from_linear(_linear(), linear_format("w3a16", row_groups=8, symmetric=True))
    assert "mode=w3a16 rows8 sym" in repr(layer)


def test_weight_bytes_are_the_buffers():
    model = qbert.quantize(build("BertModel"), {Q: "w3a16", FFN1: linear_format("w2a8", row_groups=16)})
    for layer in linear_bytes(model):
        module = model.get_submodule(layer.names[0])
        buffers = [b for name, b in module.named_buffers() if name != "bias"] if isinstance(module, QLinear) \
            else [module.weight]
        assert layer.total == sum(b.numel() * b.element_size() for b in buffers)
    bits = {layer.names[0]: layer.bits_per_weight for layer in linear_bytes(model)}
    # 3 bits of codes + a float32 scale and a uint8 zero per (row, 128-group): K=64 is one group per row.
    assert bits[Q] == pytest.approx(3 + 8 * (4 + 1) / 64)
    assert bits["encoder.layer.0.attention.self.key"] == 32


@pytest.mark.parametrize("kwargs,kind", [
    ({"group_size": 64}, {"group_size": 64, "row_groups": None}),
    ({"group_size": -1}, {"group_size": None, "row_groups": None}),
    ({"row_groups": 4}, {"group_size": None, "row_groups": 4}),
    ({"symmetric": True}, {"group_size": 128, "symmetric": True}),
], ids=["group", "channel", "rows", "sym"])
def test_quantize_overrides(kwargs, kind):
    model = qbert.quantize(build("BertModel"), "w4a16", **kwargs)
    formats = {m.format for m in model.modules() if isinstance(m, QLinear)}
    assert len(formats) == 1
    fmt = formats.pop()
    assert all(getattr(fmt, key) == value for key, value in kind.items())
    assert model.qbert_summary.mode == fmt.describe()


def test_w8a8_takes_no_overrides():
    with pytest.raises(ValueError, match="w8a8 is per-channel symmetric int8 and takes no group_size"):
        qbert.quantize(build("BertModel"), "w8a8", group_size=64)


def test_a_plan_quantizes_exactly_its_layers():
    model = build("BertForSequenceClassification")
    prefixed = {f"bert.{Q}": linear_format("w4a16", group_size=32), f"bert.{FFN1}": "w2a8", "classifier": "w8a8"}
    expected = first_output(model)
    qbert.quantize(model, prefixed)
    assert linear_names(model, QLinear) == set(prefixed)
    assert model.get_submodule(f"bert.{Q}").format == linear_format("w4a16", group_size=32)
    assert model.get_submodule("classifier").mode == "w8a8"  # a head, because the plan says so
    assert model.qbert_summary.mode == "plan"
    assert model.qbert_summary.kept_float["bert.pooler.dense"] == "not in the plan"
    assert first_output(model).shape == expected.shape


@pytest.mark.parametrize("plan,match", [
    ({"encoder.nothing": "w4a16"}, r"the plan names 'encoder.nothing', which is no module in BertModel"),
    ({"encoder.layer.0": "w4a16"}, r"'encoder.layer.0', which is a BertLayer, not an nn.Linear"),
    ({Q: "w5a16"}, "unknown quantization mode 'w5a16'"),
], ids=["missing", "not-linear", "bad-mode"])
def test_plan_errors(plan, match):
    with pytest.raises(ValueError, match=match):
        qbert.quantize(build("BertModel"), plan)


def test_a_plan_with_single_mode_options_is_an_error():
    with pytest.raises(ValueError, match="a plan names every layer's format"):
        qbert.quantize(build("BertModel"), {Q: "w4a16"}, group_size=64)


def test_a_shared_layer_with_two_formats_is_an_error():
    model = build("AlbertModel")
    shared = [n for n, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear
              and n.endswith("query")]
    assert len(shared) >= 1
    model.encoder.alias = model.get_submodule(shared[0])
    with pytest.raises(ValueError, match="gives the shared layer .* several formats"):
        qbert.quantize(model, {shared[0]: "w4a16", "encoder.alias": "w3a16"})


@pytest.mark.parametrize("class_name", ["BertModel", "AlbertModel"])
def test_mixed_plan_save_load_round_trip(tmp_path, class_name):
    model = build(class_name)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    modes = ["w4a16", "w3a8", "w2a16", "w8a8", "w8a16"]
    plan = Plan({name: linear_format(modes[i % len(modes)]) for i, name in enumerate(names)}, {"why": "test"})
    plan.layers[names[0]] = linear_format("w3a16", row_groups=8, symmetric=True)
    qbert.quantize(model, plan)
    path = tmp_path / "mixed.safetensors"
    qbert.save_quantized(model, path)
    loaded = qbert.load_quantized(path)
    assert torch.equal(first_output(loaded), first_output(model))
    assert {n: m.format for n, m in loaded.named_modules() if isinstance(m, QLinear)} == \
        {n: m.format for n, m in model.named_modules() if isinstance(m, QLinear)}
    with safe_open(path, framework="pt") as f:
        entries = json.loads(f.metadata()[KEY_LAYERS])
    first = next(e for e in entries if names[0] in e["names"])
    assert first["format"] == {"name": "w3a16", "weight_bits": 3, "activation_bits": None, "symmetric": True,
                               "group_size": None, "row_groups": 8}


def test_a_scheme_that_does_not_fit_the_layer_is_an_error():
    with pytest.raises(ValueError, match="row_groups=7 must divide the 64 output rows"):
        QLinear.from_linear(_linear(), linear_format("w4a16", row_groups=7))


def test_scheme_property_matches_the_format():
    fmt = linear_format("w3a8", row_groups=12)
    assert fmt.scheme == LowBitScheme(3, symmetric=False, group_size=None, row_groups=12)


def _rewrite_layers(path, version, edit):
    # Rewrites a new file as an older version: its layer entries edited, and without the weight
    # placeholders that only version 4 files hold.
    from safetensors.torch import load_file, save_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    entries = json.loads(metadata[KEY_LAYERS])
    for entry in entries:
        edit(entry)
    metadata.update({KEY_LAYERS: json.dumps(entries), "qbert.format_version": version})
    tensors = {name: t for name, t in load_file(path).items()
               if not (name.endswith(PLACEHOLDER_SUFFIX) and t.shape == PLACEHOLDER_SHAPE)}
    save_file(tensors, path, metadata=metadata)


def test_a_version_1_file_still_loads(tmp_path):
    # Version 1 (int8 layers only) had no per-layer "format": its mode named the format.
    model = qbert.quantize(build("BertModel"), "w8a16")
    path = tmp_path / "v1.safetensors"
    qbert.save_quantized(model, path)
    _rewrite_layers(path, "1", lambda entry: entry.pop("format"))
    assert torch.equal(first_output(qbert.load_quantized(path)), first_output(model))


def test_a_packed_layer_without_its_format_is_an_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    qbert.save_quantized(qbert.quantize(build("BertModel"), "w4a16"), path)
    _rewrite_layers(path, "2", lambda entry: entry.pop("format"))
    with pytest.raises(qbert.QuantizedFileError, match="mode 'w4a16' needs a 'format' entry"):
        qbert.load_quantized(path)
