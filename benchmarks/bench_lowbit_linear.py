"""Benchmark the low-bit linear layers (W{4,3,2}A16 and W{4,3,2}A8) against fp16/fp32 F.linear and the
int4 weight-only layers of other libraries, in the memory-bound (small M) and compute-bound regimes.

Rows per case (shape x M), all measured in the same run on the same inputs:
  qbert w<b>a16 [backend]   lowbit_linear, K groups of 128, asymmetric codes
  qbert w<b>a8 [backend]    w4a8_linear (per-token int8 activations, codes widened to int8)
  fp16 F.linear (cuBLAS) / fp32 F.linear (CPU)              baseline
  torchao int4 weight-only, bitsandbytes nf4               baselines where the package is installed
                                                           (else a row with the reason)
Columns: µs, TFLOP/s, GB/s moved (weight codes + scales + zeros, activations and output) and that as a
percentage of the device's copy bandwidth measured at the start of the run.

    python -m qbert.benchmarks.bench_lowbit_linear [--smoke] [--out DIR] [--threads N] [--m 1,16]
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from qbert.benchmarks import _harness as H
from qbert.benchmarks.bench_int8_linear import measure, plot_speedups
from qbert.benchmarks.shapes import LINEAR_SHAPES, SMOKE_SHAPES, LinearShape
from tqdm import tqdm

from qbert.ops import BACKENDS, OPS, lowbit_linear, use_backend, w4a8_linear
from qbert.ops.lowbit_linear import lowbit_linear_reference
from qbert.ops.w4a8_linear import w4a8_linear_reference
from qbert.quant.lowbit import LowBitScheme, quantize_lowbit
from qbert.quant.packing import pack
from qbert.timing import US_PER_S, input_copies, set_threads, time_fn

SUITE = "lowbit_linear"
THROUGHPUT_UNIT = "TFLOP/s"
SEED = 0
GROUP_SIZE = 128
BITS = (4, 3, 2)
FLOAT_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}
SMOKE_WARMUP, SMOKE_REPEATS = 1, 3
GIGA = 1e9
PERCENT = 100
# Large LLM-style matrices, where published weight-only kernels (Marlin, torchao) report their numbers.
LLM_SHAPES = (LinearShape("llm-8k", "square", 8192, 8192), LinearShape("llm-8k", "mlp_up", 28672, 8192))
# Memory-bound (weights dominate the traffic) and compute-bound token counts.
M_VALUES = (1, 16, 64, 512, 4096)
SMOKE_M_VALUES = (1, 16)
COPY_BYTES = 1 << 28  # 256 MiB: far past any cache, so the copy runs at memory bandwidth
SMOKE_COPY_BYTES = 1 << 22


@dataclasses.dataclass
class Copy:
    """One copy of a case's inputs: float activations and weight, and the packed weight of every width."""

    x: torch.Tensor  # float [M, K]
    weight: torch.Tensor  # float [N, K]
    bias: torch.Tensor  # float [N]
    packed: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # bits -> (w_packed, scales, zeros)

    def nbytes(self) -> int:
        tensors = [self.x, self.weight, self.bias, *(t for p in self.packed.values() for t in p)]
        return sum(t.numel() * t.element_size() for t in tensors)


def make_copy(shape: LinearShape, m: int, device: torch.device, gen: torch.Generator) -> Copy:
    dtype = FLOAT_DTYPE[device.type]
    x = torch.randn(m, shape.k, generator=gen).to(device, dtype)
    weight = torch.randn(shape.n, shape.k, generator=gen) / shape.k ** 0.5
    bias = torch.randn(shape.n, generator=gen).to(device, dtype)
    packed = {}
    for bits in BITS:
        q = quantize_lowbit(weight, LowBitScheme(bits, symmetric=False, group_size=GROUP_SIZE))
        packed[bits] = (pack(q.codes, bits).to(device), q.scale.to(device), q.zero.to(device))
    return Copy(x, weight.to(device, dtype), bias, packed)


def moved_bytes(c: Copy, bits: int | None) -> int:
    """Bytes a kernel must move at least: the weight as stored, the activations in and the output out."""
    weight = [c.weight] if bits is None else c.packed[bits]
    m, n = c.x.shape[0], c.weight.shape[0]
    out_bytes = m * n * c.x.element_size()
    return sum(t.numel() * t.element_size() for t in (*weight, c.x, c.bias)) + out_bytes


def copy_bandwidth(device: torch.device, nbytes: int, timing: dict[str, int]) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    time_us = time_fn(lambda s: dst.copy_(s), [src], device, **timing)
    return 2 * nbytes / (time_us / US_PER_S) / GIGA


# ---- baselines from other libraries ----------------------------------------------------------------

def torchao_int4(weight: torch.Tensor, bias: torch.Tensor):
    """torchao's int4 weight-only linear (group 128) built from the float layer; raises if unavailable."""
    if importlib.util.find_spec("torchao") is None:
        raise NotImplementedError("torchao is not installed")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    quantize_(linear, Int4WeightOnlyConfig(group_size=GROUP_SIZE))
    return linear


def bitsandbytes_nf4(weight: torch.Tensor, bias: torch.Tensor):
    """bitsandbytes' 4-bit NF4 linear; raises if unavailable."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise NotImplementedError("bitsandbytes is not installed")
    import bitsandbytes as bnb

    linear = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], compute_dtype=weight.dtype, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, quant_type="nf4")
    linear.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear.to(weight.device)


# ---- one case -------------------------------------------------------------------------------------

def _add_bandwidth(row: H.Result, nbytes: int, ceiling_gbs: float) -> H.Result:
    if row.time_us:
        gbs = nbytes / (row.time_us / US_PER_S) / GIGA
        row.metrics = {"GB/s": gbs, "% copy bw": PERCENT * gbs / ceiling_gbs}
    return row


def run_case(shape: LinearShape, m: int, device: torch.device, backends: list[str], timing: dict[str, int],
             gen: torch.Generator, ceiling_gbs: float) -> list[H.Result]:
    case = {"model": shape.model, "layer": shape.layer, "M": m, "N": shape.n, "K": shape.k}
    first = make_copy(shape, m, device, gen)
    n_copies = input_copies(first.nbytes()) if device.type == "cuda" else 1
    copies = [first] + [make_copy(shape, m, device, gen) for _ in range(n_copies - 1)]
    rows = []
    for bits in BITS:
        for name, op_name, op, reference in (("a16", "lowbit_linear", lowbit_linear, lowbit_linear_reference),
                                             ("a8", "w4a8_linear", w4a8_linear, w4a8_linear_reference)):
            args = (first.x, *first.packed[bits], bits, GROUP_SIZE, first.bias)
            expected = reference(*args)
            for backend in backends:
                impl = f"qbert w{bits}{name} [{backend}]"
                reasons = OPS[op_name].reasons(backend, *args)
                if reasons:
                    rows.append(H.Result(case=case, impl=impl, backend=backend, status=H.STATUS_UNSUPPORTED,
                                         reason="; ".join(reasons)))
                    continue

                def fn(c: Copy, op=op, bits=bits) -> torch.Tensor:
                    return op(c.x, *c.packed[bits], bits, GROUP_SIZE, c.bias)

                with use_backend(backend):
                    row = measure(case, impl, fn, copies, device, timing, backend=backend, expected=expected)
                rows.append(_add_bandwidth(row, moved_bytes(first, bits), ceiling_gbs))

    float_name = "fp32 F.linear" if device.type == "cpu" else "fp16 F.linear (cuBLAS)"
    row = measure(case, float_name, lambda c: F.linear(c.x, c.weight, c.bias), copies, device, timing,
                  baseline=True)
    rows.append(_add_bandwidth(row, moved_bytes(first, None), ceiling_gbs))
    for name, build in (("torchao int4 weight-only", torchao_int4), ("bitsandbytes nf4", bitsandbytes_nf4)):
        try:
            module = build(first.weight, first.bias)
        except (*H.BACKEND_FAILURES, ImportError, ValueError) as exc:
            rows.append(H.Result(case=case, impl=name, baseline=True, status=H.STATUS_UNSUPPORTED,
                                 reason=f"{type(exc).__name__}: {exc}".splitlines()[0]))
            continue
        rows.append(measure(case, name, lambda c, mod=module: mod(c.x), copies, device, timing, baseline=True))
    return rows


# ---- the suite ------------------------------------------------------------------------------------

def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        m_values: tuple[int, ...] | None = None, backends: list[str] | None = None,
        shapes: tuple[LinearShape, ...] | None = None, device: torch.device | None = None,
        progress: bool = True) -> H.BenchOutput:
    device = device or H.default_device()
    set_threads(threads)
    shapes = shapes or (SMOKE_SHAPES if smoke else LINEAR_SHAPES + LLM_SHAPES)
    m_values = m_values or (SMOKE_M_VALUES if smoke else M_VALUES)
    backends = list(BACKENDS) if backends is None else backends
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    timing = {"warmup": SMOKE_WARMUP, "repeats": SMOKE_REPEATS} if smoke else {}
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)
    ceiling_gbs = copy_bandwidth(device, SMOKE_COPY_BYTES if smoke else COPY_BYTES, timing)

    gen = torch.Generator().manual_seed(SEED)
    cases = [(s, m) for s in shapes for m in m_values]
    results: list[H.Result] = []
    with torch.inference_mode():
        for shape, m in tqdm(cases, desc=f"{SUITE} ({device.type})", disable=not progress):
            results += run_case(shape, m, device, backends, timing, gen, ceiling_gbs)
    H.attach_speedups(results)
    meta = H.environment(device, threads, SUITE, smoke=smoke, backends=backends, group_size=GROUP_SIZE,
                         copy_bandwidth_gbs=round(ceiling_gbs, 1),
                         torchao=H.package_version("torchao"), bitsandbytes=H.package_version("bitsandbytes"))
    paths = H.write_reports(results, meta, out_dir, device, throughput_unit=THROUGHPUT_UNIT)
    plot = plot_speedups(results, paths["md"].with_suffix(".png"))
    if plot is not None:
        paths["png"] = plot
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__)
    H.add_gemm_arguments(parser, f"all of {','.join(BACKENDS)}")
    parser.add_argument("--bert-only", action="store_true", help="skip the large LLM-style shapes")
    args = parser.parse_args(argv)
    shapes = LINEAR_SHAPES if args.bert_only else None
    output = run(args.smoke, args.out, args.threads, args.m, args.backends, shapes)
    return output.print()


if __name__ == "__main__":
    main()
