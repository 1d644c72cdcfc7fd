"""Benchmark the int8 GEMM family (int8_gemm, int8_linear with and without GELU, int8_linear_requant) on
BERT shapes from M = 16 to 49152 tokens and on an 8192^3 GEMM, against cuBLAS and torch's int8 / fp8 GEMMs.

Rows per case (shape x M), all measured in the same run on the same inputs:
  qbert int8_gemm [backend]                 int8 x int8 -> int32
  qbert int8_linear [backend]               -> fp16 (CPU: fp32); dequant + bias in the epilogue
  qbert int8_linear+gelu [backend]          the same with GELU in the epilogue
  qbert int8_linear_requant+gelu [backend]  -> int8 codes + per-token scale (BERT's FFN1 feeding FFN2)
  fp16 F.linear (cuBLAS) / fp32 F.linear (CPU)     baseline
  bf16 F.linear (cuBLAS)                           CUDA only
  _int_mm                                          baseline: torch's int8 GEMM, int32 out
  _int_mm+dequant                                  baseline: + a separate dequant + bias to the float dtype
  _int_mm+dequant+gelu+quantize                    baseline: + GELU + quantize_per_token, the unfused requant
  _scaled_mm fp8 e4m3 row-wise                     scale_a [M, 1], scale_b [1, N] float32, fp16 out; sm_89+
The qbert backends are those the registry can dispatch to on the device (cuda and triton on a GPU, cpu on
the CPU); every row is validated once against the op's reference before it is timed.

Columns: µs per call -- on CUDA the GPU's time, from CUDA-graph replays of the calls over the rotated
input copies, with "eager µs" beside it for the same calls launched one by one from Python (a small GEMM
can take less GPU time than its launch); TOP/s (2*M*N*K per call, TFLOP/s for the float rows); GB/s of the
bytes a row must move at least (its operands, scales and bias in, its result out), and these as % of the
int8 peak and of the DRAM bandwidth measured at the start of the run (the best torch._int_mm TOP/s over
large GEMMs; a device-to-device copy); the ratio to each baseline. The report ends with the targets and
the ceilings, and a roofline and a speedup-vs-M plot are written beside it.

    python -m qbert.benchmarks.bench_int8_gemm [--smoke] [--out DIR] [--threads N] [--m 16,4096] [--backends cuda]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from qbert.benchmarks import _harness as H
from qbert.benchmarks import bench_int8_linear
from qbert.benchmarks.bench_int8_linear import float_linear, int_mm_dequant
from qbert.benchmarks.bench_lowbit_linear import COPY_BYTES, SMOKE_COPY_BYTES, copy_bandwidth
from qbert.benchmarks.shapes import (
    LINEAR_SHAPES,
    M_SWEEP,
    SMOKE_M_VALUES,
    SMOKE_SHAPES,
    SMOKE_SQUARE,
    SQUARE,
    LinearShape,
)
from tqdm import tqdm

from qbert.ops import (
    BACKENDS,
    OPS,
    int8_gemm,
    int8_linear,
    int8_linear_requant,
    quantize_per_token,
    use_backend,
)
from qbert.ops._registry import device_reasons
from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.timing import L2_FLUSH_BYTES, US_PER_S, set_threads, time_cuda, time_fn

SUITE = "int8_gemm"
THROUGHPUT_UNIT = "TOP/s"  # int8 rows; the float rows are TFLOP/s of the same GEMM
OPS_PER_MAC = 2
SEED = 0
SMOKE_WARMUP, SMOKE_REPEATS = 1, 3
FLOAT_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}
FLOAT_BASELINE = {"cpu": "fp32 F.linear", "cuda": "fp16 F.linear (cuBLAS)"}
GIGA = 1e9
PERCENT = 100
# (M, N, K) of the GEMMs whose best torch._int_mm throughput is the run's int8 peak: large enough to keep
# every tensor core busy.
PEAK_SHAPES = ((8192, 8192, 8192), (16384, 16384, 8192))
SMOKE_PEAK_SHAPES = ((256, 256, 256),)
# Input copies are rotated until their int8 operands together overflow L2 twice (L2_FLUSH_BYTES). The
# smallest BERT weight (768 x 768 int8, 0.6 MB) needs ~170 copies; the harness's cap of 64 would leave it
# in L2.
MAX_COPIES = 256
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: a row's largest magnitude maps to the largest e4m3 value
FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm_89) and Hopper (sm_90)
# torch._scaled_mm reports refused inputs as RuntimeError (TORCH_CHECK) or ValueError (TORCH_CHECK_VALUE).
FP8_FAILURES = (RuntimeError, ValueError)
# The unfused chain rounds y to fp16 before GELU and the quantizer. That moves y / scale by at most
# 127 * ~2 fp16 ulps (< 0.13), so a code can cross one rounding boundary, never two.
CHAIN_CODE_SLACK = 1
# The targets at BERT shapes are for compute-bound token counts.
TARGET_MIN_M, SMOKE_TARGET_MIN_M = 4096, 16
SQUARE_MODEL = SQUARE.model  # the case whose int8_gemm is compared with _int_mm


@dataclasses.dataclass
class Copy(bench_int8_linear.Copy):
    """One copy of a case's inputs (CUDA timing rotates over several): int8_linear's, plus fp8 and bf16."""

    x_fp8: torch.Tensor  # e4m3 [M, K]
    x_fp8_scale: torch.Tensor  # float32 [M, 1]
    w_fp8_t: torch.Tensor  # e4m3 [K, N], a transposed view of [N, K] (column-major, as _scaled_mm wants)
    w_fp8_scale: torch.Tensor  # float32 [1, N]
    x_bf16: torch.Tensor | None  # bf16 copies of x, weight, bias on CUDA
    weight_bf16: torch.Tensor | None
    bias_bf16: torch.Tensor | None


def _fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 codes of ``t`` [R, K] and their float32 scales [R]."""
    amax = t.float().abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    scale = amax / FP8_MAX
    return (t.float() / scale[:, None]).to(FP8), scale


def make_copy(shape: LinearShape, m: int, device: torch.device, gen: torch.Generator) -> Copy:
    dtype = FLOAT_DTYPE[device.type]
    x = torch.randn(m, shape.k, generator=gen, device=device).to(dtype)
    weight = (torch.randn(shape.n, shape.k, generator=gen, device=device) / shape.k ** 0.5).to(dtype)
    bias = torch.randn(shape.n, generator=gen, device=device).to(dtype)
    x_q, x_scale = quantize_per_token_reference(x)
    w_q, w_scale = quantize_per_token_reference(weight)
    x_fp8, x_fp8_scale = _fp8_rows(x)
    w_fp8, w_fp8_scale = _fp8_rows(weight)
    cuda = device.type == "cuda"
    return Copy(x, weight, bias, x_q, x_scale, w_q, w_q.t(), w_scale, x_fp8, x_fp8_scale[:, None], w_fp8.t(),
                w_fp8_scale[None, :], x.bfloat16() if cuda else None, weight.bfloat16() if cuda else None,
                bias.bfloat16() if cuda else None)


def n_copies(first: Copy, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    int8_bytes = first.x_q.numel() + first.w_q.numel()  # the smallest footprint of any row
    return max(1, min(MAX_COPIES, math.ceil(L2_FLUSH_BYTES / int8_bytes)))


# ---- the implementations ---------------------------------------------------------------------------

def bf16_linear(c: Copy) -> torch.Tensor:
    return F.linear(c.x_bf16, c.weight_bf16, c.bias_bf16)


def int_mm(c: Copy) -> torch.Tensor:
    return torch._int_mm(c.x_q, c.w_q_t)


def int_mm_requant_chain(c: Copy) -> tuple[torch.Tensor, torch.Tensor]:
    """What a model runs without the fused epilogue: dequantize to the float dtype, GELU, quantize again."""
    return quantize_per_token(F.gelu(int_mm_dequant(c)))


def scaled_mm_fp8(c: Copy) -> torch.Tensor:
    return torch._scaled_mm(c.x_fp8, c.w_fp8_t, c.x_fp8_scale, c.w_fp8_scale, bias=c.bias, out_dtype=c.x.dtype)


def fp8_expected(c: Copy) -> torch.Tensor:
    """_scaled_mm's math on the same e4m3 codes, in float64 (exact products and sums at these sizes)."""
    acc = c.x_fp8.double() @ c.w_fp8_t.double()
    return (acc * c.x_fp8_scale.double() * c.w_fp8_scale.double() + c.bias.double()).to(c.x.dtype)


@dataclasses.dataclass(frozen=True)
class QbertOp:
    """A qbert row: the op, its positional arguments (the signature its registry rows see), its output."""

    label: str
    op: str
    args: Callable[[Copy], tuple]
    dtype: Callable[[Copy], str]
    reads: Callable[[Copy], tuple]  # the inputs it must read (for GB/s)


def _linear_args(activation: str) -> Callable[[Copy], tuple]:
    return lambda c: (c.x_q, c.x_scale, c.w_q, c.w_scale, c.bias, c.x.dtype, activation)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _int8_operands(c: Copy) -> tuple:
    return (c.x_q, c.w_q)


def _operands(c: Copy) -> tuple:
    return (c.x_q, c.x_scale, c.w_q, c.w_scale, c.bias)


def _float_out(c: Copy) -> str:
    return f"int8->{_dtype_name(c.x.dtype)}"


QBERT_OPS = (
    QbertOp("int8_gemm", "int8_gemm", _int8_operands, lambda c: "int8->int32", _int8_operands),
    QbertOp("int8_linear", "int8_linear", _linear_args("none"), _float_out, _operands),
    QbertOp("int8_linear+gelu", "int8_linear", _linear_args("gelu"), _float_out, _operands),
    QbertOp("int8_linear_requant+gelu", "int8_linear_requant",
            lambda c: (c.x_q, c.x_scale, c.w_q, c.w_scale, c.bias, "gelu"), lambda c: "int8->int8", _operands),
)
OP_FUNCTIONS = {"int8_gemm": int8_gemm, "int8_linear": int8_linear, "int8_linear_requant": int8_linear_requant}


def default_backends(device: torch.device) -> list[str]:
    """The backends dispatch can pick on ``device`` (the registry's device rules, nothing forced). The
    reference is the specification the rows are validated against, not a candidate to time."""
    return [b for b in BACKENDS if b != "reference" and not device_reasons(b, device.type)]


# ---- validation -----------------------------------------------------------------------------------

def requant_mismatch(out: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
                     code_slack: int, scale_tol: float) -> str:
    """Empty if the codes differ from the reference's by at most ``code_slack`` and the scales by at most
    ``scale_tol`` relative, else what differs."""
    (q, scale), (q_ref, scale_ref) = out, ref
    if q.shape != q_ref.shape or q.dtype != q_ref.dtype or scale.shape != scale_ref.shape:
        return (f"got codes {q.dtype}{list(q.shape)} / scales {list(scale.shape)}, the reference gives "
                f"{q_ref.dtype}{list(q_ref.shape)} / {list(scale_ref.shape)}")
    worst = int((q.int() - q_ref.int()).abs().max())
    if worst > code_slack:
        return f"codes differ from the reference by up to {worst} (allowed: {code_slack})"
    scale_err = ((scale - scale_ref).abs() / scale_ref).max().item()
    return f"scales differ from the reference by {scale_err:.2e} relative (allowed: {scale_tol:.0e})" \
        if scale_err > scale_tol else ""


def codes_off(out: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> int:
    return int((out[0] != ref[0]).sum())


# ---- one row --------------------------------------------------------------------------------------

def moved_bytes(tensors: tuple, out: Any) -> int:
    """Bytes read (``tensors``) plus bytes written (``out``, a tensor or a tuple of them)."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum(t.numel() * t.element_size() for t in (*tensors, *outs) if isinstance(t, torch.Tensor))


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def time_graph(fn: Callable[[Copy], Any], copies: list[Copy], timing: dict[str, int]) -> float:
    """Median µs per call of ``fn`` over the rotated copies, replayed from one CUDA graph: the GPU's time,
    without the Python and launch overhead that a small GEMM's eager call can be dominated by."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            fn(c)
    return time_cuda(lambda g: g.replay(), [graph], **timing) / len(copies)


@dataclasses.dataclass
class Context:
    """What every row of a run shares."""

    device: torch.device
    timing: dict[str, int]
    peak_tops: float | None
    bandwidth_gbs: float


def measure(case: dict[str, Any], impl: str, fn: Callable[[Copy], Any], reads: Callable[[Copy], tuple],
            copies: list[Copy], ctx: Context, check: Callable[[Any], str] | None, *, dtype: str,
            backend: str = "", baseline: bool = False, failures: tuple = H.BACKEND_FAILURES,
            extra: Callable[[Any], dict[str, float]] | None = None) -> H.Result:
    """Run ``fn`` once and ``check`` its output (if given), then time it; failures become rows with reasons."""
    result = H.Result(case=case, impl=impl, backend=backend, baseline=baseline, dtype=dtype)
    try:
        out = fn(copies[0])
    except failures as exc:
        result.status, result.reason = H.STATUS_UNSUPPORTED, _failure(exc)
        return result
    wrong = check(out) if check is not None else ""
    if wrong:
        result.status, result.reason = H.STATUS_FAILED, f"does not match the reference: {wrong}"
        return result
    eager_us = time_fn(fn, copies, ctx.device, **ctx.timing)  # also the warm-up (autotuning) before capture
    if ctx.device.type == "cuda":
        try:
            result.time_us = time_graph(fn, copies, ctx.timing)
        except H.BACKEND_FAILURES as exc:
            result.status, result.reason = H.STATUS_UNSUPPORTED, f"CUDA graph capture failed: {_failure(exc)}"
            result.metrics = {"eager µs": eager_us}
            return result
        result.metrics = {"eager µs": eager_us}
    else:
        result.time_us = eager_us
    seconds = result.time_us / US_PER_S
    ops = OPS_PER_MAC * case["M"] * case["N"] * case["K"]
    nbytes = moved_bytes(reads(copies[0]), out)
    result.throughput = ops / seconds / H.TERA
    gbs = nbytes / seconds / GIGA
    result.metrics |= {"GB/s": gbs, "ops/B": ops / nbytes, "% DRAM bw": PERCENT * gbs / ctx.bandwidth_gbs}
    if ctx.peak_tops:
        result.metrics["% int8 peak"] = PERCENT * result.throughput / ctx.peak_tops
    if extra is not None:
        result.metrics.update(extra(out))
    return result


# ---- one case -------------------------------------------------------------------------------------

def references(first: Copy) -> dict[str, Any]:
    """Each qbert op's reference output on the first copy, by label: what its rows and the matching torch
    rows must produce."""
    with use_backend("reference"):
        return {spec.label: OP_FUNCTIONS[spec.op](*spec.args(first)) for spec in QBERT_OPS}


def qbert_check(spec: QbertOp, expected: Any) -> Callable[[Any], str]:
    if spec.op == "int8_linear_requant":
        # The epilogue does the reference's float32 math in the same order: the codes must be exact.
        return lambda out: requant_mismatch(out, expected, 0, H.FLOAT_REL_TOL[torch.float32])
    return lambda out: H.mismatch(out, expected)


def qbert_rows(case: dict[str, Any], copies: list[Copy], ctx: Context, backends: list[str],
               expected: dict[str, Any]) -> list[H.Result]:
    first = copies[0]
    rows = []
    for spec in QBERT_OPS:
        op = OP_FUNCTIONS[spec.op]
        for backend in backends:
            name = f"qbert {spec.label} [{backend}]"
            reasons = OPS[spec.op].reasons(backend, *spec.args(first))
            if reasons:
                rows.append(H.Result(case=case, impl=name, backend=backend, dtype=spec.dtype(first),
                                     status=H.STATUS_UNSUPPORTED, reason="; ".join(reasons)))
                continue
            with use_backend(backend):
                rows.append(measure(case, name, lambda c, op=op, spec=spec: op(*spec.args(c)), spec.reads, copies,
                                    ctx, qbert_check(spec, expected[spec.label]), dtype=spec.dtype(first),
                                    backend=backend))
    return rows


def fp8_row(case: dict[str, Any], copies: list[Copy], ctx: Context) -> H.Result:
    name = "_scaled_mm fp8 e4m3 row-wise"
    dtype = f"{_dtype_name(FP8)}->{_dtype_name(copies[0].x.dtype)}"
    if ctx.device.type == "cuda":
        capability = torch.cuda.get_device_capability(ctx.device)
        if capability < FP8_MIN_CAPABILITY:
            return H.Result(case=case, impl=name, dtype=dtype, status=H.STATUS_UNSUPPORTED,
                            reason=f"fp8 tensor cores need compute capability "
                                   f"{'.'.join(map(str, FP8_MIN_CAPABILITY))}+, got {capability[0]}.{capability[1]}")
    expected = fp8_expected(copies[0])
    return measure(case, name, scaled_mm_fp8, lambda c: (c.x_fp8, c.x_fp8_scale, c.w_fp8_t, c.w_fp8_scale, c.bias),
                   copies, ctx, lambda out: H.mismatch(out, expected), dtype=dtype, failures=FP8_FAILURES)


def run_case(shape: LinearShape, m: int, ctx: Context, backends: list[str], gen: torch.Generator) -> list[H.Result]:
    case = {"model": shape.model, "layer": shape.layer, "M": m, "N": shape.n, "K": shape.k}
    first = make_copy(shape, m, ctx.device, gen)
    copies = [first] + [make_copy(shape, m, ctx.device, gen) for _ in range(n_copies(first, ctx.device) - 1)]
    expected = references(first)
    rows = qbert_rows(case, copies, ctx, backends, expected)

    float_dtype = _dtype_name(first.x.dtype)
    rows.append(measure(case, FLOAT_BASELINE[ctx.device.type], float_linear, lambda c: (c.x, c.weight, c.bias),
                        copies, ctx, None, dtype=float_dtype, baseline=True))
    if first.x_bf16 is not None:
        rows.append(measure(case, "bf16 F.linear (cuBLAS)", bf16_linear,
                            lambda c: (c.x_bf16, c.weight_bf16, c.bias_bf16), copies, ctx, None, dtype="bfloat16"))
    acc, linear, requant = (expected[label] for label in ("int8_gemm", "int8_linear", "int8_linear_requant+gelu"))
    chain_tol = H.FLOAT_REL_TOL[first.x.dtype]  # the scales come from GELU outputs rounded to the float dtype
    rows.append(measure(case, "_int_mm", int_mm, _int8_operands, copies, ctx,
                        lambda out: H.mismatch(out, acc), dtype="int8->int32", baseline=True))
    rows.append(measure(case, "_int_mm+dequant", int_mm_dequant, _operands, copies, ctx,
                        lambda out: H.mismatch(out, linear), dtype=_float_out(first), baseline=True))
    rows.append(measure(case, "_int_mm+dequant+gelu+quantize", int_mm_requant_chain, _operands, copies, ctx,
                        lambda out: requant_mismatch(out, requant, CHAIN_CODE_SLACK, chain_tol),
                        dtype="int8->int8", baseline=True,
                        extra=lambda out: {"codes != ref": codes_off(out, requant)}))
    rows.append(fp8_row(case, copies, ctx))
    return rows


# ---- ceilings -------------------------------------------------------------------------------------

def int8_peak(device: torch.device, shapes: tuple[tuple[int, int, int], ...], timing: dict[str, int],
              gen: torch.Generator) -> dict[str, Any]:
    """The best torch._int_mm TOP/s over ``shapes`` (M, N, K): the run's int8 ceiling, with each measurement."""
    measured, refused = {}, {}
    for m, n, k in shapes:
        label = f"{m}x{n}x{k}"
        a = torch.randint(-128, 128, (m, k), generator=gen, device=device, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=gen, device=device, dtype=torch.int8)
        try:
            time_us = time_fn(lambda t, a=a: torch._int_mm(a, t), [b.t()], device, **timing)
        except H.BACKEND_FAILURES as exc:
            refused[label] = _failure(exc)
            continue
        measured[label] = OPS_PER_MAC * m * n * k / (time_us / US_PER_S) / H.TERA
    best = max(measured, key=measured.get) if measured else None
    return {"tops": measured[best] if best else None, "shape": best, "measured_tops": measured, "refused": refused}


# ---- targets --------------------------------------------------------------------------------------

def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _case_label(case: dict[str, Any]) -> str:
    return f"{case['model']} {case['layer']} M={case['M']}"


def evaluate_targets(results: list[H.Result], float_baseline: str, min_m: int) -> list[dict[str, Any]]:
    """Each target row against its baseline over its cases: the measured ratios, never assumed ones."""
    square = ("the square GEMM", lambda case: case["model"] == SQUARE_MODEL)
    bert = (f"BERT shapes, M >= {min_m}", lambda case: case["model"] != SQUARE_MODEL and case["M"] >= min_m)
    specs = (("qbert int8_gemm", "_int_mm", square, 0.90),
             ("qbert int8_linear", float_baseline, bert, 1.8),
             ("qbert int8_linear", "_int_mm+dequant", bert, 1.15))
    targets = []
    for prefix, baseline, (cases, selects), minimum in specs:
        rows = [r for r in results if r.impl.startswith(prefix + " [") and selects(r.case)]
        for impl in dict.fromkeys(r.impl for r in rows):
            mine = [r for r in rows if r.impl == impl]
            ratios = [(r.speedup[baseline], r.case) for r in mine if baseline in r.speedup]
            target = {"row": impl, "baseline": baseline, "cases": cases, "target": minimum, "total": len(mine),
                      "measured": len(ratios)}
            if not ratios:
                why = next((r.reason for r in mine if r.reason), "")
                if not why:
                    why = next((b.reason for b in results if b.impl == baseline and selects(b.case) and b.reason),
                               "no baseline timing")
                targets.append({**target, "verdict": "n/a", "reason": why})
                continue
            worst, worst_case = min(ratios, key=lambda rc: rc[0])
            values = [v for v, _ in ratios]
            targets.append({**target, "min": worst, "worst_case": _case_label(worst_case),
                            "geomean": _geomean(values), "passed": sum(v >= minimum for v in values),
                            "verdict": "PASS" if worst >= minimum else "MISS"})
    return targets


def targets_markdown(targets: list[dict[str, Any]], ceilings: dict[str, Any]) -> str:
    lines = ["", "### Targets (ratios measured in this run; PASS needs the worst case to reach the target)", ""]
    for t in targets:
        head = f"- {t['row']} vs {t['baseline']}, {t['cases']}: "
        if t["verdict"] == "n/a":
            lines.append(head + f"n/a ({t['reason']}); target >= {t['target']}")
            continue
        lines.append(head + f"worst {t['min']:.3g} ({t['worst_case']}), geomean {t['geomean']:.3g}, "
                            f"{t['passed']}/{t['measured']} cases >= {t['target']}"
                     + (f" ({t['measured']} of {t['total']} cases measured)" if t["measured"] < t["total"] else "")
                     + f": **{t['verdict']}**")
    peak = ceilings["int8_peak"]
    if peak["tops"]:
        each = ", ".join(f"{shape} {tops:.4g}" for shape, tops in peak["measured_tops"].items())
        peak_text = f"{peak['tops']:.4g} TOP/s (best torch._int_mm, at {peak['shape']}; all: {each})"
    else:
        peak_text = f"not measured ({peak['refused']})"
    copy_mib = ceilings["copy_bytes"] >> 20
    dram = f"{ceilings['dram_gbs']:.4g} GB/s (device copy of {copy_mib} MiB, bytes read + written)"
    lines += ["", f"Measured ceilings: int8 peak {peak_text}; DRAM bandwidth {dram}.", ""]
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'qbert[bench]'): no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = "osD^v<>ph*XP"


def _legend_label(impl: str) -> str:
    """matplotlib leaves labels that start with "_" out of legends: name torch's private ops in full."""
    return f"torch.{impl}" if impl.startswith("_") else impl
ROOFLINE_POINTS = 200  # samples of the memory-bound ceiling line
AXIS_MARGIN = 2.0  # the plot spans the points' arithmetic intensities widened by this factor each side


def plot_roofline(results: list[H.Result], peak_tops: float | None, bandwidth_gbs: float, title: str,
                  path: Path) -> Path | None:
    """Achieved TOP/s against arithmetic intensity (ops per byte moved), log-log, under the measured ceilings."""
    timed = [r for r in results if r.time_us]
    plt = _pyplot() if timed else None
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, impl in enumerate(dict.fromkeys(r.impl for r in timed)):
        points = [(r.metrics["ops/B"], r.throughput) for r in timed if r.impl == impl]
        ax.scatter(*zip(*points), s=16, marker=MARKERS[i % len(MARKERS)], label=_legend_label(impl))
    intensities = [r.metrics["ops/B"] for r in timed]
    low, high = min(intensities) / AXIS_MARGIN, max(intensities) * AXIS_MARGIN
    grid = [low * (high / low) ** (i / (ROOFLINE_POINTS - 1)) for i in range(ROOFLINE_POINTS)]
    memory_bound = [a * bandwidth_gbs * GIGA / H.TERA for a in grid]
    label = f"DRAM {bandwidth_gbs:.4g} GB/s"
    if peak_tops:
        memory_bound = [min(v, peak_tops) for v in memory_bound]
        label += f", int8 peak {peak_tops:.4g} TOP/s"
    ax.plot(grid, memory_bound, color="black", linewidth=1.2, label=f"measured ceilings ({label})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (ops per byte moved)")
    ax.set_ylabel("TOP/s (TFLOP/s for float rows)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speedup_vs_m(results: list[H.Result], baseline: str, path: Path) -> Path | None:
    """Speedup of every timed row over ``baseline`` against M, one panel per shape."""
    plt = _pyplot()
    if plt is None:
        return None
    key = lambda r: (r.case["model"], r.case["layer"], r.case["N"], r.case["K"])
    shapes = list(dict.fromkeys(key(r) for r in results))
    cols = min(len(shapes), 3)
    rows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in results:
            if key(r) == shape and baseline in r.speedup:
                lines.setdefault(r.impl, []).append((r.case["M"], r.speedup[baseline]))
        for i, (impl, points) in enumerate(lines.items()):
            ax.plot(*zip(*sorted(points)), marker=MARKERS[i % len(MARKERS)], markersize=3, linewidth=1,
                    label=_legend_label(impl))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")  # 0.5x and 2x equally far from 1
        ax.set_title(f"{shape[0]} {shape[1]} N={shape[2]} K={shape[3]}", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(f"x {baseline}", fontsize=8)
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=3)
    fig.tight_layout(rect=(0, 0.04 + 0.012 * len(labels), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the suite ------------------------------------------------------------------------------------

def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        m_values: tuple[int, ...] | None = None, backends: list[str] | None = None,
        device: torch.device | None = None, progress: bool = True) -> H.BenchOutput:
    device = device or H.default_device()
    set_threads(threads)
    backends = default_backends(device) if backends is None else backends
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    shapes = SMOKE_SHAPES if smoke else LINEAR_SHAPES
    m_values = m_values or (SMOKE_M_VALUES if smoke else M_SWEEP)
    square = SMOKE_SQUARE if smoke else SQUARE
    cases = [(s, m) for s in shapes for m in m_values] + [(square, square.n)]
    timing = {"warmup": SMOKE_WARMUP, "repeats": SMOKE_REPEATS} if smoke else {}
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)

    gen = torch.Generator(device=device).manual_seed(SEED)
    copy_bytes = SMOKE_COPY_BYTES if smoke else COPY_BYTES
    with torch.inference_mode():
        peak = int8_peak(device, SMOKE_PEAK_SHAPES if smoke else PEAK_SHAPES, timing, gen)
        ctx = Context(device, timing, peak["tops"], copy_bandwidth(device, copy_bytes, timing))
        results: list[H.Result] = []
        for shape, m in tqdm(cases, desc=f"{SUITE} ({device.type})", disable=not progress):
            results += run_case(shape, m, ctx, backends, gen)
    H.attach_speedups(results)
    float_baseline = FLOAT_BASELINE[device.type]
    targets = evaluate_targets(results, float_baseline, SMOKE_TARGET_MIN_M if smoke else TARGET_MIN_M)
    ceilings = {"int8_peak": peak, "dram_gbs": ctx.bandwidth_gbs, "copy_bytes": copy_bytes}
    timing_method = "CUDA-graph replay of the rotated calls (eager µs: launched one by one)" \
        if device.type == "cuda" else "perf_counter around batches of calls"
    meta = H.environment(device, threads, SUITE, smoke=smoke, backends=backends, ceilings=ceilings,
                         targets=targets, copies_cap=MAX_COPIES, timing=timing_method)
    paths = H.write_reports(results, meta, out_dir, device, throughput_unit=THROUGHPUT_UNIT)
    with paths["md"].open("a") as f:
        f.write(targets_markdown(targets, ceilings))
    stem = paths["md"].with_suffix("")
    title = f"{meta['device']}, torch {meta['torch']}, commit {meta['git_commit'][:12]}"
    for name, plot in (("roofline", lambda p: plot_roofline(results, peak["tops"], ctx.bandwidth_gbs, title, p)),
                       ("speedup", lambda p: plot_speedup_vs_m(results, float_baseline, p))):
        written = plot(stem.with_name(f"{stem.name}-{name}.png"))
        if written is not None:
            paths[f"{name}.png"] = written
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__)
    H.add_gemm_arguments(parser, "those dispatch can pick on the device")
    args = parser.parse_args(argv)
    output = run(args.smoke, args.out, args.threads, args.m, args.backends)
    return output.print()


if __name__ == "__main__":
    main()
