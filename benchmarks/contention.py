"""Threads and contention on the CPU: qbert W8A8 (the fused chain), torch.ao dynamic int8 and ONNX Runtime
int8 at 1 and 2 threads, on idle cores and with another process busy on them, under each OpenMP wait
policy.

Workloads: the e2e suite's CPU ones at encoder scope, eager (BERT-base s128 batch 1, all-MiniLM-L6-v2 on
BBC News leads). Load: "idle", or "busy" (``BUSY_PROCESSES`` processes spinning in a Python loop, started
before the case and stopped after it), the situation of a shared server. Wait policy: torch's CPU ops run
on OpenMP, whose policy is read once, when the runtime loads: "default" (GNU OpenMP's: a thread that waits
spins for milliseconds first, which under oversubscription takes the core from the thread holding the
work) or ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps). Each policy runs in a child process of its
own with the variable set. qbert's kernels run on qbert's own pool (``csrc/cpu/parallel.h``), whose waiting
threads spin briefly and then sleep under either policy, and a one-call encoder runs torch's remaining ops
serially; torch.ao lives on OpenMP; ONNX Runtime has its own thread pool and ignores the variable.
Rows are timed side by side (``qbert.timing.time_round_robin``, as in ``bench e2e``). Reports ms per
forward, the speedup over ORT int8 of the same configuration, and ``slowdown``: busy time / idle time of
the same row, policy and threads. The report ends with the target: at the largest thread count, under each
policy, qbert's slowdown no worse than ORT int8's.

    python -m qbert.benchmarks.contention [--smoke] [--out DIR] [--threads N]
(--threads is the largest thread count: the suite runs 1 and N; --smoke runs N only.)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from qbert.benchmarks import _harness as H
from qbert.benchmarks import _onnx_peers as peers
from qbert.benchmarks import bench_e2e as E
from tqdm import tqdm

import qbert
from qbert import baselines
from qbert.timing import set_threads, time_round_robin

SUITE = "contention"
POLICIES = {"default": None, "passive": "PASSIVE"}  # name -> OMP_WAIT_POLICY (None: unset)
LOADS = ("idle", "busy")
BUSY_PROCESSES = 1
BUSY_LOOP = "while True: pass"
WORKER_FLAG = "--worker"
RESULT_PREFIX = "contention-result: "  # the worker's one line of JSON on stdout
QBERT, ORT = E.FUSED, peers.ORT_INT8
MODULE = "qbert.benchmarks.contention"


@contextmanager
def load(name: str) -> Iterator[None]:
    """Within the block, ``BUSY_PROCESSES`` busy processes run beside this one (none when ``name`` is idle)."""
    procs = [] if name == "idle" else [subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
                                       for _ in range(BUSY_PROCESSES)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _rows(workload: E.Workload, batch: int, threads: int, exports: peers.Exports) -> dict[str, Callable[[], Any]]:
    """The timed calls of one case: each runs one forward (no grad) at ``threads``."""
    inputs = workload.inputs[batch]
    qbert_model = qbert.quantize(copy.deepcopy(workload.model), "w8a8", progress=False)
    ao_model = baselines.ao_dynamic_int8(workload.model, E.AO_ENGINE)
    rows: dict[str, Callable[[], Any]] = {}

    def torch_call(model: torch.nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return model(**inputs)
        return call

    rows[QBERT] = torch_call(qbert_model)
    rows[E.AO_NAME] = E._timed_call(torch_call(ao_model), ao=True)
    try:
        ort = peers.ort_int8(exports, threads)
        feed = peers.feed(inputs)
        rows[ORT] = lambda: ort(feed)
    except peers.PeerUnavailable:
        pass  # the parent lists ORT as unavailable (it checks the package itself)
    return rows


def worker(args: dict[str, Any]) -> None:
    """One policy's measurements (run in a child process with OMP_WAIT_POLICY set): prints one line of JSON,
    ``{workload: {batch: {threads: {load: {row: µs}}}}}``."""
    smoke = args["smoke"]
    timing = {"warmup": E.SMOKE_WARMUP, "repeats": E.SMOKE_REPEATS} if smoke else {"warmup": E.WARMUP,
                                                                                  "repeats": E.REPEATS}
    out: dict[str, Any] = {}
    for workload in (E.random_workload(smoke, torch.device("cpu")), E.real_text_workload(smoke)):
        if workload.error:
            continue
        exports = peers.Exports(workload.model)
        try:
            batch = workload.batches[0]
            for threads in args["threads"]:
                set_threads(threads)
                rows = _rows(workload, batch, threads, exports)
                for name in LOADS:
                    with load(name):
                        times = time_round_robin(rows, **timing, min_sample_s=E.SIDE_BY_SIDE_SAMPLE_S,
                                                 settle_calls=E.SETTLE_CALLS)
                    out.setdefault(workload.name, {}).setdefault(str(batch), {}).setdefault(
                        str(threads), {})[name] = times
        finally:
            exports.close()
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def _measure(policy: str | None, smoke: bool, threads: list[int]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    args = json.dumps({"smoke": smoke, "threads": threads})
    done = subprocess.run([sys.executable, "-m", MODULE, WORKER_FLAG, args], env=env, capture_output=True,
                          text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"contention worker (OMP_WAIT_POLICY={policy}) failed with exit status "
                           f"{done.returncode}: {done.stderr.strip().splitlines()[-1:] or 'no output'}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def evaluate_targets(results: list[H.Result], threads: int) -> list[dict[str, Any]]:
    """Per workload and policy at ``threads`` threads: qbert W8A8's slowdown against ORT int8's."""
    targets = []
    keys = dict.fromkeys((r.case["model"], r.case["wait policy"]) for r in results)
    for model, policy in keys:
        busy = {r.impl: r for r in results if r.case["model"] == model and r.case["wait policy"] == policy
                and r.case["threads"] == threads and r.case["load"] == "busy" and r.status == H.STATUS_OK}
        target = {"model": model, "wait policy": policy, "threads": threads}
        if QBERT not in busy or ORT not in busy:
            targets.append({**target, "verdict": "n/a", "reason": "qbert or ORT int8 was not timed"})
            continue
        mine, theirs = busy[QBERT].metrics["slowdown"], busy[ORT].metrics["slowdown"]
        targets.append({**target, "qbert": mine, "ort": theirs, "verdict": "PASS" if mine <= theirs else "MISS"})
    return targets


def targets_markdown(targets: list[dict[str, Any]]) -> str:
    lines = ["", "### Target (slowdown beside the busy process; measured in this run)", ""]
    for t in targets:
        head = f"- {t['model']}, {t['threads']} threads, {t['wait policy']} policy: "
        lines.append(head + (f"n/a ({t['reason']})" if t["verdict"] == "n/a" else
                             f"qbert W8A8 {t['qbert']:.3g}x vs ORT int8 {t['ort']:.3g}x (target: no worse): "
                             f"**{t['verdict']}**"))
    return "\n".join(lines) + "\n"


def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        progress: bool = True) -> H.BenchOutput:
    thread_counts = [threads] if smoke else sorted({1, threads})
    results: list[H.Result] = []
    missing = []
    try:
        peers.require("onnxruntime")
        peers.require("onnx")
    except peers.PeerUnavailable as exc:
        missing.append(str(exc))
    for policy_name, policy in tqdm(POLICIES.items(), desc="contention", unit="policy", disable=not progress):
        measured = _measure(policy, smoke, thread_counts)
        for model, by_batch in measured.items():
            for batch, by_threads in by_batch.items():
                for count, by_load in by_threads.items():
                    for name in LOADS:
                        times = by_load[name]
                        for impl, us in times.items():
                            case = {"model": model, "batch": int(batch), "threads": int(count),
                                    "wait policy": policy_name, "load": name}
                            row = H.Result(case, impl, baseline=impl == ORT, dtype="float32", time_us=us,
                                           metrics={"slowdown": round(us / by_load["idle"][impl], 3)})
                            if ORT in times and impl != ORT:
                                row.speedup[ORT] = times[ORT] / us
                            results.append(row)
                        if ORT not in times:
                            results.append(H.Result({"model": model, "batch": int(batch), "threads": int(count),
                                                     "wait policy": policy_name, "load": name}, ORT,
                                                    status=H.STATUS_UNSUPPORTED,
                                                    reason="; ".join(missing) or "not installed"))
    targets = evaluate_targets(results, max(thread_counts))
    meta = H.environment(torch.device("cpu"), threads, SUITE, smoke=smoke, thread_counts=thread_counts,
                         busy_processes=BUSY_PROCESSES, policies=POLICIES, ort=peers.describe(threads),
                         targets=targets)
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    paths = H.write_reports(results, meta, out_dir, torch.device("cpu"), time_unit="ms")
    with paths["md"].open("a") as f:
        f.write(targets_markdown(targets))
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def main(argv: list[str] | None = None) -> H.BenchOutput | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        worker(json.loads(argv[1]))
        return None
    args = H.suite_parser(__file__, __doc__).parse_args(argv)
    return run(smoke=args.smoke, out_dir=args.out, threads=args.threads).print()


if __name__ == "__main__":
    main()
