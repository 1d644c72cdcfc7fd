"""Benchmark block-sparse attention against dense SDPA, FlexAttention and Hugging Face BigBird.

Cases: seq x batch x layout (sliding window, BigBird) x target density x mode (fwd, fwd+bwd); heads 12,
head_dim 64, blocks of 64 (BERT-base attention); float16 on CUDA, float32 on CPU. A layout is built for
each target density (window / random-block count chosen to reach it) and its actual density is reported.
Rows per case, all on the same q, k, v:
  qbert block_sparse [backend]     qbert.ops.block_sparse_attention; metrics: layout_build_us (builder +
                                   CSR and transposed CSR to the device, uncached) and layout_build_pct
                                   (that over one forward, the issue's "<= 2%")
  SDPA dense                       F.scaled_dot_product_attention, all blocks (flash on CUDA)   baseline
  flex compiled                    torch.compile(flex_attention) with qbert.sparse.flex.to_block_mask
                                   (the same layout); metric mask_build_us: create_block_mask from the
                                   layout's mask_mod, what a FlexAttention user pays per new mask  baseline
  flex compiled + mask build       the row above plus its mask build                               baseline
  HF BigBird block_sparse          (BigBird layouts, CUDA) transformers' BigBirdBlockSparseAttention in
                                   training mode with dropout 0 (eval mode replaces the random blocks by
                                   block 0), same window / global / random block counts; it includes its
                                   q/k/v projections (metric qkv_proj_us) and its own random blocks, so it
                                   is timed but not validated                                      baseline

Every qbert backend, and FlexAttention, is validated against masked dense attention before timing (a
sample of query rows of the first sequence; forward output). The backward pass is validated by the op's
own tests. Cases an implementation cannot run are listed with the reason.

    python -m qbert.benchmarks.bench_block_sparse [--smoke] [--out DIR] [--threads N] [--seq 4096]
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from qbert.benchmarks import _harness as H
from tqdm import tqdm

from qbert.cli import finite_float
from qbert.ops import OPS, block_sparse_attention, use_backend
from qbert.sparse import BlockLayout, bigbird, dense, sliding_window
from qbert.sparse.flex import layout_mask_mod, to_block_mask
from qbert.timing import US_PER_S, input_copies, set_threads, time_fn

SUITE = "block_sparse"
THROUGHPUT_UNIT = "TFLOP/s"  # of the row's own math: the layout's blocks for sparse rows, all for SDPA
OP_NAME = "block_sparse_attention"
SEED = 0
HEADS, HEAD_DIM, BLOCK_SIZE = 12, 64, 64
CUDA_SEQS, CPU_SEQS, SMOKE_SEQS = (512, 1024, 2048, 4096, 8192, 16384), (512, 1024, 2048), (512,)
CUDA_BATCHES, CPU_BATCHES, SMOKE_BATCHES = (1, 8), (1,), (1,)
DENSITIES, SMOKE_DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625), (1.0, 0.75)
DENSITY = finite_float(0.0, 1.0, open_low=True)  # a --density: the fraction of blocks kept, 1 = dense
SMOKE_HEADS, SMOKE_HEAD_DIM = 2, 32
KINDS = ("sliding_window", "bigbird")
MODES = ("fwd", "fwd+bwd")
SMOKE_WARMUP, SMOKE_REPEATS = 1, 3
FLOAT_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}
MATMULS = {"fwd": 2, "fwd+bwd": 7}  # q k^T and p v; the backward adds dV, dP, dQ, dK and the recomputed S
FLOPS_PER_MAC = 2
VALIDATION_ROWS = 256  # query rows of the first sequence checked against masked dense attention
BUILD_REPEATS = 5
REFERENCE_MAX_BYTES = 2 * 2**30  # the reference backend materializes the [b, h, s, s] scores
BIGBIRD_GLOBAL = (0, -1)  # HF BigBird: the first and last blocks are global, three sliding blocks
BIGBIRD_FIXED_BLOCKS = 5  # per row: 3 sliding + 2 global, before the random ones


# ---- layouts --------------------------------------------------------------------------------------

@dataclasses.dataclass
class LayoutChoice:
    """The layout of one case and how it was built (``build(seq, BLOCK_SIZE, **params)``)."""

    layout: BlockLayout | None
    build: Callable[..., BlockLayout] | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""  # why there is no layout


def layout_for(kind: str, seq: int, density: float, heads: int) -> LayoutChoice:
    """The layout of ``kind`` nearest ``density`` (density 1: the dense layout), or why there is none."""
    n = math.ceil(seq / BLOCK_SIZE)
    if density >= 1.0:
        return LayoutChoice(dense(seq, BLOCK_SIZE), dense)
    target = density * n  # active blocks per row
    if kind == "sliding_window":
        params = {"window": max(0, round((target - 1) / 2))}
        return LayoutChoice(sliding_window(seq, BLOCK_SIZE, **params), sliding_window, params)
    # Two global rows are full; the other n - 2 rows hold the fixed blocks plus the random ones.
    global_rows = len(BIGBIRD_GLOBAL)
    random_blocks = round((target * n - global_rows * n) / (n - global_rows)) - BIGBIRD_FIXED_BLOCKS \
        if n > global_rows else -1
    if random_blocks < 0:
        return LayoutChoice(None, reason=f"BigBird has at least {BIGBIRD_FIXED_BLOCKS} of {n} blocks per row and "
                                         f"{global_rows} full rows: density {density} is out of reach")
    params = {"window": 1, "global_blocks": BIGBIRD_GLOBAL, "random_blocks": random_blocks, "seed": SEED,
              "heads": heads}
    return LayoutChoice(bigbird(seq, BLOCK_SIZE, **params), bigbird, params)


def build_cost_us(choice: LayoutChoice, seq: int, device: torch.device) -> float:
    """Median µs to build the layout uncached and put both CSR forms on ``device``."""
    samples = []
    for _ in range(BUILD_REPEATS):
        start = time.perf_counter()
        layout = choice.build(seq, BLOCK_SIZE, **choice.params)
        layout.csr(device)
        layout.csr_transposed(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * US_PER_S


# ---- inputs and reference -------------------------------------------------------------------------

@dataclasses.dataclass
class Copy:
    q: torch.Tensor  # [b, h, s, d]
    k: torch.Tensor
    v: torch.Tensor
    grad: torch.Tensor  # d out, for fwd+bwd

    def nbytes(self) -> int:
        return 4 * self.q.numel() * self.q.element_size()


def make_copy(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator,
              requires_grad: bool) -> Copy:
    q, k, v, grad = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return Copy(q, k, v, grad)


def expected_rows(c: Copy, layout: BlockLayout, rows: torch.Tensor) -> torch.Tensor:
    """Masked dense attention in float32 for query ``rows`` of the first sequence: ``[1, h, rows, d]``."""
    seq, head_dim = c.q.shape[2], c.q.shape[3]
    q, k, v = (t[:1].detach().float() for t in (c.q, c.k, c.v))
    block_of = torch.arange(seq, device=q.device) // layout.block_size
    blocks = layout.mask.to(q.device)
    allowed = blocks[:, block_of[rows]][:, :, block_of][None]  # [1, H or 1, rows, s]
    scores = (q[:, :, rows] @ k.transpose(-1, -2)) * head_dim ** -0.5
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).to(c.q.dtype)


def validation_rows(seq: int, device: torch.device) -> torch.Tensor:
    """First, last and evenly spread query rows (every block kind: global, inner, partial)."""
    return torch.linspace(0, seq - 1, min(seq, VALIDATION_ROWS), device=device).round().long().unique()


# ---- implementations ------------------------------------------------------------------------------

def forward_and_backward(attend: Callable[[Copy], torch.Tensor]) -> Callable[[Copy], torch.Tensor]:
    def run(c: Copy) -> torch.Tensor:
        out = attend(c)
        torch.autograd.grad(out, (c.q, c.k, c.v), c.grad)
        return out
    return run


def sdpa_dense(c: Copy) -> torch.Tensor:
    return F.scaled_dot_product_attention(c.q, c.k, c.v)


_compiled_flex: Callable | None = None


def compiled_flex() -> Callable:
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_mask_build_us(layout: BlockLayout, seq: int, device: torch.device) -> float:
    """Median µs of ``create_block_mask`` from the layout's token-level mask_mod (the FlexAttention path)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = layout_mask_mod(layout, device)
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        create_block_mask(mask_mod, None, layout.heads, seq, seq, device=device, BLOCK_SIZE=layout.block_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * US_PER_S


class HFBigBird:
    """transformers' BigBirdBlockSparseAttention on hidden states ``[b, s, h * d]`` made from q."""

    def __init__(self, heads: int, head_dim: int, random_blocks: int, seq: int, device, dtype) -> None:
        import transformers
        from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

        config = transformers.BigBirdConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                                            block_size=BLOCK_SIZE, num_random_blocks=random_blocks,
                                            attention_type="block_sparse", max_position_embeddings=seq,
                                            attention_probs_dropout_prob=0.0)
        self.module = BigBirdBlockSparseAttention(config, seed=SEED).to(device, dtype).train()
        self.masks = BigBirdModel.create_masks_for_block_sparse_attn(
            torch.ones(1, seq, device=device, dtype=dtype), BLOCK_SIZE)

    def hidden(self, c: Copy) -> torch.Tensor:
        return c.q.transpose(1, 2).flatten(2)

    def __call__(self, c: Copy) -> torch.Tensor:
        band, from_mask, to_mask, blocked = self.masks
        batch = c.q.shape[0]
        masks = [m.expand(batch, *m.shape[1:]) for m in (band, from_mask, to_mask, blocked, blocked)]
        return self.module(self.hidden(c), *masks)[0]

    def projections(self, c: Copy) -> torch.Tensor:
        x = self.hidden(c)
        return self.module.query(x) + self.module.key(x) + self.module.value(x)


# ---- one case -------------------------------------------------------------------------------------

def measure(case: dict[str, Any], impl: str, fn: Callable[[Copy], torch.Tensor], copies: list[Copy],
            device: torch.device, timing: dict[str, int], flops: float, *, backend: str = "",
            baseline: bool = False, check: Callable[[torch.Tensor], str] | None = None) -> H.Result:
    """Validate ``fn`` once (``check`` returns what is wrong), then time it; failures become rows."""
    result = H.Result(case=case, impl=impl, backend=backend, baseline=baseline,
                      dtype=str(copies[0].q.dtype).removeprefix("torch."))
    try:
        out = fn(copies[0])
    except H.BACKEND_FAILURES as exc:
        result.status, result.reason = H.STATUS_UNSUPPORTED, f"{type(exc).__name__}: {exc}".splitlines()[0]
        return result
    wrong = check(out) if check is not None else ""
    if wrong:
        result.status, result.reason = H.STATUS_FAILED, f"does not match the reference: {wrong}"
        return result
    result.time_us = time_fn(fn, copies, device, **timing)
    result.throughput = flops / (result.time_us / US_PER_S) / H.TERA
    return result


def run_case(seq: int, batch: int, kind: str, density: float, mode: str, device: torch.device,
             backends: list[str], heads: int, head_dim: int, timing: dict[str, int],
             gen: torch.Generator) -> list[H.Result]:
    case = {"seq": seq, "batch": batch, "layout": kind if density < 1.0 else "dense", "target_density": density,
            "mode": mode}
    choice = layout_for(kind, seq, density, heads)
    layout = choice.layout
    if layout is None:
        return [H.Result(case=case, impl="qbert block_sparse", status=H.STATUS_UNSUPPORTED, reason=choice.reason)]
    case["density"] = round(layout.density, 4)
    dtype = FLOAT_DTYPE[device.type]
    shape = (batch, heads, seq, head_dim)
    training = mode == "fwd+bwd"
    first = make_copy(shape, dtype, device, gen, training)
    n_copies = input_copies(first.nbytes()) if device.type == "cuda" else 1
    copies = [first] + [make_copy(shape, dtype, device, gen, training) for _ in range(n_copies - 1)]
    rows = validation_rows(seq, device)
    expected = expected_rows(first, layout, rows)

    def check(out: torch.Tensor) -> str:
        return H.mismatch(out[:1, :, rows].detach(), expected)

    def timed(attend: Callable[[Copy], torch.Tensor]) -> Callable[[Copy], torch.Tensor]:
        return forward_and_backward(attend) if training else attend

    macs = batch * heads * seq * seq * head_dim
    sparse_flops = FLOPS_PER_MAC * MATMULS[mode] * macs * layout.density
    dense_flops = FLOPS_PER_MAC * MATMULS[mode] * macs
    counts, indices = layout.csr(device)
    rows_out: list[H.Result] = []
    for backend in backends:
        name = f"qbert block_sparse [{backend}]"
        reasons = OPS[OP_NAME].reasons(backend, first.q, first.k, first.v, counts, indices, BLOCK_SIZE, None,
                                       head_dim ** -0.5)
        score_bytes = 4 * batch * heads * seq * seq
        if backend == "reference" and score_bytes > REFERENCE_MAX_BYTES:
            reasons.append(f"the reference materializes the scores: {score_bytes / 2**30:.1f} GiB")
        if reasons:
            rows_out.append(H.Result(case=case, impl=name, backend=backend, status=H.STATUS_UNSUPPORTED,
                                     reason="; ".join(reasons)))
            continue
        with use_backend(backend):
            result = measure(case, name, timed(lambda c: block_sparse_attention(c.q, c.k, c.v, layout)), copies,
                             device, timing, sparse_flops, backend=backend, check=check)
        if result.time_us:
            build_us = build_cost_us(choice, seq, device)
            result.metrics = {"layout_build_us": build_us, "layout_build_pct": 100 * build_us / result.time_us}
        rows_out.append(result)

    rows_out.append(measure(case, "SDPA dense" + (" (flash)" if device.type == "cuda" else ""),
                            timed(sdpa_dense), copies, device, timing, dense_flops, baseline=True,
                            check=check if density >= 1.0 else None))
    rows_out += flex_rows(case, layout, copies, device, timing, sparse_flops, timed, check)
    if choice.build is bigbird and device.type == "cuda":
        rows_out.append(hf_bigbird_row(case, choice.params["random_blocks"], copies, device, timing, sparse_flops,
                                       timed))
    return rows_out


def flex_rows(case, layout, copies, device, timing, flops, timed, check) -> list[H.Result]:
    seq = copies[0].q.shape[2]
    block_mask = to_block_mask(layout, seq, device=device)
    flex = compiled_flex()
    result = measure(case, "flex compiled", timed(lambda c: flex(c.q, c.k, c.v, block_mask=block_mask)),
                     copies, device, timing, flops, baseline=True, check=check)
    if not result.time_us:
        return [result]
    build_us = flex_mask_build_us(layout, seq, device)
    result.metrics = {"mask_build_us": build_us}
    with_build = dataclasses.replace(result, impl="flex compiled + mask build", time_us=result.time_us + build_us,
                                     throughput=flops / ((result.time_us + build_us) / US_PER_S) / H.TERA,
                                     metrics={})
    return [result, with_build]


def hf_bigbird_row(case, random_blocks, copies, device, timing, flops, timed) -> H.Result:
    name = "HF BigBird block_sparse"
    q = copies[0].q
    try:  # transformers refuses some shapes with ValueError (sequence too short for its random blocks)
        hf = HFBigBird(q.shape[1], q.shape[3], random_blocks, q.shape[2], device, q.dtype)
        hf(copies[0])
    except (ValueError, *H.BACKEND_FAILURES) as exc:
        return H.Result(case=case, impl=name, baseline=True, status=H.STATUS_UNSUPPORTED,
                        reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
    result = measure(case, name, timed(hf), copies, device, timing, flops, baseline=True)
    if result.time_us:
        with torch.no_grad():
            result.metrics = {"qkv_proj_us": time_fn(hf.projections, copies, device, **timing)}
    return result


# ---- the suite ------------------------------------------------------------------------------------

def run(smoke: bool = False, out_dir: Path | None = None, threads: int = H.DEFAULT_THREADS,
        seqs: tuple[int, ...] | None = None, batches: tuple[int, ...] | None = None,
        densities: tuple[float, ...] | None = None, backends: list[str] | None = None,
        device: torch.device | None = None, progress: bool = True) -> H.BenchOutput:
    device = device or H.default_device()
    set_threads(threads)
    cuda = device.type == "cuda"
    seqs = seqs or (SMOKE_SEQS if smoke else CUDA_SEQS if cuda else CPU_SEQS)
    batches = batches or (SMOKE_BATCHES if smoke else CUDA_BATCHES if cuda else CPU_BATCHES)
    densities = densities or (SMOKE_DENSITIES if smoke else DENSITIES)
    outside = [d for d in densities if not 0.0 < d <= 1.0]  # NaN included
    if outside:
        raise ValueError(f"{SUITE}: densities must be in (0, 1], got {outside}")
    heads, head_dim = (SMOKE_HEADS, SMOKE_HEAD_DIM) if smoke else (HEADS, HEAD_DIM)
    registered = list(OPS[OP_NAME].rows)
    backends = registered if backends is None else backends
    unknown = [b for b in backends if b not in registered]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; {OP_NAME} has: {', '.join(registered)}")
    timing = {"warmup": SMOKE_WARMUP, "repeats": SMOKE_REPEATS} if smoke else {}
    out_dir = Path(out_dir) if out_dir is not None else (H.SMOKE_RESULTS_DIR if smoke else H.DEFAULT_RESULTS_DIR)

    gen = torch.Generator().manual_seed(SEED)
    # Density 1 is the same dense layout for every kind: run it once.
    cases = [(s, b, k, d, m) for s in seqs for b in batches for d in densities
             for k in (KINDS if d < 1.0 else KINDS[:1]) for m in MODES]
    results: list[H.Result] = []
    for seq, batch, kind, density, mode in tqdm(cases, desc=f"{SUITE} ({device.type})", disable=not progress):
        with torch.inference_mode(mode == "fwd"):
            results += run_case(seq, batch, kind, density, mode, device, backends, heads, head_dim, timing, gen)
    H.attach_speedups(results)
    meta = H.environment(device, threads, SUITE, smoke=smoke, backends=backends, heads=heads, head_dim=head_dim,
                         block_size=BLOCK_SIZE)
    paths = H.write_reports(results, meta, out_dir, device, throughput_unit=THROUGHPUT_UNIT)
    plot = plot_speedups(results, paths["md"].with_suffix(".png"))
    if plot is not None:
        paths["png"] = plot
    return H.BenchOutput(results, meta, paths, paths["md"].read_text())


def plot_speedups(results: list[H.Result], path: Path) -> Path | None:
    """Speedup of the qbert rows over SDPA (solid) and compiled flex (dashed) vs layout density, one panel
    per (mode, batch), one line per (seq, layout); None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'qbert[bench]'): no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in results if not r.baseline and r.speedup]
    panels = list(dict.fromkeys((r.case["mode"], r.case["batch"]) for r in mine))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (mode, batch) in zip(axes[0], panels):
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in mine:
            if (r.case["mode"], r.case["batch"]) != (mode, batch):
                continue
            for base, style in (("SDPA", "-"), ("flex compiled", "--")):
                speedup = next((s for b, s in r.speedup.items() if b.startswith(base) and "mask" not in b), None)
                if speedup is not None:
                    layout = "sliding_window" if r.case["layout"] == "dense" else r.case["layout"]
                    lines.setdefault((f"seq {r.case['seq']} {layout} vs {base} [{r.backend}]", style), []).append(
                        (r.case["density"], speedup))
        for (label, style), points in lines.items():
            ax.plot(*zip(*sorted(points)), style, marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("layout density")
        ax.set_title(f"{mode}, batch {batch}", fontsize=9)
    axes[0][0].set_ylabel("speedup (baseline time / qbert time)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=6, ncol=3)
    fig.tight_layout(rect=(0, 0.08 + 0.015 * len(labels), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> H.BenchOutput:
    parser = H.suite_parser(__file__, __doc__)
    parser.add_argument("--seq", type=H.int_list, default=None, help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=H.int_list, default=None, help="comma-separated batch sizes")
    parser.add_argument("--density", type=H.list_of(DENSITY), default=None,
                        help="comma-separated target densities, each in (0, 1]")
    parser.add_argument("--backends", type=H.op_backend_list(OP_NAME), default=None,
                        help="qbert backends to time (default: every backend the op registers)")
    args = parser.parse_args(argv)
    output = run(args.smoke, args.out, args.threads, args.seq, args.batch, args.density, args.backends)
    return output.print()


if __name__ == "__main__":
    main()
