"""End to end: a BERT-base encoder (random init, eval, no grad) under each quantization, same inputs, same run.

Variants: CUDA  fp16 | qbert w8a8 (the fused chain) | qbert w8a8 unfused (``fuse=False``)
          CPU   fp32 | torch.ao dynamic int8 [onednn] | qbert w8a8 | qbert w8a8 unfused | qbert w8a16
Scopes:   layer    one encoder layer, hidden states in and out. The model's layers are run in turn
                   (each timed call is one layer) so that, as in the model, weights come from memory
                   rather than L2; each gets the variant's own embeddings output
          encoder  the whole BertModel, token ids in, last hidden state out.
          (each fused layer also gets that output's int8 codes, as the previous layer hands them on).
Modes:    eager; compiled (encoder scope): ``torch.compile(model, fullgraph=True)`` with inductor, compiled
          per batch before timing; and cuda graph: the forward captured once (``torch.cuda.CUDAGraph``) on
          static inputs after warm-up on a side stream, the replay timed. Graph rows are listed as
          unsupported on the CPU.
No attention mask is passed: every token is valid, and the forward then has no host synchronisation
(which capture forbids). Reports ms per forward, the speedup over each baseline of the same case (scope,
batch, mode), and the fidelity of the output against the float model's eager output: mean per-token
cosine and SQNR (dB). The report ends with the targets.

    python -m qbert.benchmarks.bench_e2e [--smoke] [--out DIR] [--threads N]
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from qbert.benchmarks import _harness as H
from tqdm import tqdm

from qbert import baselines
from qbert.ops._registry import BACKENDS
from qbert.timing import set_threads, time_fn

SUITE = "e2e"
SEQ_LEN = 128
BATCHES = {"cuda": (1, 32), "cpu": (1, 8)}
SMOKE_SEQ_LEN, SMOKE_BATCHES = 16, (1, 2)
# A BERT small enough that --smoke finishes in seconds; every other field is BertConfig()'s default.
SMOKE_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 64}
SCOPES = ("layer", "encoder")
EAGER, COMPILED, GRAPH = "eager", "compiled", "cuda graph"
MODES = (EAGER, COMPILED, GRAPH)
SCOPE_MODES = {"layer": (EAGER, GRAPH), "encoder": MODES}
WARMUP, REPEATS = 2, 10
SMOKE_WARMUP, SMOKE_REPEATS = 1, 2
GRAPH_WARMUP = 3  # calls before capture: lazy initialisation and library workspaces happen outside it
SEED = 0
AO_ENGINE = "onednn"
DB_PER_DECADE = 10
FUSED, UNFUSED = "qbert w8a8", "qbert w8a8 unfused"
# (row, which of the run's batches, minimum speedup over the float model in the same mode), encoder scope:
# W8A8 must pay off at a large batch and must not cost anything at batch 1.
TARGETS = ((FUSED, "largest", 1.7), (FUSED, "smallest", 1.0))


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

    def qbert_copy(scheme: str, **options: Any) -> Callable[[], torch.nn.Module]:
        return lambda: qbert.quantize(copy.deepcopy(model), scheme, **options)

    rows = [("fp32" if device.type == "cpu" else "fp16", True, lambda: model)]
    if device.type == "cpu":
        rows.append((f"torch.ao dynamic [{AO_ENGINE}]", True, lambda: baselines.ao_dynamic_int8(model, AO_ENGINE)))
    rows += [(FUSED, False, qbert_copy("w8a8")), (UNFUSED, False, qbert_copy("w8a8", fuse=False))]
    if device.type == "cpu":
        rows.append(("qbert w8a16", False, qbert_copy("w8a16")))
    return rows


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a 1-tuple from a layer


def units(variant: torch.nn.Module, scope: str, mode: str, input_ids: torch.Tensor) -> list[Callable[[], torch.Tensor]]:
    """The calls that are timed in turn: each encoder layer on the variant's embeddings output, or the model
    (compiled first in the compiled mode)."""
    from qbert import ops
    from qbert.nn.fused import FusedLayer

    if scope == "encoder":
        if mode == COMPILED:
            # Every variant recompiles the same forward code; each is timed at once, so earlier graphs
            # are dropped rather than counted against Dynamo's recompilation limit.
            torch._dynamo.reset()
        model = torch.compile(variant, fullgraph=True, backend="inductor") if mode == COMPILED else variant
        return [lambda: model(input_ids=input_ids).last_hidden_state]
    hidden = variant.embeddings(input_ids=input_ids)  # [batch, seq, hidden]
    codes = ops.quantize_per_token(hidden)
    return [lambda layer=layer: _layer_output(layer(hidden, codes=codes) if isinstance(layer, FusedLayer)
                                              else layer(hidden))
            for layer in variant.encoder.layer]


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn()`` recorded into a CUDA graph after warm-up on a side stream; the graph and its static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def measure(result: H.Result, calls: list[Callable[[], torch.Tensor]], mode: str, device: torch.device,
            reference: torch.Tensor | None, timing: dict[str, int]) -> torch.Tensor | None:
    """Run (eager) or capture and replay (graph) the calls, fill ``result``; the first call's output."""
    try:
        if mode != GRAPH:
            out = calls[0]()  # compiles, in the compiled mode
            timed, fn = calls, (lambda call: call())
        else:
            graphs = [capture(call) for call in calls]
            for graph, _ in graphs:
                graph.replay()
            out = graphs[0][1]
            timed, fn = graphs, (lambda graph_out: graph_out[0].replay())
    except H.BACKEND_FAILURES as exc:
        result.status, result.reason = H.STATUS_UNSUPPORTED, _failure(exc)
        return None
    if reference is not None:
        result.metrics = fidelity(out, reference)
    result.time_us = time_fn(fn, timed, device, **timing)
    return out


def evaluate_targets(results: list[H.Result], float_name: str, batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """The encoder-scope targets, per mode, from the ratios measured in this run."""
    pick = {"largest": max(batches), "smallest": min(batches)}
    targets = []
    for impl, which, minimum in TARGETS:
        for mode in MODES:
            batch = pick[which]
            row = next((r for r in results if r.impl == impl and r.case["scope"] == "encoder"
                        and r.case["batch"] == batch and r.case["mode"] == mode), None)
            target = {"row": impl, "baseline": float_name, "batch": batch, "mode": mode, "target": minimum}
            if row is None or float_name not in row.speedup:
                why = row.reason if row is not None and row.reason else "the row or its baseline was not timed"
                targets.append({**target, "verdict": "n/a", "reason": why})
                continue
            ratio = row.speedup[float_name]
            targets.append({**target, "ratio": ratio, "verdict": "PASS" if ratio >= minimum else "MISS"})
    return targets


def targets_markdown(targets: list[dict[str, Any]], seq_len: int) -> str:
    lines = ["", "### Targets (encoder scope; ratios measured in this run)", ""]
    for t in targets:
        head = f"- {t['row']} vs {t['baseline']}, batch {t['batch']} seq {seq_len}, {t['mode']}: "
        lines.append(head + (f"n/a ({t['reason']})" if t["verdict"] == "n/a"
                             else f"{t['ratio']:.3g}x (target >= {t['target']}): **{t['verdict']}**"))
    return "\n".join(lines) + "\n"


def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        device: torch.device | None = None, progress: bool = True) -> H.BenchOutput:
    device = device or H.default_device()
    set_threads(threads)
    seq_len, batches = (SMOKE_SEQ_LEN, SMOKE_BATCHES) if smoke else (SEQ_LEN, BATCHES[device.type])
    timing = {"warmup": SMOKE_WARMUP, "repeats": SMOKE_REPEATS} if smoke else {"warmup": WARMUP,
                                                                               "repeats": REPEATS}
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    model = build_model(smoke, device)
    gen = torch.Generator().manual_seed(SEED)
    input_ids = {b: torch.randint(model.config.vocab_size, (b, seq_len), generator=gen).to(device) for b in batches}
    model_name = "bert-tiny (random init)" if smoke else "bert-base (random init)"
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    float_name = variants(model, device)[0][0]

    results: list[H.Result] = []
    references: dict[tuple[str, int], torch.Tensor] = {}  # (scope, batch) -> the float model's eager output
    built: dict[str, torch.nn.Module | str] = {}
    configs = [(scope, b, mode, v) for scope in SCOPES for b in batches for mode in SCOPE_MODES[scope]
               for v in variants(model, device)]
    with torch.inference_mode():
        for scope, batch, mode, (name, baseline, build) in tqdm(configs, desc=f"{SUITE} ({device.type})",
                                                                disable=not progress):
            case = {"model": model_name, "scope": scope, "batch": batch, "seq": seq_len, "mode": mode}
            result = H.Result(case=case, impl=name, baseline=baseline, dtype=dtype)
            results.append(result)
            if name not in built:
                try:
                    built[name] = build()
                except H.BACKEND_FAILURES as exc:
                    built[name] = _failure(exc)
            variant = built[name]
            if isinstance(variant, str):
                result.status, result.reason = H.STATUS_UNSUPPORTED, variant
                continue
            if mode == GRAPH and device.type != "cuda":
                result.status = H.STATUS_UNSUPPORTED
                result.reason = f"CUDA graphs need a CUDA device, this run is on {device.type}"
                continue
            engine = baselines.quantized_engine(AO_ENGINE) if name.startswith("torch.ao") else contextlib.nullcontext()
            with engine:
                try:
                    calls = units(variant, scope, mode, input_ids[batch])
                except H.BACKEND_FAILURES as exc:
                    result.status, result.reason = H.STATUS_UNSUPPORTED, _failure(exc)
                    continue
                is_reference = name == float_name and mode == EAGER  # the float model runs first
                out = measure(result, calls, mode, device, None if is_reference else references.get((scope, batch)),
                              timing)
            if is_reference and out is not None:
                references[(scope, batch)] = out
    H.attach_speedups(results)
    targets = evaluate_targets(results, float_name, batches)
    meta = H.environment(device, threads, SUITE, smoke=smoke, config=dict(model.config.to_diff_dict()),
                         backends=list(BACKENDS), ao_engine=AO_ENGINE, graph_warmup=GRAPH_WARMUP, targets=targets,
                         ao_weights="per-channel int8, per-tensor dynamic activations")
    paths = H.write_reports(results, meta, out_dir, device, time_unit="ms")
    with paths["md"].open("a") as f:
        f.write(targets_markdown(targets, seq_len))
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__)
    args = parser.parse_args(argv)
    output = run(args.smoke, args.out, args.threads)
    return output.print()


if __name__ == "__main__":
    main()
