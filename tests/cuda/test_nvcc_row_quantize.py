"""The row kernels of csrc/cuda/row_quantize (add_layernorm_quantize, quantize_per_token, and w4a8_linear's
activation quantizer, which is quantize_per_token's kernel writing padded rows), compiled by nvcc for sm_80
and sm_90a without a GPU.

tests/cuda/row_quantize_instantiations.cu instantiates the torch-free launch functions for every dtype,
which instantiates every kernel the launcher can run: {f32, f16, bf16} x {quantize only, LayerNorm,
residual add + LayerNorm} x {16-byte vectors, single elements} x {warp per row, block per row}. Checked
per arch:
  * every one of those kernels is in the cubin, and ptxas reports 0 bytes of spill stores / loads (the
    warp path holds 32 row values a lane in registers);
  * SASS: the vectorized kernels load 128-bit vectors and the others never do; the warp path has no
    block barrier, the block path has one;
  * PTX: every f32 add / sub / mul / fma carries an explicit rounding mode (ptxas may then not contract
    them), the divisions and the square root are IEEE (div.rn, sqrt.rn; no approximate forms), and the
    codes round with cvt.rni (half to even);
and the torch-facing launcher row_quantize.cu passes nvcc's front end with torch's headers. Correctness
needs a GPU: tests/ops/test_add_layernorm_quantize.py and tests/ops/test_quantize_per_token.py run the cuda
backend there.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tests.cuda import _nvcc

# Two arch compiles, two PTX compiles and the launcher's front end: well under a minute on the CPU machines.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_nvcc.NVCC is None, reason="nvcc not found (PATH, CUDA_HOME)")]

SOURCE = Path(__file__).with_name("row_quantize_instantiations.cu")
LAUNCHER = _nvcc.CSRC / "cuda" / "row_quantize" / "row_quantize.cu"
TYPES = ("float", "__half", "__nv_bfloat16")
# (residual, normalize): quantize_per_token, LayerNorm, residual add + LayerNorm.
OPS = ((False, False), (False, True), (True, True))
_KERNEL = re.compile(r"row_quantize_kernel<(\w+), (true|false), (true|false), (true|false), (true|false)>")
_ENTRY = re.compile(r"^\.visible \.entry (\w+)\(", re.MULTILINE)


def _ptx(arch: str, workdir: Path) -> str:
    out = workdir / f"{SOURCE.stem}.{arch}.ptx"
    _nvcc.run([_nvcc.NVCC, "-ptx", f"-arch={arch}", *_nvcc.NVCC_FLAGS, f"-I{_nvcc.CSRC}", str(SOURCE), "-o",
               str(out)])
    return out.read_text()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """arch -> Compiled, ("ptx", arch) -> PTX text, "launcher" -> None; compiled concurrently."""
    workdir = tmp_path_factory.mktemp("nvcc_row_quantize")
    jobs = {arch: (_nvcc.compile_kernels, SOURCE, arch, workdir) for arch in _nvcc.ARCHS}
    jobs.update({("ptx", arch): (_ptx, arch, workdir) for arch in _nvcc.ARCHS})
    jobs["launcher"] = (_nvcc.torch_launcher_check, LAUNCHER, workdir)
    return _nvcc.build_concurrently(jobs)


def _kinds(names) -> dict[str, tuple[str, bool, bool, bool, bool]]:
    """Kernel name -> (dtype, residual, normalize, vectorized, warp per row)."""
    if _nvcc.CXXFILT is None:
        pytest.skip("c++filt not found: kernel names cannot be demangled")
    kinds = {}
    for name in names:
        m = _KERNEL.search(name)
        assert m, f"unexpected kernel {name}"
        kinds[name] = (m[1], *(flag == "true" for flag in m.groups()[1:]))
    return kinds


@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_every_kernel_is_instantiated(builds, arch):
    kinds = sorted(_kinds(_nvcc.result(builds, arch).resources).values())
    expected = sorted((t, residual, normalize, vectorized, warp)
                      for t, (residual, normalize), vectorized, warp
                      in itertools.product(TYPES, OPS, (True, False), (True, False)))
    assert kinds == expected


@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_no_spills(builds, arch):
    _nvcc.assert_no_spills(_nvcc.result(builds, arch))


@pytest.mark.skipif(_nvcc.CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or Triton's copy)")
@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_vector_loads_and_barriers(builds, arch):
    compiled = _nvcc.result(builds, arch)
    for name, (_, _, _, vectorized, warp) in _kinds(compiled.resources).items():
        sass = compiled.sass[name]
        wide = re.search(r"\bLDG\.E(\.\w+)*\.128\b", sass) is not None
        assert wide == vectorized, f"{name}: 128-bit loads {'missing' if vectorized else 'on the unaligned path'}"
        barrier = re.search(r"\bBAR\.SYNC\b", sass) is not None
        assert barrier != warp, f"{name}: the warp path needs no block barrier, the block path one"


@pytest.mark.parametrize("arch", _nvcc.ARCHS)
def test_float_math_is_explicitly_rounded_and_ieee(builds, arch):
    ptx = _nvcc.result(builds, ("ptx", arch))
    entries = _ENTRY.split(ptx)[1:]  # name, body, name, body, ...
    assert len(entries) // 2 == len(TYPES) * len(OPS) * 2 * 2, "one PTX entry per kernel"
    for mangled, body in zip(entries[::2], entries[1::2]):
        opcodes = set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", body, flags=re.MULTILINE))
        loose = sorted(op for op in opcodes if re.fullmatch(r"(add|sub|mul|fma)\.f32", op))
        assert not loose, f"{mangled}: f32 arithmetic without a rounding mode (ptxas may contract it): {loose}"
        approx = sorted(op for op in opcodes if re.fullmatch(r"(div\.(approx|full)|sqrt\.approx|rsqrt|rcp)[\w.]*", op))
        assert not approx, f"{mangled}: approximate math {approx}"
        assert {"div.rn.f32", "cvt.rni.f32.f32"} <= opcodes, f"{mangled}: the codes need x / scale in IEEE and rint"
    layernorm = [body for mangled, body in zip(entries[::2], entries[1::2]) if "sqrt.rn.f32" in body]
    assert len(layernorm) == len(TYPES) * 2 * 2 * 2, "every LayerNorm kernel takes an IEEE sqrt"


def test_launcher_compiles_against_torch_headers(builds):
    assert _nvcc.result(builds, "launcher") is None
