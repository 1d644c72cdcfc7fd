"""End to end: a BERT-base encoder (random init, eval, no grad) under each quantization, same inputs, same run.

Variants: fp32 (fp16 on CUDA) | torch.ao dynamic int8 [onednn] (CPU) | qbert w8a8 | qbert w8a16.
Reports ms per forward, the speedup over each baseline, and the fidelity of the last hidden state
against the float model: mean per-token cosine and SQNR (dB).

    python -m qbert.benchmarks.bench_e2e [--smoke] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
from qbert.benchmarks import _harness as H
from qbert.benchmarks.bench_int8_linear import add_arguments
from tqdm import tqdm

from qbert.ops._registry import BACKENDS

SUITE = "e2e"
SEQ_LEN, BATCHES = 128, (1, 8)
SMOKE_SEQ_LEN, SMOKE_BATCHES = 16, (1, 2)
# A BERT small enough that --smoke finishes in seconds; every other field is BertConfig()'s default.
SMOKE_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 64}
WARMUP, REPEATS = 2, 10
SMOKE_WARMUP, SMOKE_REPEATS = 1, 2
SEED = 0
AO_ENGINE = "onednn"
DB_PER_DECADE = 10


def build_model(smoke: bool, device: torch.device) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(**SMOKE_CONFIG) if smoke else BertConfig()
    model = BertModel(config, add_pooling_layer=False).eval().to(device)
    return model.half() if device.type == "cuda" else model


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean per-token cosine and SQNR (dB) of ``out`` against ``ref`` ([batch, seq, hidden])."""
    out, ref = out.float(), ref.float()
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean().item()
    noise = (out - ref).pow(2).sum().item()
    sqnr = math.inf if noise == 0 else DB_PER_DECADE * math.log10(ref.pow(2).sum().item() / noise)
    return {"cosine": cosine, "sqnr_db": sqnr}


def variants(model: torch.nn.Module, device: torch.device) -> list[tuple[str, bool, Callable[[], torch.nn.Module]]]:
    """(name, is_baseline, builder) per variant; a builder raises if the variant cannot be built."""
    import qbert

    def qbert_copy(scheme: str) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            if not hasattr(qbert, "quantize"):
                raise NotImplementedError("qbert.quantize is not available in this checkout")
            return qbert.quantize(copy.deepcopy(model), scheme)

        return build

    rows = [("fp32" if device.type == "cpu" else "fp16", True, lambda: model)]
    if device.type == "cpu":
        rows.append((f"torch.ao dynamic [{AO_ENGINE}]", True, lambda: H.ao_dynamic_int8(model, AO_ENGINE)))
    rows += [("qbert w8a8", False, qbert_copy("w8a8")), ("qbert w8a16", False, qbert_copy("w8a16"))]
    return rows


def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        device: torch.device | None = None, progress: bool = True) -> H.BenchOutput:
    device = device or H.default_device()
    H.set_threads(threads)
    seq_len, batches = (SMOKE_SEQ_LEN, SMOKE_BATCHES) if smoke else (SEQ_LEN, BATCHES)
    timing = {"warmup": SMOKE_WARMUP, "repeats": SMOKE_REPEATS} if smoke else {"warmup": WARMUP,
                                                                               "repeats": REPEATS}
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    model = build_model(smoke, device)
    gen = torch.Generator().manual_seed(SEED)
    inputs = {b: {"input_ids": torch.randint(model.config.vocab_size, (b, seq_len), generator=gen).to(device),
                  "attention_mask": torch.ones(b, seq_len, dtype=torch.long, device=device)} for b in batches}
    model_name = "bert-tiny (random init)" if smoke else "bert-base (random init)"

    results: list[H.Result] = []
    references: dict[int, torch.Tensor] = {}
    configs = [(v, b) for b in batches for v in variants(model, device)]
    built: dict[str, torch.nn.Module | str] = {}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    with torch.inference_mode():
        for (name, baseline, build), batch in tqdm(configs, desc=f"{SUITE} ({device.type})", disable=not progress):
            case = {"model": model_name, "batch": batch, "seq": seq_len}
            result = H.Result(case=case, impl=name, baseline=baseline, dtype=dtype)
            results.append(result)
            if name not in built:
                try:
                    built[name] = build()
                except H.BACKEND_FAILURES as exc:
                    built[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            variant = built[name]
            if isinstance(variant, str):
                result.status, result.reason = H.STATUS_UNSUPPORTED, variant
                continue
            engine = H.quantized_engine(AO_ENGINE) if name.startswith("torch.ao") else contextlib.nullcontext()
            with engine:
                forward = lambda x, m=variant: m(**x).last_hidden_state
                try:
                    out = forward(inputs[batch])
                except H.BACKEND_FAILURES as exc:
                    result.status = H.STATUS_UNSUPPORTED
                    result.reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    continue
                references.setdefault(batch, out)  # the float model runs first
                if name != results[0].impl:
                    result.metrics = fidelity(out, references[batch])
                result.time_us = H.time_fn(forward, [inputs[batch]], device, **timing)
    H.attach_speedups(results)
    meta = H.environment(device, threads, SUITE, smoke=smoke, config=dict(model.config.to_diff_dict()),
                         backends=list(BACKENDS), ao_engine=AO_ENGINE,
                         ao_weights="per-channel int8, per-tensor dynamic activations")
    paths = H.write_reports(results, meta, out_dir, device, time_unit="ms")
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    output = run(args.smoke, args.out, args.threads)
    print(output.markdown)
    print("written: " + ", ".join(str(p) for p in output.paths.values()))
    return output


if __name__ == "__main__":
    main()
