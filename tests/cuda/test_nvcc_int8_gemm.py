"""The int8 GEMM family (int8_gemm / int8_linear / int8_linear_requant) CUDA kernels, compiled by nvcc for
sm_80 and sm_90a without a GPU.

tests/cuda/int8_gemm_instantiations.cu instantiates csrc/cuda/int8_gemm/int8_gemm_kernel.cuh's dispatch
launch_int8_gemm for every output kind x activation the launcher asks for (kI32 only without activation),
which instantiates every kernel it can run: the sm_80 mma.sync kernel for each tile config and the sm_90a
wgmma kernel. Checked per arch:
  * every one of those kernels is in the cubin, and ptxas reports 0 bytes of spill stores / loads;
  * SASS: the sm_80 kernels run on the int8 tensor cores through mma.sync (IMMA, no HMMA); on sm_90a the
    wgmma kernels issue IGMMA (cuobjdump prints e.g. ``IGMMA.64x256x32.S8.S8``);
and the torch-facing launcher int8_gemm.cu passes nvcc's front end with torch's headers.
tests/cuda/int8_gemm_host_checks.cu, built for the host, replays each sm_80 config's shared-memory
layout and ldmatrix addressing through the PTX fragment layouts (exact product, no bank conflicts, the
epilogue covering each tile element once) and prints plan_int8_gemm's answers for the plan tests below.
Correctness and speed on a GPU: tests/ops/test_int8_gemm.py, test_int8_linear.py,
test_int8_linear_requant.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cuda import _nvcc

# Two arch compiles, the host checks and the launcher's front end take ~1 minute on the 2-core CPU machines.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_nvcc.NVCC is None, reason="nvcc not found (PATH, CUDA_HOME)")]

SOURCE = Path(__file__).with_name("int8_gemm_instantiations.cu")
HOST_CHECKS = Path(__file__).with_name("int8_gemm_host_checks.cu")
LAUNCHER = _nvcc.CSRC / "cuda" / "int8_gemm" / "int8_gemm.cu"

# OutKind and Act as int8_epilogue.cuh numbers them (c++filt prints enum template arguments as numbers).
K_I32, K_F32, K_F16, K_BF16, K_S8 = range(5)
NONE, GELU = range(2)
COMBOS = {(K_I32, NONE)} | set(itertools.product((K_F32, K_F16, K_BF16, K_S8), (NONE, GELU)))
SM80_CONFIGS = 3  # large, medium, small-M (int8_gemm_sm80.cuh)
# Kernel and PlanStatus as int8_gemm_kernel.cuh numbers them.
SMALL_M, MEDIUM, LARGE, WGMMA = range(4)
OK, UNSUPPORTED_DEVICE, ROW_TOO_WIDE = range(3)
SMALL_M_MAX = 32  # kSmallMMax

_MMA = re.compile(r"int8_gemm_mma_kernel<[\w:]*TileConfig<([\d, ]+)>, \([\w:]+\)(\d), \([\w:]+\)(\d)>")
_WGMMA = re.compile(r"int8_gemm_wgmma_kernel<\([\w:]+\)(\d), \([\w:]+\)(\d)>")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """arch -> Compiled, "launcher" -> None, "host" -> the host checks executable; compiled concurrently."""
    workdir = tmp_path_factory.mktemp("nvcc_int8_gemm")
    host = workdir / "int8_gemm_host_checks"
    jobs = {arch: (_nvcc.compile_kernels, SOURCE, arch, workdir) for arch in _nvcc.ARCHS}
    # QBERT_SM90A as setup.py's default arch list (8.0;9.0a) defines it: the plan may pick wgmma.
    jobs["host"] = (_nvcc.run, [_nvcc.NVCC, "-arch=sm_80", *_nvcc.NVCC_FLAGS, f"-I{_nvcc.CSRC}",
                                "-DQBERT_SM90A=1", str(HOST_CHECKS), "-o", str(host)])
    jobs["launcher"] = (_nvcc.torch_launcher_check, LAUNCHER, workdir)
    results = _nvcc.build_concurrently(jobs)
    if not isinstance(results["host"], BaseException):
        results["host"] = host
    return results


def _kinds(compiled: _nvcc.Compiled) -> dict[str, tuple]:
    """Kernel name -> ("mma", tile config, out kind, act) or ("wgmma", out kind, act)."""
    if _nvcc.CXXFILT is None:
        pytest.skip("c++filt not found: kernel names cannot be demangled")
    kinds = {}
    for name in compiled.resources:
        if m := _MMA.search(name):
            kinds[name] = ("mma", m[1], int(m[2]), int(m[3]))
        elif m := _WGMMA.search(name):
            kinds[name] = ("wgmma", int(m[1]), int(m[2]))
        else:
            raise AssertionError(f"unexpected kernel {name}")
    return kinds


@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_every_kernel_is_instantiated(builds, arch):
    kinds = list(_kinds(_nvcc.result(builds, arch)).values())
    mma = [k for k in kinds if k[0] == "mma"]
    assert len({k[1] for k in mma}) == SM80_CONFIGS, f"tile configs {sorted({k[1] for k in mma})}"
    for combo in COMBOS:
        configs = {k[1] for k in mma if k[2:] == combo}
        assert len(configs) == SM80_CONFIGS, f"{combo}: tile configs {configs}"
    assert {k[2:] for k in mma} == COMBOS
    # The wgmma kernel is in both cubins (its sm_80 body is a trap that the plan never launches).
    assert {k[1:] for k in kinds if k[0] == "wgmma"} == COMBOS


@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_no_spills(builds, arch):
    _nvcc.assert_no_spills(_nvcc.result(builds, arch))


@pytest.mark.skipif(_nvcc.CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or Triton's copy)")
@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_tensor_core_instructions(builds, arch):
    compiled = _nvcc.result(builds, arch)
    for name, kind in _kinds(compiled).items():
        sass = compiled.sass[name]
        if kind[0] == "mma":
            assert _nvcc.uses(sass, "IMMA") and not _nvcc.uses(sass, "HMMA"), f"{name}: must run on IMMA (mma.sync s8)"
        elif arch == "sm_90a":
            assert _nvcc.uses(sass, "IGMMA") and not _nvcc.uses(sass, "IMMA"), f"{name}: must run on IGMMA (wgmma s8)"


def test_launcher_compiles_against_torch_headers(builds):
    assert _nvcc.result(builds, "launcher") is None


def test_fragment_layouts_and_swizzle(builds):
    out = _nvcc.run([str(_nvcc.result(builds, "host")), "fragments"]).stdout.split("\n")
    assert [line for line in out if line] == ["ok LargeConfig", "ok MediumConfig", "ok SmallMConfig",
                                              "ok sm90 epilogue layout"]


# ---- plan_int8_gemm ------------------------------------------------------------------------------------


KIB = 1024
# What cudaDeviceGetAttribute reports for the driver's shared-memory reservation per resident CTA.
SMEM_RESERVED_PER_CTA = 1 * KIB


@dataclass(frozen=True)
class Device:
    """The fields of int8_gemm_kernel.cuh's DeviceInfo, which int8_gemm.cu reads from the device (values
    here: CUDA C++ Programming Guide, "Technical Specifications per Compute Capability")."""

    name: str
    cc_major: int
    cc_minor: int
    sm_count: int
    smem_per_sm: int
    threads_per_sm: int
    smem_reserved_per_cta: int = SMEM_RESERVED_PER_CTA


H100 = Device("H100", 9, 0, 132, smem_per_sm=228 * KIB, threads_per_sm=2048)
A100 = Device("A100", 8, 0, 108, smem_per_sm=164 * KIB, threads_per_sm=2048)
RTX4090 = Device("RTX4090", 8, 9, 128, smem_per_sm=100 * KIB, threads_per_sm=1536)


@dataclass(frozen=True)
class PlanRow:
    status: int
    kernel: int
    block_m: int
    block_n: int
    m_tiles: int
    n_tiles: int
    grid: int
    ctas_per_sm: int
    coresident: int


def _plans(builds, cases: list[tuple[int, int, int, int, Device]]) -> list[PlanRow]:
    """plan_int8_gemm(M, N, K, kind, device) for each case, from the host checks program."""
    lines = "".join(f"{m} {n} {k} {kind} {d.cc_major} {d.cc_minor} {d.sm_count} {d.smem_per_sm} "
                    f"{d.smem_reserved_per_cta} {d.threads_per_sm}\n" for m, n, k, kind, d in cases)
    result = subprocess.run([str(_nvcc.result(builds, "host")), "plan"], input=lines, capture_output=True,
                                  text=True, check=True)
    rows = [PlanRow(*map(int, line.split())) for line in result.stdout.splitlines()]
    assert len(rows) == len(cases)
    return rows


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("device", [H100, A100, RTX4090], ids=lambda d: d.name)
def test_plan_invariants(builds, device):
    shapes = list(itertools.product((1, 7, 32, 33, 129, 512, 4096, 16384), (2, 13, 768, 3072, 30522)))
    cases = [(m, n, 768, kind, device) for (m, n), kind in itertools.product(shapes, range(5))]
    for (m, n, _, kind, _), p in zip(cases, _plans(builds, cases)):
        where = f"M={m} N={n} kind={kind} on {device.name}: {p}"
        if p.status != OK:  # only requant of a vocabulary-wide row can exceed the co-resident CTAs
            assert (kind, n, p.status, p.grid) == (K_S8, 30522, ROW_TOO_WIDE, 0) and p.n_tiles > p.coresident, where
            continue
        assert (p.m_tiles, p.n_tiles) == (_ceil_div(m, p.block_m), _ceil_div(n, p.block_n)), where
        assert 1 <= p.grid <= min(p.m_tiles * p.n_tiles, p.coresident), where
        assert p.coresident == device.sm_count * p.ctas_per_sm >= device.sm_count, where
        if kind == K_S8:  # whole row blocks per persistent iteration
            assert p.grid % p.n_tiles == 0, where
        assert (p.kernel == SMALL_M) == (m <= SMALL_M_MAX), where
        if device.cc_major == 8:
            assert p.kernel != WGMMA, where


def test_plan_picks_wgmma_for_big_gemms_on_h100(builds):
    # BERT-base FFN at 4096 tokens: the H100 target shape runs on wgmma; an A100 uses the large tiles.
    rows = _plans(builds, [(4096, 3072, 768, kind, dev) for kind in range(5) for dev in (H100, A100)])
    assert [r.kernel for r in rows] == [WGMMA, LARGE] * 5


def test_plan_counts_shared_memory_per_sm(builds):
    # 128 x 128 tiles stage a 67.6 KB epilogue tile: 2 CTAs fit in an A100's 164 KB, 1 in a 4090's 100 KB.
    rows = _plans(builds, [(16384, 3072, 768, K_F16, dev) for dev in (A100, RTX4090)])
    assert [(r.kernel, r.ctas_per_sm) for r in rows] == [(LARGE, 2), (LARGE, 1)]


def test_plan_takes_shared_memory_from_the_device(builds):
    # The per-SM shared memory is what the device reports (DeviceInfo), not a table by compute capability:
    # a cc 8.0 device reporting a 4090's 100 KB fits one 128 x 128 CTA, as the 4090 does, not an A100's two.
    small_smem_a100 = dataclasses.replace(A100, name="A100 with 100 KB", smem_per_sm=RTX4090.smem_per_sm)
    rows = _plans(builds, [(16384, 3072, 768, K_F16, dev) for dev in (A100, small_smem_a100)])
    assert [(r.kernel, r.ctas_per_sm) for r in rows] == [(LARGE, 2), (LARGE, 1)]


@pytest.mark.parametrize("cc", [(7, 5), (10, 0), (12, 0)], ids=lambda c: f"cc{c[0]}{c[1]}")
def test_plan_refuses_unsupported_devices(builds, cc):
    other = dataclasses.replace(H100, name="other", cc_major=cc[0], cc_minor=cc[1], sm_count=100)
    rows = _plans(builds, [(512, 768, 768, K_F32, other)])
    assert rows[0].status == UNSUPPORTED_DEVICE and rows[0].grid == 0


def test_plan_refuses_requant_rows_wider_than_the_gpu(builds):
    # kS8 needs a row block's n_tiles CTAs resident at once: 4 SMs cannot hold N = 2**20 / 64 of them.
    tiny = dataclasses.replace(A100, name="tiny", sm_count=4)
    rows = _plans(builds, [(m, 1 << 20, 768, kind, tiny) for m in (8, 4096) for kind in (K_S8, K_F16)])
    assert [r.status for r in rows] == [ROW_TOO_WIDE, OK, ROW_TOO_WIDE, OK]
    assert all(r.grid == 0 for r in rows[::2])
