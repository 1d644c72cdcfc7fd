"""Compile CUDA sources with nvcc on machines without a GPU and read what ptxas and the SASS say.

Shared by the tests/cuda/test_nvcc_*.py files: find the tools, compile a torch-free translation unit to
a cubin with ptxas' resource report, split that report and ``cuobjdump -sass`` per kernel, and compile a
torch-facing launcher against torch's headers. Nothing is cached in the repository: every compile
writes to a temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = ("sm_80", "sm_90a")
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr")


def tool(name: str) -> str | None:
    """``name`` on PATH, else beside nvcc / under CUDA_HOME, else the copy Triton ships (cuobjdump)."""
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    dirs = [Path(h) / "bin" for h in homes if h] + ([Path(nvcc).resolve().parent] if nvcc else [])
    spec = importlib.util.find_spec("triton")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin")
    for d in dirs:
        if (d / name).is_file():
            return str(d / name)
    return None


NVCC = tool("nvcc")
CUOBJDUMP = tool("cuobjdump")
CXXFILT = shutil.which("c++filt")
SANITIZER = tool("compute-sanitizer")
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")


@dataclass(frozen=True)
class KernelResources:
    """ptxas -v's report for one kernel."""

    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int


@dataclass(frozen=True)
class Compiled:
    arch: str
    resources: dict[str, KernelResources]  # demangled kernel name -> ptxas report
    sass: dict[str, str]                   # demangled kernel name -> its SASS ("" without cuobjdump)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def demangle(names: list[str]) -> dict[str, str]:
    if CXXFILT is None or not names:
        return {n: n for n in names}
    out = run([CXXFILT, *names]).stdout.splitlines()
    return dict(zip(names, out))


_PTXAS_KERNEL = re.compile(
    r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
    r"\n.*?Used (\d+) registers")


def parse_ptxas(log: str) -> dict[str, KernelResources]:
    """Mangled name -> resources, from ``ptxas -v`` output (only entry functions report registers)."""
    return {m[0]: KernelResources(int(m[4]), int(m[1]), int(m[2]), int(m[3]))
            for m in _PTXAS_KERNEL.findall(log)}


def split_sass(dump: str) -> dict[str, str]:
    """Mangled name -> SASS text, from ``cuobjdump -sass``."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", dump, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def compile_kernels(source: Path, arch: str, workdir: Path) -> Compiled:
    """Compile a torch-free translation unit for one arch; report resources and SASS per kernel."""
    cubin = workdir / f"{source.stem}.{arch}.cubin"
    result = run([NVCC, "-cubin", f"-arch={arch}", *NVCC_FLAGS, "-Xptxas", "-v", f"-I{CSRC}", str(source),
                  "-o", str(cubin)])
    resources = parse_ptxas(result.stderr)
    sass = split_sass(run([CUOBJDUMP, "-sass", str(cubin)]).stdout) if CUOBJDUMP else {}
    names = demangle(sorted(resources))
    return Compiled(arch, {names[n]: r for n, r in resources.items()}, {names.get(n, n): s for n, s in sass.items()})


def torch_launcher_check(source: Path, workdir: Path) -> None:
    """Run nvcc's front end (host and device code, full semantic analysis; no ptxas, no host object) on
    a torch-facing launcher with torch's headers, as setup.py's CUDAExtension would compile it.

    A CPU wheel of torch ships the c10/ATen CUDA headers but not the header its CMake build generates,
    c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in with the value a shared-library build writes
    is put on the include path.
    """
    import torch
    from torch.utils import cpp_extension

    stub = workdir / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [CSRC, *cpp_extension.include_paths(), workdir / "stub", sysconfig.get_paths()["include"]]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = dict.fromkeys([*NVCC_FLAGS, *cpp_extension.COMMON_NVCC_FLAGS])  # ordered, without repeats
    run([NVCC, "--cuda", "-arch=compute_80", "-code=compute_80", *flags,
         f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
         "-DQBERT_WITH_CUDA=1", *(f"-I{d}" for d in includes), str(source), "-o", str(workdir / "launcher.ii")])


# ---- shared by the test modules ------------------------------------------------------------------------

def build_concurrently(jobs: dict) -> dict:
    """``name -> (function, *args)``, run in threads (at most 3: the CPU machines have 2 cores). Returns
    ``name -> result``, or the exception it raised, so that each test needing a failed build reports it."""
    with ThreadPoolExecutor(max_workers=min(3, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(fn, *args) for name, (fn, *args) in jobs.items()}
        return {name: (future.exception() or future.result()) for name, future in futures.items()}


def result(builds: dict, name):
    """One build's result; raises the exception it failed with."""
    value = builds[name]
    if isinstance(value, BaseException):
        raise value
    return value


def assert_no_spills(compiled: Compiled) -> None:
    assert compiled.resources, "ptxas reported no kernels"
    spilling = {name: r for name, r in compiled.resources.items() if r.spill_stores or r.spill_loads}
    assert not spilling, f"{compiled.arch}: kernels spill to local memory: {spilling}"


def uses(sass: str, opcode: str) -> bool:
    """Whether the SASS contains instruction ``opcode`` (``HMMA.16816.F32 ...``, ``FFMA R1, ...``); the
    move ``HFMA2.MMA`` is not an HMMA."""
    return re.search(rf"\b{opcode}[.\s]", sass) is not None


def assert_sanitizer_clean(sanitizer_tool: str, script: str) -> None:
    """Run ``python -c script`` (from the repository root) under ``compute-sanitizer --tool sanitizer_tool``
    and fail with its report unless it finds no error."""
    result = subprocess.run([SANITIZER, f"--tool={sanitizer_tool}", "--error-exitcode=1", sys.executable, "-c",
                             script], check=False, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
