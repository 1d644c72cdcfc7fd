"""Ahead-of-time compilation of the add + LayerNorm + quantize kernel (kernels/add_layernorm_quantize.py) for
sm_80 and sm_90, without a GPU.

What the PTX must show, for f32 / f16 / bf16 rows, with and without residual and bias, at the BERT width
(BLOCK_K 1024) and at the longest row a program takes (MAX_K):
  * every division and the square root are IEEE (div.rn.f32, sqrt.rn.f32; never div.approx / div.full,
    sqrt.approx or rsqrt): the codes must be bit-exact for the y written;
  * round_half_even's add / subtract of 1.5 * 2**23 survived compilation;
  * x is read in 16-byte vectors at the BERT width (the row is K-aligned);
  * ptxas (the one Triton ships) spills no registers: the whole row lives in registers.
The compiles run in a subprocess without TRITON_INTERPRET (see tests/kernels/test_triton_aot.py, whose
helpers this file shares).
"""

from __future__ import annotations

import re
import struct

import pytest

from tests.kernels.test_triton_aot import (
    ARCHS,
    MAX_SHARED_BYTES,
    _describe,
    _has,
    aot_compile,
    by_family,
    compile_cases,
    compile_in_subprocess,
    spill_bytes,
)

# 24 compiles: about half a minute cold on the CPU machines, seconds from Triton's cache.
pytestmark = pytest.mark.slow

BERT_K = 768
# Pointers and K as the JIT sees them for BERT rows: 16-byte aligned, K divisible by 16.
_ALIGNED = ("x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "y_ptr", "q_ptr", "scale_ptr", "K")


# ---- the subprocess side --------------------------------------------------------------------------

def _cases() -> list[dict]:
    from qbert.kernels.add_layernorm_quantize import MAX_K, launch_config

    cases = []
    for arch in ARCHS:
        for k in (BERT_K, MAX_K):
            block_k, num_warps = launch_config(k)
            for dtype in ("fp32", "fp16", "bf16"):
                for affine in (True, False):
                    cases.append({"family": f"{dtype}-K{k}", "arch": arch, "config": {"BLOCK_K": block_k},
                                  "num_warps": num_warps, "num_stages": 1, "dtype": dtype,
                                  "constexprs": {"HAS_RESIDUAL": affine, "HAS_BIAS": affine, "BLOCK_K": block_k}})
    return cases


def _compile(case: dict) -> dict:
    from qbert.kernels.add_layernorm_quantize import _add_layernorm_quantize_kernel as fn

    dtype = case["dtype"]
    pointers = {"x_ptr": f"*{dtype}", "residual_ptr": f"*{dtype}", "weight_ptr": "*fp32", "bias_ptr": "*fp32",
                "y_ptr": f"*{dtype}", "q_ptr": "*i8", "scale_ptr": "*fp32"}
    scalars = {"K": "i32", "eps": "fp32"}
    signature = {name: "constexpr" if name in case["constexprs"] else {**pointers, **scalars}[name]
                 for name in fn.arg_names}
    kernel, summary = aot_compile(fn, signature, case["constexprs"], _ALIGNED, case)
    return dict(summary, spilled=spill_bytes(kernel.asm["ptx"], case["arch"]))


def _compile_all() -> list[dict]:
    return compile_cases(_compile, _cases())


# ---- the test side ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results() -> list[dict]:
    return compile_in_subprocess("tests.kernels.test_add_layernorm_quantize_aot")


def _label(result: dict) -> str:
    return f"{_describe(result)} {result['constexprs']}"


def test_every_case_compiled(results):
    families = by_family(results)
    assert {r["arch"] for r in results} == set(ARCHS)
    assert all(len(rs) == 2 * len(ARCHS) for rs in families.values()), {f: len(rs) for f, rs in families.items()}


def test_divisions_and_sqrt_are_ieee(results):
    for r in results:
        assert _has(r, r"div\.rn\.f32") and _has(r, r"sqrt\.rn\.f32"), _label(r)
        approx = [op for op in r["opcodes"] if re.fullmatch(r"(div\.(approx|full)|sqrt\.approx|rsqrt)[\w.]*", op)]
        assert not approx, f"{_label(r)}: approximate math {approx}"


def test_round_half_even_survives(results):
    magic = 1.5 * 2**23
    for r in results:
        for value in (magic, -magic):
            immediate = "0f" + struct.pack(">f", value).hex().upper()
            assert immediate in r["immediates"], f"{_label(r)}: round_half_even's {value:+g} was folded away"


def test_bert_rows_load_16_byte_vectors(results):
    for r in results:
        if r["family"].endswith(f"K{BERT_K}"):
            assert _has(r, r"ld\.global(\.\w+)*\.v4\.b32"), f"{_label(r)}: no 16-byte loads"


def test_no_register_spills_and_shared_memory_fits(results):
    spilled = [f"{_label(r)}: {r['spilled']} B" for r in results if r["spilled"]]
    assert not spilled, "ptxas spills registers:\n" + "\n".join(spilled)
    over = [_label(r) for r in results if r["shared"] > MAX_SHARED_BYTES[r["arch"]]]
    assert not over, f"over the shared memory per block: {over}"
