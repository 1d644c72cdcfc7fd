"""Where one forward's time goes: qbert W8A8 (the fused chain) on the e2e suite's CPU workloads, op by op.

Each workload's forward (BERT-base s128 at batch 1 and 8, all-MiniLM-L6-v2 on BBC News leads) runs under
``torch.profiler`` after warm-up; every op's self CPU time is put in one of ``CATEGORIES`` (by its name),
summed and divided by the profiled forwards. "rest" is the profiled wall time per forward minus the sum
of the categories: Python, the dispatcher, and the profiler's own cost (the profiled forward is slower
than an unprofiled one, whose time ``bench e2e`` reports). Shares are of the profiled wall time.

    python -m qbert.benchmarks.profile_forward [--smoke] [--out DIR] [--threads N]
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from qbert.benchmarks import _harness as H
from qbert.benchmarks import bench_e2e as E
from tqdm import tqdm

import qbert
from qbert.timing import US_PER_S, set_threads

SUITE = "profile"
WARMUP, FORWARDS = 3, 10
SMOKE_WARMUP, SMOKE_FORWARDS = 1, 2
REST = "rest (Python, dispatch, profiler)"
# (category, op-name prefixes); an op goes in the first category with a matching prefix, else "other ops".
CATEGORIES = (
    # int8_linear_gelu_cpu runs the FFN up-projection's GELU in the GEMM epilogue on AVX-512.
    ("int8 GEMM + epilogue", ("qbert::int8_linear_cpu", "qbert::int8_linear_gelu_cpu", "qbert::int8_gemm_cpu")),
    ("per-token quantize", ("qbert::quantize_per_token_cpu",)),
    ("add + LayerNorm + quantize", ("qbert::add_layernorm_quantize_cpu",)),
    ("GELU", ("aten::gelu",)),
    ("attention (softmax(QK^T)V)", ("qbert::varlen_attention_cpu", "aten::_scaled_dot_product", "aten::bmm", "aten::_softmax", "aten::baddbmm",
                                    "aten::matmul")),
    # The embedding lookups run index_select too: the op name cannot tell them from the unpadding's rows.
    ("row gather / scatter (embedding lookups, unpadding)", ("aten::index", "aten::nonzero")),
    ("embeddings + first LayerNorm", ("aten::embedding", "aten::native_layer_norm")),
    # The one-call layer's own time (qbert.ops.w8a8_encoder_layer): its kernels are ranges of their own.
    ("one-call layer glue", ("qbert::w8a8_encoder_layer_cpu",)),
)
OTHER = "other ops"


def category(op: str) -> str:
    for name, prefixes in CATEGORIES:
        if op.startswith(prefixes):
            return name
    return OTHER


def profile(model: torch.nn.Module, inputs: dict[str, torch.Tensor], warmup: int, forwards: int
            ) -> tuple[dict[str, float], float]:
    """({category: self µs per forward}, profiled wall µs per forward)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        for _ in range(warmup):
            model(**inputs)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(forwards):
                model(**inputs)
            wall = (time.perf_counter() - start) / forwards * US_PER_S
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = category(event.key)
        totals[name] = totals.get(name, 0.0) + event.self_cpu_time_total / forwards
    return totals, wall


def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        progress: bool = True) -> H.BenchOutput:
    device = torch.device("cpu")
    set_threads(threads)
    warmup, forwards = (SMOKE_WARMUP, SMOKE_FORWARDS) if smoke else (WARMUP, FORWARDS)
    workloads = [E.random_workload(smoke, device), E.real_text_workload(smoke)]
    results: list[H.Result] = []
    cases = [(w, b) for w in workloads for b in w.batches]
    for workload, batch in tqdm(cases, desc="profile", unit="case", disable=not progress):
        case = {"model": workload.name, "batch": batch, "seq": workload.seq, "padding": workload.padding(batch)}
        if workload.error:
            results.append(H.Result(case, "all", status=H.STATUS_UNSUPPORTED, reason=workload.error))
            continue
        model = qbert.quantize(copy.deepcopy(workload.model), "w8a8", progress=False)
        totals, wall = profile(model, workload.inputs[batch], warmup, forwards)
        order = [name for name, _ in CATEGORIES] + [OTHER]
        rest = wall - sum(totals.values())
        for name, us in [*((n, totals.get(n, 0.0)) for n in order), (REST, rest), ("total (profiled)", wall)]:
            results.append(H.Result(case, name, time_us=us, metrics={"share": round(us / wall, 3)}))
    meta = H.environment(device, threads, SUITE, smoke=smoke, forwards=forwards,
                         workloads=[w.describe() for w in workloads])
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    paths = H.write_reports(results, meta, out_dir, device, time_unit="ms")
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def main(argv: list[str] | None = None) -> H.BenchOutput:
    args = H.suite_parser(__file__, __doc__).parse_args(argv)
    return run(smoke=args.smoke, out_dir=args.out, threads=args.threads).print()


if __name__ == "__main__":
    main()
