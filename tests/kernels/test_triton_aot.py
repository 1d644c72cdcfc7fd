"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, without a GPU.

What the PTX must show, per kernel family:
  * int8 GEMM (int8_gemm / int8_linear): int8 tensor cores for every config: mma.sync m16n8k32 s8.s8.s32 on
    sm_80; on sm_90 wgmma ...k32.s32.s8.s8 for every config wgmma can take (BLOCK_M % 64 == 0, warps in
    whole warpgroups), mma.sync for the rest (the BLOCK_M = 32 few-token config).
  * w8a16_linear: f16 / bf16 mma (wgmma on sm_90 by the same rule); the f32 activations run the IEEE FMA
    path (there is no IEEE-f32 tensor-core instruction), so only their shared memory is checked.
  * quantize_per_token: correctly rounded division (div.rn.f32, never div.approx / div.full) and the
    round-half-even add/subtract pair.
  * every config of every list fits the device's shared memory per block.

The compiles run in a subprocess without TRITON_INTERPRET: Triton picks interpreting or compiling when a
kernel is decorated, and tests/conftest.py sets the interpreter on machines without a GPU. The
subprocess also keeps Triton out of this process (``import qbert`` must not import it; a test checks).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

# A cold compile of every config is ~1-2 minutes on the CPU machines (Triton's cache makes reruns take
# seconds).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
_RESULT_MARKER = "AOT-RESULTS:"

# Int arguments the JIT would mark divisible by 16 for real BERT shapes (N, K in {768, 1024, 3072, ...}),
# so the AOT compile sees the same vectorized loads as a GPU run. M is left free.
_GEMM_ALIGNED_INTS = ("N", "K", "stride_am", "stride_bn", "stride_cm")
_QUANTIZE_ALIGNED_INTS = ("K", "stride_xm", "stride_qm")

# An int8 operand is K-contiguous in both a [M, K] and b [N, K]; wgmma takes 64 rows per warpgroup.
_WGMMA_ROWS = 64
_WARPGROUP_WARPS = 4


# ---- the subprocess side --------------------------------------------------------------------------

def _gemm_cases() -> list[dict]:
    from qbert.kernels._common import INT8_GEMM_CONFIGS, W8A16_CONFIGS

    # (family, a pointer type, c pointer type, accumulator, dot precision, configs, switches)
    variants = [
        ("int8_gemm", "*i8", "*i32", "int32", "tf32", INT8_GEMM_CONFIGS,
         {"A_SCALE": False, "B_SCALE": False, "HAS_BIAS": False, "GELU": False, "EVEN_K": True}),
        # With the GELU epilogue: the largest int8_linear variant (erf through libdevice).
        ("int8_linear", "*i8", "*bf16", "int32", "tf32", INT8_GEMM_CONFIGS,
         {"A_SCALE": True, "B_SCALE": True, "HAS_BIAS": True, "GELU": True, "EVEN_K": False}),
    ]
    variants += [(f"w8a16_{dtype}", f"*{dtype}", f"*{dtype}", "float32", "ieee" if dtype == "fp32" else "tf32",
                  W8A16_CONFIGS, {"A_SCALE": False, "B_SCALE": True, "HAS_BIAS": True, "GELU": False, "EVEN_K": False})
                 for dtype in ("fp16", "bf16", "fp32")]
    cases = []
    for family, a_ty, c_ty, acc, precision, configs, switches in variants:
        for index, config in enumerate(configs):
            for arch in ARCHS:
                cases.append({
                    "family": family, "arch": arch, "index": index, "config": dict(config.kwargs),
                    "num_warps": config.num_warps, "num_stages": config.num_stages,
                    "pointers": {"a_ptr": a_ty, "b_ptr": "*i8", "c_ptr": c_ty, "a_scale_ptr": "*fp32",
                                  "b_scale_ptr": "*fp32", "bias_ptr": "*fp32"},
                    "constexprs": dict(ACC_DTYPE=acc, DOT_PRECISION=precision, **switches, **config.kwargs)})
    return cases


def _quantize_cases() -> list[dict]:
    block_k = 1024  # BERT-base hidden size 768 rounds up to this
    return [{"family": f"quantize_{dtype}", "arch": arch, "index": 0, "config": {"BLOCK_K": block_k}, "num_warps": 2,
                 "num_stages": 1, "pointers": {"x_ptr": f"*{dtype}", "q_ptr": "*i8", "scale_ptr": "*fp32"},
                 "constexprs": {"BLOCK_K": block_k}}
            for dtype in ("fp32", "fp16", "bf16") for arch in ARCHS]


def aot_compile(fn, signature: dict, constexprs: dict, aligned, case: dict):
    """Compile Triton kernel ``fn`` ahead of time for ``case``'s arch, warps and stages, with the arguments
    named in ``aligned`` declared 16-divisible. Returns ``(kernel, summary)``, the summary being ``case``
    plus the shared memory, PTX opcodes and float immediates (used by every AOT test module)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", case["arch"], 32),
                                options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
    except Exception as error:
        # Name the case: the parent shows this subprocess's stderr when the compile fails.
        raise RuntimeError(f"AOT compile failed for {case}") from error
    ptx = kernel.asm["ptx"]
    # The instructions (first token of each statement) and the float immediates are all the checks need.
    opcodes = sorted(set(re.findall(r"^\s*(?:@%p\d+\s+)?([a-z][\w.]*)", ptx, flags=re.MULTILINE)))
    immediates = sorted(set(re.findall(r"\b0f[0-9A-F]{8}\b", ptx)))
    return kernel, dict(case, shared=kernel.metadata.shared, opcodes=opcodes, immediates=immediates)


def _compile(case: dict) -> dict:
    import triton.language as tl

    if case["family"].startswith("quantize"):
        from qbert.kernels.quantize_per_token import _quantize_per_token_kernel as fn
        aligned = _QUANTIZE_ALIGNED_INTS
    else:
        from qbert.kernels.int8_gemm import _int8_gemm_kernel as fn
        aligned = _GEMM_ALIGNED_INTS
    constexprs = dict(case["constexprs"])
    if "ACC_DTYPE" in constexprs:
        constexprs["ACC_DTYPE"] = getattr(tl, constexprs["ACC_DTYPE"])
    signature = {}
    for name in fn.arg_names:
        signature[name] = "constexpr" if name in constexprs else case["pointers"].get(name, "i32")
    return aot_compile(fn, signature, constexprs, (*case["pointers"], *aligned), case)[1]


def compile_cases(compile_one, cases: list[dict]) -> list[dict]:
    """``compile_one(case)`` for every case, in parallel worker processes (used by every AOT test module)."""
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(compile_one, cases))


def _compile_all() -> list[dict]:
    return compile_cases(_compile, _gemm_cases() + _quantize_cases())


# ---- the test side ---------------------------------------------------------------------------------

def _environment_skip_reason() -> str | None:
    # Looked up without importing triton, which stays out of this process.
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return "triton is not installed"
    nvidia = Path(spec.origin).parent / "backends" / "nvidia"
    if not nvidia.is_dir():
        return f"this triton has no NVIDIA backend ({nvidia} is missing), so there is no PTX to check"
    return None


def compile_in_subprocess(module: str) -> list[dict]:
    """The results of ``<module>._compile_all()`` run in a fresh interpreter without TRITON_INTERPRET (Triton
    picks interpreting or compiling when a kernel is decorated); skips when nothing can be compiled here."""
    reason = _environment_skip_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = (f"import json; from {module} import _compile_all; "
            f"print({_RESULT_MARKER!r} + json.dumps(_compile_all()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_MARKER)]
    assert proc.returncode == 0 and lines, f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len(_RESULT_MARKER):])


def by_family(results: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for result in results:
        grouped.setdefault(result["family"], []).append(result)
    return grouped


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[dict]]:
    """Every case compiled once, grouped by family: {family: [result per (config, arch)]}."""
    return by_family(compile_in_subprocess("tests.kernels.test_triton_aot"))


def _describe(result: dict) -> str:
    return f"{result['family']} sm_{result['arch']} config {result['config']} " \
           f"stages={result['num_stages']} warps={result['num_warps']}"


def _ok(results: list[dict], arch: int) -> list[dict]:
    chosen = [r for r in results if r["arch"] == arch]
    assert chosen, f"no cases compiled for sm_{arch}"
    return chosen


def _takes_wgmma(result: dict) -> bool:
    return result["config"]["BLOCK_M"] % _WGMMA_ROWS == 0 and result["num_warps"] % _WARPGROUP_WARPS == 0


def _has(result: dict, pattern: str) -> bool:
    return any(re.fullmatch(pattern, op) for op in result["opcodes"])


# satfinite is what Triton emits for int8 mma; the s32 accumulate never saturates at K <= INT8_GEMM_MAX_K.
_MMA_S8 = r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32"
_WGMMA_S8 = r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8"


def _mma_float(dtype: str) -> str:
    return rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{dtype}\.{dtype}\.f32"


def _wgmma_float(dtype: str) -> str:
    return rf"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.{dtype}\.{dtype}"


@pytest.mark.parametrize("family", ["int8_gemm", "int8_linear"])
def test_int8_gemm_sm80_uses_int8_mma(compiled, family):
    missing = [_describe(r) for r in _ok(compiled[family], 80) if not _has(r, _MMA_S8)]
    assert not missing, "no mma.sync m16n8k32 s8 in:\n" + "\n".join(missing)


@pytest.mark.parametrize("family", ["int8_gemm", "int8_linear"])
def test_int8_gemm_sm90_uses_int8_wgmma(compiled, family):
    results = _ok(compiled[family], 90)
    wrong = [_describe(r) for r in results
             if not _has(r, _WGMMA_S8 if _takes_wgmma(r) else _MMA_S8)]
    assert not wrong, "expected wgmma s8 (BLOCK_M % 64 == 0) or else mma.sync s8, not found in:\n" + \
        "\n".join(wrong)
    assert any(_takes_wgmma(r) for r in results), "no int8 config can use wgmma on sm_90"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_w8a16_uses_float_mma(compiled, arch, dtype):
    results = _ok(compiled[f"w8a16_{'fp16' if dtype == 'f16' else dtype}"], arch)
    wrong = [_describe(r) for r in results
             if not _has(r, _wgmma_float(dtype) if arch == 90 and _takes_wgmma(r) else _mma_float(dtype))]
    assert not wrong, f"expected {dtype} tensor-core mma, not found in:\n" + "\n".join(wrong)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_shared_memory_fits_every_config(compiled, arch):
    results = [r for family in compiled.values() for r in _ok(family, arch)]
    over = [f"{_describe(r)}: {r['shared']} B" for r in results if r["shared"] > MAX_SHARED_BYTES[arch]]
    assert not over, f"over sm_{arch}'s {MAX_SHARED_BYTES[arch]} B of shared memory:\n" + "\n".join(over)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_quantize_divides_ieee_and_rounds_half_even(compiled, arch, dtype):
    import struct

    (result,) = _ok(compiled[f"quantize_{dtype}"], arch)
    assert _has(result, r"div\.rn\.f32"), "x / scale must be a correctly rounded division"
    approx = [op for op in result["opcodes"] if re.fullmatch(r"div\.(approx|full)\.[\w.]*", op)]
    assert not approx, f"approximate division in the quantizer: {approx}"
    # round_half_even adds and subtracts 1.5 * 2**23; both must survive compilation.
    magic = 1.5 * 2**23
    for value in (magic, -magic):
        immediate = "0f" + struct.pack(">f", value).hex().upper()
        assert immediate in result["immediates"], f"round_half_even's {value:+g} ({immediate}) was folded away"


def spill_bytes(ptx: str, arch: int) -> int:
    """Bytes of register spill stores in ptxas' -v report (sm_90a: wgmma needs the arch-specific target)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                                 str(source), "-o", str(Path(tmp) / "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))
