"""A qbert directory loaded by transformers WITHOUT ``import qbert`` fails; it never returns a float model
with randomly initialized layers.

transformers skips the unknown quant_method "qbert" and builds the float model; the placeholder that qbert
stores at every quantized layer's ``<name>.weight`` (``qbert.io.PLACEHOLDER_SHAPE``) has a shape no float
weight has, so transformers' load report lists those weights as size mismatches and ``from_pretrained``
raises.
The directories are written here (with qbert); one Python without qbert loads each of them.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import transformers
from sentence_transformers import SentenceTransformer

import qbert
from qbert.demo import model_path
from qbert.nn import linear_format
from tests.nn._tiny_models import build

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
TIMEOUT_S = 300  # one Python loading every directory (the transformers and sentence-transformers imports
# dominate: about 10 s here)
# transformers' load report drops its details column on narrow terminals: a wide one keeps it.
REPORT_COLUMNS = "200"

# The loader of each directory, run without qbert: (module, callable) with the directory as its one argument.
AUTO_MODEL = ("transformers", "AutoModel.from_pretrained")
AUTO_CLASSIFIER = ("transformers", "AutoModelForSequenceClassification.from_pretrained")
AUTO_MLM = ("transformers", "AutoModelForMaskedLM.from_pretrained")
SENTENCE_TRANSFORMER = ("sentence_transformers", "SentenceTransformer")


def _save_pretrained_w8a8(directory) -> None:
    qbert.quantize(build("BertForSequenceClassification"), "w8a8").save_pretrained(directory)


def _save_quantized_w4a16(directory) -> None:
    qbert.save_quantized(qbert.quantize(build("BertModel"), "w4a16"), f"{directory}{os.sep}")


def _only_the_tied_decoder(directory) -> None:
    """A plan quantizing only the MLM decoder, whose float weight transformers ties to the word embeddings."""
    plan = qbert.Plan({"cls.predictions.decoder": linear_format("w8a8")})
    qbert.quantize(build("BertForMaskedLM"), plan).save_pretrained(directory)


def _sentence_transformer_w4a16(directory) -> None:
    qbert.quantize(SentenceTransformer(str(model_path()), device="cpu"), "w4a16").save(str(directory))


# id -> (how the directory is written, its loader without qbert, a quantized layer's weight in the report).
CASES = {
    "bert-cls-w8a8-save_pretrained": (_save_pretrained_w8a8, AUTO_CLASSIFIER, "bert.pooler.dense.weight"),
    "bert-w4a16-save_quantized": (_save_quantized_w4a16, AUTO_MODEL, "pooler.dense.weight"),
    "bert-mlm-only-the-tied-decoder-w8a8": (_only_the_tied_decoder, AUTO_MLM,
                                            "cls.predictions.decoder.weight"),
    "sentence-transformers-w4a16": (_sentence_transformer_w4a16, SENTENCE_TRANSFORMER,
                                    "encoder.layer.0.attention.self.query.weight"),
}

# Loads each directory in turn, capturing transformers' log of each load; prints one JSON object.
LOAD_WITHOUT_QBERT = """
import importlib, io, json, logging, sys
cases = json.loads(sys.argv[1])
log = logging.getLogger("transformers")
results = {}
for case, (directory, module, name) in cases.items():
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    log.addHandler(handler)
    loader = importlib.import_module(module)
    for attribute in name.split("."):
        loader = getattr(loader, attribute)
    try:
        loader(directory)
        error = None
    except Exception as exc:
        error = [type(exc).__name__, str(exc)]
    log.removeHandler(handler)
    results[case] = {"error": error, "log": captured.getvalue()}
results["qbert imported"] = "qbert" in sys.modules
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def loads_without_qbert(tmp_path_factory) -> dict:
    """case -> {"error": [exception type, message] or None, "log": transformers' log of the load}."""
    cases = {}
    for case, (save, (module, name), _) in CASES.items():
        directory = tmp_path_factory.mktemp(case)
        save(directory)
        cases[case] = [str(directory), module, name]
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_QBERT, json.dumps(cases)], check=False,
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPOSITORY,
                          env={**os.environ, "COLUMNS": REPORT_COLUMNS})
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert results.pop("qbert imported") is False
    return results


def _in_report(weight: str) -> str:
    """``weight``'s row in the load report, which writes the layer indices of a group as ``{0, 1, ...}``."""
    name = re.escape(weight).replace(r"layer\.0\.", r"layer\.(0|\{0(, \d+)*\})\.")
    return rf"{name} +\| MISMATCH +\| Reinit due to size mismatch - ckpt: torch\.Size\(\[0\]\)"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_without_qbert_a_qbert_directory_fails_to_load(loads_without_qbert, case):
    result = loads_without_qbert[case]
    assert result["error"] is not None, f"{case} loaded without qbert"
    error_type, message = result["error"]
    assert error_type == "RuntimeError" and "ignore_mismatched_sizes" in message, result["error"]
    assert "Unknown quantization type, got qbert" in result["log"]
    assert re.search(_in_report(CASES[case][2]), result["log"]), result["log"]


def test_the_report_pattern_reads_grouped_layer_indices():
    row = ("encoder.layer.{0, 1, 2}.attention.self.query.weight | MISMATCH   | Reinit due to size mismatch - "
           "ckpt: torch.Size([0]) vs model:torch.Size([64, 64])")
    assert re.search(_in_report("encoder.layer.0.attention.self.query.weight"), row)
    assert not re.search(_in_report("encoder.layer.0.attention.self.key.weight"), row)


def test_with_qbert_the_same_kind_of_directory_loads(tmp_path):
    # The counterpart in this process (qbert imported): the directory the first case writes loads.
    _save_pretrained_w8a8(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.qbert_summary.mode == "w8a8"
