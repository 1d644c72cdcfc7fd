"""`qbert allocate` and `qbert quantize` end to end on tiny random-init BERT models saved to disk."""

from __future__ import annotations

import itertools
import json
import string

import pytest
import torch
import transformers

import qbert
from qbert import cli
from qbert.allocate.calibration import input_batches, load_model
from qbert.nn import QLinear, Rounding, linear_format
from qbert.nn.plan import Plan
from tests.nn import _tiny_models as T
from tests.test_cli_errors import assert_user_error

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)][: T.VOCAB - len(SPECIAL)]
EXAMPLES = 8
BATCH_OPTIONS = ["--batch-size", "4", "--max-batches", "2", "--max-length", "16"]
FFN_UP = "bert.encoder.layer.0.intermediate.dense"


def _save(tmp_path, class_name, model=None):
    directory = tmp_path / class_name
    (T.build(class_name) if model is None else model).save_pretrained(directory)
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(directory)
    return directory


def _sentences():
    return [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(5 + i)) for i in range(EXAMPLES)]


@pytest.fixture(autouse=True)
def no_loading_bars():
    """transformers draws a progress bar on stderr while it loads weights; without it, stderr holds only
    what qbert prints (a real run shows that bar above an error found after loading)."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"text": s, "label": i % 2}) + "\n" for i, s in enumerate(_sentences())))
    return _save(tmp, "BertForSequenceClassification"), data


def test_allocate_then_quantize_a_classifier(classifier, tmp_path, capsys):
    model_dir, data = classifier
    plan_path = tmp_path / "plan.json"
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--budget", "3bits", "--method", "trace",
            "--out", str(plan_path), "--batch-size", "4", "--max-batches", "2", "--probes", "2", "--joint",
            "--max-length", "16"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    plan = Plan.load(plan_path)
    assert plan_path.with_suffix(".png").stat().st_size > 0
    assert plan.meta["sensitivity_method"] == "trace" and plan.meta["bits_per_weight"] <= 3
    assert plan.meta["calibration"]["batches"] == 2
    assert len(plan.layers) == 6 * T.LAYERS + 1 and "bert.encoder.layer.0.attention.self.query" in out

    out_dir = tmp_path / "quantized"
    assert cli.main(["quantize", "--model", str(model_dir), "--plan", str(plan_path), "--out", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert "total" in table and "written:" in table
    model = qbert.load_quantized(out_dir / "model.safetensors")
    formats = {n: m.format for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert formats == plan.layers


def test_allocate_eigen_rank_on_a_masked_lm_with_text_data(tmp_path, capsys):
    model_dir = _save(tmp_path, "BertForMaskedLM")
    data = tmp_path / "text.txt"
    data.write_text("\n".join(_sentences()) + "\n")
    plan_path = tmp_path / "plan.json"
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--method", "eigen", "--solver", "rank",
            "--formats", "w2a16,w4a16", "--row-groups", "4", "--out", str(plan_path), "--batch-size", "4",
            "--max-batches", "2", "--subsets", "2", "--max-iter", "3", "--no-plot"]
    with pytest.warns(UserWarning, match="did not converge"):
        assert cli.main(args) == 0
    plan = Plan.load(plan_path)
    assert not plan_path.with_suffix(".png").exists()
    assert {f.describe() for f in plan.layers.values()} == {"w2a16 rows4 asym", "w4a16 rows4 asym"}
    assert plan.meta["method"] == "rank" and plan.meta["scores"] == plan.meta["scalar_sensitivity"]


# Errors found once the model and the data are loaded, before the Hessian work (the option checks made
# while parsing are in tests/test_cli_errors.py).
@pytest.mark.parametrize("extra,match", [
    (["--budget", "0.001MB"], "below the smallest achievable size"),
    (["--budget", "3bits", "--method", "eigen", "--subsets", "9"], "--subsets 9 needs between 1 and the 2"),
], ids=["infeasible", "subsets"])
def test_allocate_errors_are_one_line(classifier, tmp_path, capsys, extra, match):
    model_dir, data = classifier
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "p.json"),
            "--batch-size", "4", "--max-batches", "2", "--probes", "2", "--no-plot", *extra]
    assert_user_error(args, capsys, match)


def test_classification_needs_labels(classifier, tmp_path, capsys):
    model_dir, _ = classifier
    data = tmp_path / "text.txt"
    data.write_text("aa ab\n")
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--budget", "3bits",
            "--out", str(tmp_path / "p.json"), "--no-plot"]
    assert_user_error(args, capsys, "needs an integer 'label' in every example")


@pytest.mark.parametrize("label", [2, 7, -1])
def test_labels_outside_num_labels_are_refused(classifier, tmp_path, capsys, label):
    model_dir, _ = classifier  # num_labels = 2
    data = tmp_path / "labels.jsonl"
    labels = [0, 1, 1, label]
    data.write_text("".join(json.dumps({"text": s, "label": y}) + "\n" for s, y in zip(_sentences(), labels)))
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--budget", "3bits", "--batch-size", "3",
            "--out", str(tmp_path / "p.json"), "--no-plot"]
    # The check is calibration's (tests/allocate/test_calibration.py); the command names the data file.
    assert_user_error(args, capsys, rf"error: .*labels.jsonl: example 4 has label {label}; "
                                    rf"the model has num_labels=2, so a label must be in 0\.\.1$")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("command_name", ["allocate", "quantize"])
def test_a_model_directory_without_weights_is_one_line(classifier, tmp_path, capsys, command_name):
    _, data = classifier
    model_dir = tmp_path / "config-only"
    T.build("BertForSequenceClassification").save_pretrained(model_dir)
    (model_dir / transformers.utils.SAFE_WEIGHTS_NAME).unlink()
    plan = tmp_path / "plan.json"
    Plan({}, {}).save(plan)
    args = {"allocate": ["allocate", "--model", str(model_dir), "--data", str(data), "--budget", "3bits",
                         "--out", str(tmp_path / "p.json"), "--no-plot"],
            "quantize": ["quantize", "--model", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "q")]}
    assert_user_error(args[command_name], capsys, r"cannot read --.*config-only.*: .*no file named model.safetensors")


def test_quantize_reports_a_bad_plan(classifier, tmp_path, capsys):
    model_dir, _ = classifier
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert_user_error(["quantize", "--model", str(model_dir), "--plan", str(bad), "--out", str(tmp_path / "q")],
                      capsys, "not a qbert plan")


def test_quantize_reports_a_plan_for_another_model(classifier, tmp_path, capsys):
    model_dir, _ = classifier
    plan = tmp_path / "other.json"
    Plan({"encoder.layer.99.output.dense": linear_format("w8a16")}, {}).save(plan)
    args = ["quantize", "--model", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "q")]
    assert_user_error(args, capsys, r"--plan .*other.json does not fit --model .*: .*'encoder.layer.99.output.dense'")
    assert not (tmp_path / "q").exists()


def _logits_error(model, reference, batches) -> float:
    """Sum over the batches of ||logits - reference logits||^2."""
    with torch.no_grad():
        return sum((model(**b).logits - reference(**b).logits).double().pow(2).sum().item() for b in batches)


def test_allocate_for_gptq_then_quantize_with_data(classifier, tmp_path, capsys):
    model_dir, data = classifier
    plan_path = tmp_path / "plan.json"
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--budget", "3bits", "--rounding", "gptq",
            "--out", str(plan_path), "--probes", "2", "--joint", "--no-plot", *BATCH_OPTIONS]
    assert cli.main(args) == 0
    plan = Plan.load(plan_path)
    assert plan.meta["rounding"] == "gptq" and plan.meta["bits_per_weight"] <= 3
    assert plan.rounding == dict.fromkeys(plan.layers, Rounding("gptq")) and len(plan.layers) == 6 * T.LAYERS + 1
    capsys.readouterr()

    out_dir = tmp_path / "quantized"
    args = ["quantize", "--model", str(model_dir), "--plan", str(plan_path), "--out", str(out_dir),
            "--data", str(data), *BATCH_OPTIONS]
    assert cli.main(args) == 0
    assert "written:" in capsys.readouterr().out
    model = qbert.load_quantized(out_dir / "model.safetensors")
    assert {n: m.format for n, m in model.named_modules() if isinstance(m, QLinear)} == plan.layers
    # Against the same formats rounded to nearest, on the calibration inputs GPTQ saw.
    batches = input_batches(model_dir, data, batch_size=4, max_length=16, max_batches=2)
    reference = load_model(model_dir)
    nearest = qbert.quantize(load_model(model_dir), Plan(plan.layers))
    with torch.no_grad():
        assert all(torch.isfinite(model(**b).logits).all() for b in batches)
    assert _logits_error(model, reference, batches) < _logits_error(nearest, reference, batches)


def test_allocate_for_nearest_records_it(classifier, tmp_path):
    model_dir, data = classifier
    plan_path = tmp_path / "plan.json"
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--budget", "3bits", "--out", str(plan_path),
            "--probes", "2", "--joint", "--no-plot", *BATCH_OPTIONS]
    assert cli.main(args) == 0
    plan = Plan.load(plan_path)
    assert plan.meta["rounding"] == "nearest" and plan.rounding == {}


@pytest.mark.parametrize("rounding,extra,match", [
    ("gptq", [], rf"--plan .*plan.json names GPTQ rounding for {FFN_UP}; GPTQ needs calibration inputs: pass --data"),
    ("nearest", ["--data", "DATA"], r"--data is only used by GPTQ rounding, and --plan .*plan.json names none"),
    ("nearest", ["--batch-size", "4", "--max-length", "16"],
     r"--batch-size, --max-length shape the --data batches; without --data nothing uses them"),
], ids=["gptq-without-data", "data-without-gptq", "batch-options-without-data"])
def test_quantize_data_goes_with_gptq(classifier, tmp_path, capsys, rounding, extra, match):
    model_dir, data = classifier
    plan = tmp_path / "plan.json"
    Plan({FFN_UP: linear_format("w4a16")}, {},
         rounding={FFN_UP: Rounding("gptq")} if rounding == "gptq" else {}).save(plan)
    args = ["quantize", "--model", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "q"),
            *[str(data) if a == "DATA" else a for a in extra]]
    assert_user_error(args, capsys, match)
    assert not (tmp_path / "q").exists()


def test_quantize_reports_inputs_gptq_cannot_use(classifier, tmp_path, capsys):
    """A LayerNorm with zero weight and bias feeds the FFN zeros: GPTQError, one line naming the layer."""
    _, data = classifier
    model = T.build("BertForSequenceClassification")
    with torch.no_grad():
        norm = model.bert.encoder.layer[0].attention.output.LayerNorm
        norm.weight.zero_()
        norm.bias.zero_()
    model_dir = _save(tmp_path, "BertForSequenceClassification", model)
    plan = tmp_path / "plan.json"
    Plan({FFN_UP: linear_format("w4a16")}, {}, rounding={FFN_UP: Rounding("gptq")}).save(plan)
    args = ["quantize", "--model", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "q"),
            "--data", str(data), *BATCH_OPTIONS]
    assert_user_error(args, capsys, rf"gptq: {FFN_UP}: every calibration input of this layer is zero")
    assert not (tmp_path / "q").exists()
