"""`qbert allocate` and `qbert quantize` end to end on tiny random-init BERT models saved to disk."""

from __future__ import annotations

import itertools
import json
import re
import string

import pytest
import transformers

import qbert
from qbert import cli
from qbert.allocate import Plan
from qbert.nn import QLinear
from tests.nn import _tiny_models as T

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)][: T.VOCAB - len(SPECIAL)]
EXAMPLES = 8


def _save(tmp_path, class_name):
    directory = tmp_path / class_name
    T.build(class_name).save_pretrained(directory)
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(directory)
    return directory


def _sentences():
    return [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(5 + i)) for i in range(EXAMPLES)]


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


@pytest.mark.parametrize("extra,match", [
    (["--budget", "3 bytes"], "bad budget '3 bytes'"),
    (["--budget", "0.001MB"], "below the smallest achievable size"),
    ([], "--solver milp needs --budget"),
    (["--budget", "3bits", "--formats", "w5a16"], "unknown quantization mode 'w5a16'"),
    (["--budget", "3bits", "--method", "eigen", "--subsets", "9"], "--subsets 9 needs between 1 and the 2"),
], ids=["grammar", "infeasible", "no-budget", "format", "subsets"])
def test_allocate_errors_are_one_line(classifier, tmp_path, capsys, extra, match):
    model_dir, data = classifier
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "p.json"),
            "--batch-size", "4", "--max-batches", "2", "--probes", "2", "--no-plot", *extra]
    assert cli.main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("qbert allocate: ") and re.search(match, last), last


def test_classification_needs_labels(classifier, tmp_path, capsys):
    model_dir, _ = classifier
    data = tmp_path / "text.txt"
    data.write_text("aa ab\n")
    args = ["allocate", "--model", str(model_dir), "--data", str(data), "--budget", "3bits",
            "--out", str(tmp_path / "p.json"), "--no-plot"]
    assert cli.main(args) == 1
    assert "needs an integer 'label' in every example" in capsys.readouterr().err


def test_quantize_reports_a_bad_plan(classifier, tmp_path, capsys):
    model_dir, _ = classifier
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main(["quantize", "--model", str(model_dir), "--plan", str(bad), "--out", str(tmp_path / "q")]) == 1
    assert "not a qbert plan" in capsys.readouterr().err
