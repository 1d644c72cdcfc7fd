"""Ahead-of-time compilation of the block-sparse attention kernels for sm_80 and sm_90, without a GPU.

Every tile config of kernels/block_sparse_attention.py (forward, dK/dV, dQ; one per layout block size) is
compiled for both archs and must show:
  * f16 / bf16 tensor cores: mma.sync m16n8k16 on sm_80; on sm_90 wgmma where the program's tile takes
    it (64 rows per warpgroup, warps in whole warpgroups), mma.sync for the smaller tiles (layout blocks
    of 16 and 32); float32 runs the IEEE FMA path (no IEEE-f32 tensor-core instruction), so only its
    shared memory is checked;
  * the base-2 softmax: exp2 lowers to the MUFU ex2.approx instruction;
  * no register spills for f16 / bf16 (cuobjdump's resource usage of the cubin Triton built: a stack
    frame is where ptxas spills; float32's FMA path is not held to it);
  * shared memory per block within the device's limit, for every head_dim and dtype.
The delta preprocess is compiled too. As in tests/kernels/test_triton_aot.py (whose helpers this reuses),
the compiles run in a subprocess without TRITON_INTERPRET, which also keeps Triton out of this process.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.kernels.test_triton_aot import (
    _WARPGROUP_WARPS,
    _WGMMA_ROWS,
    ARCHS,
    MAX_SHARED_BYTES,
    _has,
    _mma_float,
    _wgmma_float,
    aot_compile,
    compile_cases,
    compile_in_subprocess,
)

# ~120 compiles: a few minutes cold on the 2-core CPU machines, seconds from Triton's cache.
pytestmark = pytest.mark.slow

HEAD_DIMS = (32, 64, 128)
_TRITON_DTYPE = {"fp16": "f16", "bf16": "bf16", "fp32": "f32"}

# (dtype, head_dim, key padding and ragged length?) per config: f16 at every head_dim (tensor cores and
# shared memory), bf16 once (tensor cores), f32 at the largest head_dim (4-byte tiles: the most shared
# memory). The f16 cases compile the hot path (one layout for every head, no padding, seq a multiple of
# the block), the others the general one (a layout per head, key padding, a ragged last block).
_VARIANTS = [("fp16", d, False) for d in HEAD_DIMS] + [("bf16", 64, True), ("fp32", 128, True)]

_KERNELS = {
    "fwd": "_block_sparse_attention_fwd_kernel",
    "bwd_dkdv": "_block_sparse_attention_bwd_dkdv_kernel",
    "bwd_dq": "_block_sparse_attention_bwd_dq_kernel",
    "preprocess": "_block_sparse_attention_bwd_preprocess_kernel",
}
# Int arguments a GPU run marks divisible by 16 (strides of contiguous [B, H, S, D] with D in HEAD_DIMS).
_ALIGNED_INTS = ("stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks",
                 "stride_vb", "stride_vh", "stride_vs")


# ---- the subprocess side --------------------------------------------------------------------------

def _pointers(kernel: str, dtype: str) -> dict[str, str]:
    data = f"*{dtype}"
    if kernel == "preprocess":
        return {"out_ptr": data, "dout_ptr": data, "dlse_ptr": "*fp32", "delta_ptr": "*fp32"}
    pointers = {"q_ptr": data, "k_ptr": data, "v_ptr": data, "lse_ptr": "*fp32", "counts_ptr": "*i32",
                "indices_ptr": "*i32", "kpm_ptr": "*u8"}
    if kernel == "fwd":
        return {**pointers, "out_ptr": data}
    pointers.update(dout_ptr=data, delta_ptr="*fp32")
    if kernel == "bwd_dq":
        return {**pointers, "dq_ptr": data}
    return {**pointers, "dk_ptr": data, "dv_ptr": data}


def _cases() -> list[dict]:
    import torch
    from qbert.kernels.block_sparse_attention import CONFIGS, PREPROCESS_ROWS, PREPROCESS_WARPS

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

    cases = []
    for index, config in enumerate(CONFIGS):
        for dtype, head_dim, masked in _VARIANTS:
            constexprs = {"HEAD_DIM": head_dim, "LAYOUT_BLOCK": config.layout_block, "BLOCK_M": config.block_m,
                          "BLOCK_N": config.block_n, "LAYOUT_PER_HEAD": masked, "HAS_KPM": masked,
                          "EVEN_S": not masked, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            # The rows a program owns, which set whether wgmma can take its dots.
            rows = config.block_n if config.kernel == "bwd_dkdv" else config.block_m
            for arch in ARCHS:
                cases.append({"family": config.kernel, "dtype": dtype, "head_dim": head_dim, "arch": arch,
                              "index": index, "rows": rows, "config": constexprs,
                              "num_warps": config.num_warps, "num_stages": config.stages(torch_dtype[dtype])})
    for dtype in _TRITON_DTYPE:
        for arch in ARCHS:
            cases.append({"family": "preprocess", "dtype": dtype, "head_dim": 128, "arch": arch, "index": 0,
                          "rows": PREPROCESS_ROWS, "num_warps": PREPROCESS_WARPS, "num_stages": 1,
                          "config": {"HEAD_DIM": 128, "BLOCK_ROWS": PREPROCESS_ROWS, "HAS_DLSE": True}})
    return cases


def _compile(case: dict) -> dict:
    from qbert.kernels import block_sparse_attention as module

    fn = getattr(module, _KERNELS[case["family"]])
    constexprs = case["config"]
    pointers = _pointers(case["family"], case["dtype"])
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name.startswith("scale") else "i32"
    aligned = [name for name in (*pointers, *_ALIGNED_INTS) if name in fn.arg_names]
    kernel, summary = aot_compile(fn, signature, constexprs, aligned, case)
    return dict(summary, **_resource_usage(kernel.asm["cubin"]))


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack bytes of the kernel, from the cuobjdump bundled with Triton."""
    import tempfile
    from pathlib import Path

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True,
                                check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    assert match, f"no resource usage in cuobjdump's report:\n{report}"
    return {"registers": int(match[1]), "stack": int(match[2])}


def _compile_all() -> list[dict]:
    return compile_cases(_compile, _cases())


# ---- the test side ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compile_in_subprocess("tests.kernels.test_block_sparse_aot")


def _describe(result: dict) -> str:
    return (f"{result['family']} {result['dtype']} head_dim={result['head_dim']} sm_{result['arch']} "
            f"{result['config']} stages={result['num_stages']} warps={result['num_warps']}")


def _select(results: list[dict], arch: int, dtypes: tuple[str, ...], families=("fwd", "bwd_dkdv", "bwd_dq")):
    chosen = [r for r in results if r["arch"] == arch and r["dtype"] in dtypes and r["family"] in families]
    assert chosen, f"no {dtypes} cases compiled for sm_{arch}"
    return chosen


def _takes_wgmma(result: dict) -> bool:
    return result["rows"] % _WGMMA_ROWS == 0 and result["num_warps"] % _WARPGROUP_WARPS == 0


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_attention_uses_float_tensor_cores(compiled, arch):
    results = _select(compiled, arch, ("fp16", "bf16"))
    wrong = []
    for r in results:
        dtype = _TRITON_DTYPE[r["dtype"]]
        pattern = _wgmma_float(dtype) if arch == 90 and _takes_wgmma(r) else _mma_float(dtype)
        if not _has(r, pattern):
            wrong.append(_describe(r))
    assert not wrong, "expected f16/bf16 tensor-core mma, not found in:\n" + "\n".join(wrong)
    if arch == 90:
        assert any(_takes_wgmma(r) for r in results), "no attention config can use wgmma on sm_90"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_softmax_uses_mufu_exp2(compiled, arch):
    results = _select(compiled, arch, tuple(_TRITON_DTYPE))
    missing = [_describe(r) for r in results if not _has(r, r"ex2\.approx(\.ftz)?\.f32")]
    assert not missing, "exp2 did not lower to ex2.approx in:\n" + "\n".join(missing)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_no_register_spills(compiled, arch):
    results = _select(compiled, arch, ("fp16", "bf16"), families=tuple(_KERNELS))
    spilled = [f"{_describe(r)}: {r['stack']} B of stack, {r['registers']} registers" for r in results
               if r["stack"] > 0]
    assert not spilled, "ptxas spilled registers in:\n" + "\n".join(spilled)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_shared_memory_fits_every_config(compiled, arch):
    results = [r for r in compiled if r["arch"] == arch]
    assert len({r["family"] for r in results}) == len(_KERNELS)
    over = [f"{_describe(r)}: {r['shared']} B" for r in results if r["shared"] > MAX_SHARED_BYTES[arch]]
    assert not over, f"over sm_{arch}'s {MAX_SHARED_BYTES[arch]} B of shared memory:\n" + "\n".join(over)
