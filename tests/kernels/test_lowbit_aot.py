"""Ahead-of-time compilation of the low-bit GEMM kernel (kernels/lowbit_linear.py) for sm_80 and sm_90.

What the PTX must show:
  * lowbit_linear (A16): f16 / bf16 tensor-core mma for every config: wgmma ...k16.f32.<dtype> on sm_90
    where the config can take it (BLOCK_M % 64 == 0, whole warpgroups), mma.sync m16n8k16 otherwise (the
    few-token BLOCK_M = 16 / 32 configs, and all of sm_80); f32 activations run the IEEE FMA path, so only
    their shared memory is checked (with 8-bit codes, the largest packed tile).
  * w4a8_linear (A8): int8 tensor cores for every config: mma.sync m16n8k32 s8.s8.s32, or wgmma k32 s8.
  * every bit width (2, 3, 4, 8 for A16; 2, 3, 4 for A8) compiles to the same tensor-core instructions, and
    so do the variants: one K group per row, K groups of 32 (BLOCK_K shrunk to 32), split-K partials.
  * every case fits the device's shared memory per block, and ptxas (the one Triton ships, run with -v on
    the PTX) spills no registers in the f16 / bf16 / int8 cases: the unpacked codes live in registers
    beside the accumulator, so the largest tiles are the ones that spill. The f32 FMA path is left out: its
    dot keeps both operand tiles in registers and spills at every tile size (f32 activations are a
    correctness path on the GPU, not a fast one).

The compiles run in a subprocess without TRITON_INTERPRET (see tests/kernels/test_triton_aot.py, whose
helpers and limits this file shares).
"""

from __future__ import annotations

import pytest

from tests.kernels.test_triton_aot import (
    _MMA_S8,
    _WGMMA_S8,
    ARCHS,
    MAX_SHARED_BYTES,
    _describe,
    _has,
    _mma_float,
    _takes_wgmma,
    _wgmma_float,
    aot_compile,
    by_family,
    compile_cases,
    compile_in_subprocess,
    spill_bytes,
)

# ~100 compiles: about a minute cold on the CPU machines, seconds from Triton's cache.
pytestmark = pytest.mark.slow

# Int arguments the JIT marks divisible by 16 for BERT shapes (N, K, group sizes 64 / 128 / K); M is free.
_ALIGNED_INTS = ("N", "K", "group_size", "stride_xm", "stride_cs", "stride_cm")
# A K long enough that group_size 32 is a real grouping (the launcher then shrinks BLOCK_K to 32).
_LONG_K = 4096
_SMALL_GROUP = 32


# ---- the subprocess side --------------------------------------------------------------------------

def _case(family: str, arch: int, config, bits: int, x_dtype: str, act_int8: bool, one_group: bool = False,
          split_k: int = 1) -> dict:
    out = "*fp32" if split_k > 1 else f"*{x_dtype}"
    return {"family": family, "arch": arch, "config": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages,
            "pointers": {"x_ptr": "*i8" if act_int8 else f"*{x_dtype}", "w_ptr": "*i32", "scales_ptr": "*fp32",
                         "zeros_ptr": "*u8", "x_scale_ptr": "*fp32", "bias_ptr": f"*{x_dtype}", "c_ptr": out},
            "constexprs": dict(BITS=bits, ACT_INT8=act_int8, ONE_GROUP=one_group, HAS_ZEROS=not one_group,
                               HAS_BIAS=split_k == 1, DOT_PRECISION="ieee" if x_dtype == "fp32" else "tf32",
                               SPLIT_K=split_k, EVEN_K=False, **config.kwargs)}


def _cases() -> list[dict]:
    from qbert.kernels._common import LOWBIT_A8_CONFIGS, LOWBIT_A16_CONFIGS
    from qbert.kernels.lowbit_linear import fit_block_k

    # The main matrix runs the heavier K-group path (a scale and zero row per tile); the variants take one
    # few-token and one many-token config each.
    few_a16, many_a16 = LOWBIT_A16_CONFIGS[0], LOWBIT_A16_CONFIGS[-2]
    few_a8, many_a8 = LOWBIT_A8_CONFIGS[-1], LOWBIT_A8_CONFIGS[0]
    small_group = {"K": _LONG_K, "group_size": _SMALL_GROUP}
    cases = []
    for arch in ARCHS:
        for config in LOWBIT_A16_CONFIGS:
            cases += [_case(f"a16_{dtype}", arch, config, 4, dtype, False) for dtype in ("fp16", "bf16")]
            cases.append(_case("a16_fp32_w8", arch, config, 8, "fp32", False))
        for config in LOWBIT_A8_CONFIGS:
            cases.append(_case("a8_w4", arch, config, 4, "fp16", True))
        for config in (few_a16, many_a16):
            cases += [_case(f"a16_fp16_w{bits}", arch, config, bits, "fp16", False) for bits in (2, 3, 8)]
            cases.append(_case("a16_fp16_variants", arch, config, 3, "fp16", False, one_group=True))
        for config in (few_a8, many_a8):
            cases += [_case(f"a8_w{bits}", arch, config, bits, "bf16", True) for bits in (2, 3)]
            cases.append(_case("a8_variants", arch, config, 3, "fp32", True, one_group=True))
        for config in fit_block_k([few_a16, many_a16], small_group):
            cases.append(_case("a16_fp16_variants", arch, config, 4, "fp16", False))
        for config in fit_block_k([few_a8, many_a8], small_group):
            cases.append(_case("a8_variants", arch, config, 4, "fp16", True))
        cases.append(_case("a16_fp16_variants", arch, few_a16, 4, "fp16", False, split_k=4))
        cases.append(_case("a8_variants", arch, few_a8, 4, "fp16", True, split_k=4))
    return cases


def _compile(case: dict) -> dict:
    from qbert.kernels.lowbit_linear import _lowbit_linear_kernel as fn

    constexprs = case["constexprs"]
    signature = {name: "constexpr" if name in constexprs else case["pointers"].get(name, "i32")
                 for name in fn.arg_names}
    kernel, summary = aot_compile(fn, signature, constexprs, (*case["pointers"], *_ALIGNED_INTS), case)
    return dict(summary, spilled=spill_bytes(kernel.asm["ptx"], case["arch"]))


def _compile_all() -> list[dict]:
    return compile_cases(_compile, _cases())


# ---- the test side ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled() -> dict[str, list[dict]]:
    """Every case compiled once, grouped by family: {family: [result per (config, arch)]}."""
    return by_family(compile_in_subprocess("tests.kernels.test_lowbit_aot"))


def _at(results: list[dict], arch: int) -> list[dict]:
    chosen = [r for r in results if r["arch"] == arch]
    assert chosen, f"no cases compiled for sm_{arch}"
    return chosen


def _float_mma(arch: int, result: dict, dtype: str) -> str:
    return _wgmma_float(dtype) if arch == 90 and _takes_wgmma(result) else _mma_float(dtype)


def _int8_mma(arch: int, result: dict) -> str:
    return _WGMMA_S8 if arch == 90 and _takes_wgmma(result) else _MMA_S8


_A16_FAMILIES = {"a16_fp16": "f16", "a16_bf16": "bf16", "a16_fp16_w2": "f16", "a16_fp16_w3": "f16",
                 "a16_fp16_w8": "f16", "a16_fp16_variants": "f16"}
_A8_FAMILIES = ("a8_w4", "a8_w2", "a8_w3", "a8_variants")


@pytest.mark.parametrize("family", _A16_FAMILIES)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_a16_uses_float_tensor_cores(compiled, arch, family):
    dtype = _A16_FAMILIES[family]
    results = _at(compiled[family], arch)
    wrong = [_describe(r) for r in results if not _has(r, _float_mma(arch, r, dtype))]
    assert not wrong, f"expected {dtype} tensor-core mma (wgmma where BLOCK_M % 64 == 0 on sm_90) in:\n" + \
        "\n".join(wrong)


@pytest.mark.parametrize("family", _A8_FAMILIES)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_a8_uses_int8_tensor_cores(compiled, arch, family):
    results = _at(compiled[family], arch)
    wrong = [_describe(r) for r in results if not _has(r, _int8_mma(arch, r))]
    assert not wrong, "expected s8.s8.s32 mma.sync (wgmma where BLOCK_M % 64 == 0 on sm_90) in:\n" + \
        "\n".join(wrong)


def test_some_configs_take_wgmma(compiled):
    # The many-token configs exist for wgmma; a list without one would leave Hopper on mma.sync.
    for family in ("a16_fp16", "a8_w4"):
        assert any(_takes_wgmma(r) for r in _at(compiled[family], 90)), f"{family}: no wgmma-capable config"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_shared_memory_fits_every_case(compiled, arch):
    results = [r for family in compiled.values() for r in _at(family, arch)]
    over = [f"{_describe(r)}: {r['shared']} B" for r in results if r["shared"] > MAX_SHARED_BYTES[arch]]
    assert not over, f"over sm_{arch}'s {MAX_SHARED_BYTES[arch]} B of shared memory:\n" + "\n".join(over)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_no_register_spills(compiled, arch):
    results = [r for family, rs in compiled.items() if family != "a16_fp32_w8" for r in _at(rs, arch)]
    spilled = [f"{_describe(r)}: {r['spilled']} B" for r in results if r["spilled"]]
    assert not spilled, f"ptxas spills registers on sm_{arch}:\n" + "\n".join(spilled)
