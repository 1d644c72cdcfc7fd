"""The lowbit_linear / w4a8_linear CUDA kernels, compiled by nvcc for sm_80 and sm_90a without a GPU.

tests/cuda/lowbit_linear_instantiations.cu instantiates the torch-free launch functions of
csrc/cuda/lowbit_linear/lowbit_linear_kernel.cuh for every dtype, which instantiates every kernel the
launcher can run: the tensor-core kernel for (small-M, large-M) x A16 bits {2, 3, 4, 8} x {f16, bf16}
and x A8 bits {2, 3, 4} x {f32, f16, bf16} outputs, the f32 SIMT kernel for each bit width and the
split-K reduction for each dtype (W4A8's per-token quantizer is quantize_per_token's own kernel, checked by
tests/cuda/test_nvcc_row_quantize.py). Checked per arch:
  * every one of those kernels is in the cubin, and ptxas reports 0 bytes of spill stores / loads;
  * SASS: the W4A8 kernels run on the int8 tensor cores (IMMA, no HMMA), the A16 tensor-core kernels
    on HMMA, the f32 SIMT kernel on neither;
and the torch-facing launcher lowbit_linear.cu passes nvcc's front end with torch's headers.
Correctness and speed need a GPU: tests/ops/test_lowbit_linear.py, tests/ops/test_w4a8_linear.py and
tests/cuda/test_lowbit_gpu.py.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tests.cuda import _nvcc

# Two arch compiles plus the launcher's front end take ~2-4 minutes on the 2-core CPU machines.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_nvcc.NVCC is None, reason="nvcc not found (PATH, CUDA_HOME)")]

SOURCE = Path(__file__).with_name("lowbit_linear_instantiations.cu")
LAUNCHER = _nvcc.CSRC / "cuda" / "lowbit_linear" / "lowbit_linear.cu"
A16_TYPES = ("__half", "__nv_bfloat16")
A8_TYPES = ("float", "__half", "__nv_bfloat16")
ALL_TYPES = ("float", "__half", "__nv_bfloat16")
TILE_CONFIGS = 2  # small-M and large-M
_MMA = re.compile(r"lowbit_mma_kernel<[\w:]*TileConfig<([\d, ]+)>, (\d+), (\w+), (true|false)>")
_OTHER = re.compile(r"(lowbit_simt_kernel|split_reduce_kernel)<(\w+)>")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """arch -> Compiled, and "launcher" -> None; compiled concurrently (one job per CPU, at most 3)."""
    workdir = tmp_path_factory.mktemp("nvcc_lowbit")
    jobs = {arch: (_nvcc.compile_kernels, SOURCE, arch, workdir) for arch in _nvcc.ARCHS}
    jobs["launcher"] = (_nvcc.torch_launcher_check, LAUNCHER, workdir)
    return _nvcc.build_concurrently(jobs)


def _kinds(compiled: _nvcc.Compiled) -> dict[str, tuple]:
    """Kernel name -> ("mma", tile, bits, dtype, a8) or (kind, dtype)."""
    if _nvcc.CXXFILT is None:
        pytest.skip("c++filt not found: kernel names cannot be demangled")
    kinds = {}
    for name in compiled.resources:
        if m := _MMA.search(name):
            kinds[name] = ("mma", m[1], int(m[2]), m[3], m[4] == "true")
        elif m := _OTHER.search(name):
            kinds[name] = (m[1], m[2])
        else:
            raise AssertionError(f"unexpected kernel {name}")
    return kinds


@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_every_kernel_is_instantiated(builds, arch):
    kinds = _kinds(_nvcc.result(builds, arch)).values()
    mma = [k for k in kinds if k[0] == "mma"]
    expected = ({(bits, t, False) for bits, t in itertools.product((2, 3, 4, 8), A16_TYPES)}
                | {(bits, t, True) for bits, t in itertools.product((2, 3, 4), A8_TYPES)})
    for combo in expected:
        tiles = {k[1] for k in mma if k[2:] == combo}
        assert len(tiles) == TILE_CONFIGS, f"{combo}: tile configs {tiles}"
    assert {k[2:] for k in mma} == expected
    assert sorted(k for k in kinds if k[0] == "lowbit_simt_kernel") == [("lowbit_simt_kernel", str(b)) for b in (2, 3, 4, 8)]
    assert sorted(k[1] for k in kinds if k[0] == "split_reduce_kernel") == sorted(ALL_TYPES)


@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_no_spills(builds, arch):
    _nvcc.assert_no_spills(_nvcc.result(builds, arch))


@pytest.mark.skipif(_nvcc.CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or Triton's copy)")
@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_tensor_core_instructions(builds, arch):
    compiled = _nvcc.result(builds, arch)
    for name, kind in _kinds(compiled).items():
        sass = compiled.sass[name]
        imma, hmma = _nvcc.uses(sass, "IMMA"), _nvcc.uses(sass, "HMMA")
        if kind[0] == "mma" and kind[4]:
            assert imma and not hmma, f"{name}: W4A8 must run on the int8 tensor cores (IMMA)"
        elif kind[0] == "mma":
            assert hmma and not imma, f"{name}: A16 must run on the f16/bf16 tensor cores (HMMA)"
        elif kind[0] == "lowbit_simt_kernel":
            assert _nvcc.uses(sass, "FFMA") and not (imma or hmma), f"{name}: the f32 path is IEEE FMAs"


def test_launcher_compiles_against_torch_headers(builds):
    assert _nvcc.result(builds, "launcher") is None
