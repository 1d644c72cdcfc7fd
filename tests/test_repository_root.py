"""Scripts started from the repository root see the installed distributions, not the checkout's folders.

The top-level ``kernels/`` folder holds qbert's Triton kernels (installed as ``qbert.kernels``); from the
root, Python finds the checkout's folders first, so the folder must not be an importable ``kernels``
package that shadows Hugging Face's ``kernels`` distribution, which transformers imports.
"""

import importlib.metadata
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import kernels, torch, transformers, qbert
import qbert.kernels._common  # the Triton kernels still import as part of qbert
assert kernels.__version__ == {version!r}, kernels.__file__
config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16)
model = qbert.quantize(transformers.BertModel(config).eval(), "w8a8")
with torch.no_grad():
    out = model(torch.randint(0, 64, (2, 8))).last_hidden_state
assert out.shape == (2, 8, 32) and bool(torch.isfinite(out).all())
print("ok", kernels.__file__)
"""


def test_quantized_bert_runs_with_the_repository_root_as_working_directory():
    version = importlib.metadata.version("kernels")  # the real distribution is installed (test extra)
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(version=version)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(ROOT / "kernels") not in result.stdout


def test_the_whole_suite_collects_from_the_repository_root():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
