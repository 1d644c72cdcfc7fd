"""Benchmark the W8A8 linear layer on BERT shapes against fp32/fp16 F.linear, torch._int_mm and torch.ao.

Rows per case (shape x M), all measured in the same run on the same inputs:
  qbert w8a8 [backend]         w8a8_linear (quantize_per_token + int8_linear): the layer from float activations
  qbert int8_linear [backend]  int8_linear alone, from activations already quantized (the fused GEMM)
  fp32 F.linear (CPU) / fp16 F.linear (cuBLAS, CUDA)         baseline
  _int_mm+dequant              torch._int_mm on the same int8 codes, then a separate float dequant + bias
  torch.ao dynamic [engine]    (CPU) quantize_dynamic of the nn.Linear, per-channel int8 weights

    python -m qbert.benchmarks.bench_int8_linear [--smoke] [--out DIR] [--threads N] [--m 1,128]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from qbert.benchmarks import _harness as H
from qbert.benchmarks.shapes import LINEAR_SHAPES, M_VALUES, SMOKE_M_VALUES, SMOKE_SHAPES, LinearShape
from tqdm import tqdm

from qbert import baselines
from qbert.ops import BACKENDS, OPS, int8_linear, use_backend, w8a8_linear
from qbert.ops.int8_linear import int8_linear_reference
from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.timing import US_PER_S, input_copies, set_threads, time_fn

SUITE = "int8_linear"
THROUGHPUT_UNIT = "TOP/s"  # int8 rows; float baselines are TFLOP/s of the same GEMM
OPS_PER_MAC = 2
SMOKE_WARMUP, SMOKE_REPEATS = 1, 3
SEED = 0
FLOAT_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}


@dataclasses.dataclass
class Copy:
    """One copy of a case's inputs (CUDA timing rotates over several)."""

    x: torch.Tensor  # float [M, K]
    weight: torch.Tensor  # float [N, K]
    bias: torch.Tensor  # float [N]
    x_q: torch.Tensor  # int8 [M, K]
    x_scale: torch.Tensor  # float32 [M]
    w_q: torch.Tensor  # int8 [N, K]
    w_q_t: torch.Tensor  # int8 [K, N], a transposed view (torch._int_mm's layout)
    w_scale: torch.Tensor  # float32 [N]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.weight, self.bias, self.x_q, self.w_q))


def make_copy(shape: LinearShape, m: int, device: torch.device, gen: torch.Generator) -> Copy:
    dtype = FLOAT_DTYPE[device.type]
    x = torch.randn(m, shape.k, generator=gen).to(device, dtype)
    weight = (torch.randn(shape.n, shape.k, generator=gen) / shape.k ** 0.5).to(device, dtype)
    bias = torch.randn(shape.n, generator=gen).to(device, dtype)
    x_q, x_scale = quantize_per_token_reference(x)
    w_q, w_scale = quantize_per_token_reference(weight)
    return Copy(x, weight, bias, x_q, x_scale, w_q, w_q.t(), w_scale)


# ---- the implementations ---------------------------------------------------------------------------

def qbert_w8a8(c: Copy) -> torch.Tensor:
    return w8a8_linear(c.x, c.w_q, c.w_scale, c.bias)


def qbert_int8_linear(c: Copy) -> torch.Tensor:
    return int8_linear(c.x_q, c.x_scale, c.w_q, c.w_scale, c.bias, c.x.dtype)


def float_linear(c: Copy) -> torch.Tensor:
    return F.linear(c.x, c.weight, c.bias)


def int_mm_dequant(c: Copy) -> torch.Tensor:
    acc = torch._int_mm(c.x_q, c.w_q_t)
    return (acc.float() * c.x_scale[:, None] * c.w_scale + c.bias.float()).to(c.x.dtype)


def w8a8_expected(c: Copy) -> torch.Tensor:
    """What every int8 row must produce: the reference ops on the reference-quantized activations."""
    return int8_linear_reference(c.x_q, c.x_scale, c.w_q, c.w_scale, c.bias, c.x.dtype)


def qbert_reasons(backend: str, c: Copy, full_layer: bool) -> list[str]:
    if full_layer:
        return OPS["w8a8_linear"].reasons(backend, c.x, c.w_q, c.w_scale, c.bias)
    return OPS["int8_linear"].reasons(backend, c.x_q, c.x_scale, c.w_q, c.w_scale, c.bias, c.x.dtype)


# ---- one case -------------------------------------------------------------------------------------

def measure(case: dict[str, Any], impl: str, fn: Callable[[Copy], torch.Tensor], copies: list[Copy],
            device: torch.device, timing: dict[str, int], *, backend: str = "", baseline: bool = False,
            expected: torch.Tensor | None = None) -> H.Result:
    """Validate ``fn`` once (if ``expected`` is given), then time it; failures become rows with reasons."""
    result = H.Result(case=case, impl=impl, backend=backend, baseline=baseline,
                      dtype=str(copies[0].x.dtype).removeprefix("torch."))
    try:
        out = fn(copies[0])
    except H.BACKEND_FAILURES as exc:
        result.status, result.reason = H.STATUS_UNSUPPORTED, f"{type(exc).__name__}: {exc}".splitlines()[0]
        return result
    if expected is not None:
        wrong = H.mismatch(out, expected)
        if wrong:
            result.status, result.reason = H.STATUS_FAILED, f"does not match the reference: {wrong}"
            return result
    result.time_us = time_fn(fn, copies, device, **timing)
    macs = case["M"] * case["N"] * case["K"]
    result.throughput = OPS_PER_MAC * macs / (result.time_us / US_PER_S) / H.TERA
    return result


def run_case(shape: LinearShape, m: int, device: torch.device, backends: list[str], ao_engines: list[str],
             timing: dict[str, int], gen: torch.Generator) -> list[H.Result]:
    case = {"model": shape.model, "layer": shape.layer, "M": m, "N": shape.n, "K": shape.k}
    first = make_copy(shape, m, device, gen)
    n_copies = input_copies(first.nbytes()) if device.type == "cuda" else 1
    copies = [first] + [make_copy(shape, m, device, gen) for _ in range(n_copies - 1)]
    expected = w8a8_expected(first)
    rows = []
    for backend in backends:
        for impl, fn, full in (("qbert w8a8", qbert_w8a8, True), ("qbert int8_linear", qbert_int8_linear, False)):
            name = f"{impl} [{backend}]"
            reasons = qbert_reasons(backend, first, full)
            if reasons:
                rows.append(H.Result(case=case, impl=name, backend=backend, status=H.STATUS_UNSUPPORTED,
                                     reason="; ".join(reasons)))
                continue
            with use_backend(backend):
                rows.append(measure(case, name, fn, copies, device, timing, backend=backend, expected=expected))

    float_name = "fp32 F.linear" if device.type == "cpu" else "fp16 F.linear (cuBLAS)"
    rows.append(measure(case, float_name, float_linear, copies, device, timing, baseline=True))
    rows.append(measure(case, "_int_mm+dequant", int_mm_dequant, copies, device, timing, baseline=True,
                        expected=expected))
    if device.type == "cpu":
        linear = torch.nn.Linear(shape.k, shape.n)
        with torch.no_grad():
            linear.weight.copy_(first.weight)
            linear.bias.copy_(first.bias)
        for engine in ao_engines:
            module = baselines.ao_dynamic_int8(torch.nn.Sequential(linear), engine)
            with baselines.quantized_engine(engine), torch.no_grad():
                rows.append(measure(case, f"torch.ao dynamic [{engine}]", lambda c, mod=module: mod(c.x),
                                    copies, device, timing, baseline=True))
    return rows


# ---- the suite ------------------------------------------------------------------------------------

def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        m_values: tuple[int, ...] | None = None, backends: list[str] | None = None,
        ao_engines: list[str] | None = None, device: torch.device | None = None,
        progress: bool = True) -> H.BenchOutput:
    device = device or H.default_device()
    set_threads(threads)
    shapes = SMOKE_SHAPES if smoke else LINEAR_SHAPES
    m_values = m_values or (SMOKE_M_VALUES if smoke else M_VALUES)
    backends = list(BACKENDS) if backends is None else backends
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    ao_engines = (["onednn"] if "onednn" in baselines.ao_engines() else baselines.ao_engines()[:1]) if ao_engines is None \
        else ao_engines
    timing = {"warmup": SMOKE_WARMUP, "repeats": SMOKE_REPEATS} if smoke else {}
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)

    gen = torch.Generator().manual_seed(SEED)
    cases = [(s, m) for s in shapes for m in m_values]
    results: list[H.Result] = []
    with torch.inference_mode():
        for shape, m in tqdm(cases, desc=f"{SUITE} ({device.type})", disable=not progress):
            results += run_case(shape, m, device, backends, ao_engines if device.type == "cpu" else [],
                                timing, gen)
    H.attach_speedups(results)
    meta = H.environment(device, threads, SUITE, smoke=smoke, backends=backends, ao_engines=ao_engines,
                         ao_weights="per-channel int8, per-tensor dynamic activations")
    paths = H.write_reports(results, meta, out_dir, device, throughput_unit=THROUGHPUT_UNIT)
    plot = plot_speedups(results, paths["md"].with_suffix(".png"))
    if plot is not None:
        paths["png"] = plot
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def plot_speedups(results: list[H.Result], path: Path) -> Path | None:
    """Speedup of each qbert row over each baseline vs M, one panel per shape; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'qbert[bench]'): no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r.case["model"], r.case["layer"], r.case["N"], r.case["K"]) for r in results))
    cols = min(len(shapes), 4)
    rows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, shape in zip(axes.flat, shapes):
        mine = [r for r in results if (r.case["model"], r.case["layer"], r.case["N"], r.case["K"]) == shape]
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in mine:
            if not r.baseline:
                for base, s in r.speedup.items():
                    lines.setdefault(f"{r.impl} vs {base}", []).append((r.case["M"], s))
        for label, points in lines.items():
            ax.plot(*zip(*sorted(points)), marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{shape[0]} {shape[1]} N={shape[2]} K={shape[3]}", fontsize=9)
        ax.set_xlabel("M (tokens)")
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    axes[0][0].set_ylabel("speedup (baseline time / qbert time)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=2)
    fig.tight_layout(rect=(0, 0.05 + 0.02 * len(labels), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__)
    H.add_gemm_arguments(parser, f"all of {','.join(BACKENDS)}")
    parser.add_argument("--ao-engines", type=H.choice_list(baselines.ao_engines(), "torch.ao engine"), default=None,
                        help=f"torch.ao engines on CPU (default onednn; available: {','.join(baselines.ao_engines())})")
    args = parser.parse_args(argv)
    output = run(args.smoke, args.out, args.threads, args.m, args.backends, args.ao_engines)
    return output.print()


if __name__ == "__main__":
    main()
