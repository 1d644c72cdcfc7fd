"""Builds qbert._C: the CPU kernels always, the CUDA kernels when torch and the toolkit have CUDA.

Environment:
  QBERT_FORCE_CUDA=1  require the CUDA sources (fail if torch has no CUDA or CUDA_HOME is unset)
  QBERT_NO_CUDA=1     never build the CUDA sources
  QBERT_CUDA_ARCHS    semicolon-separated arch list for the CUDA build (default "8.0;9.0a")
"""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _cuda_decision() -> tuple[bool, str]:
    if os.environ.get("QBERT_NO_CUDA") == "1":
        return False, "QBERT_NO_CUDA=1"
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None:
        missing.append("CUDA_HOME is not set and nvcc was not found")
    if missing and os.environ.get("QBERT_FORCE_CUDA") == "1":
        raise SystemExit("qbert: QBERT_FORCE_CUDA=1 but CUDA cannot be built: " + "; ".join(missing))
    return not missing, "; ".join(missing)


with_cuda, why_not = _cuda_decision()
cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
cuda_sources = _sources("csrc/cuda/**/*.cu")
# -fopenmp at compile time only: outside a one-call encoder qbert's kernels split over at::parallel_for, whose
# OpenMP regions resolve to the runtime torch loaded (csrc/cpu/parallel.h); torch.set_num_threads() governs.
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", f"-DQBERT_WITH_CUDA={int(with_cuda)}"]
include_dirs = [str(ROOT / "csrc")]

if with_cuda:
    archs = os.environ.get("QBERT_CUDA_ARCHS", "8.0;9.0a").split(";")
    # Recorded in build_info so the cuda backend can refuse a GPU this build has no machine code for.
    cxx_flags.append(f'-DQBERT_CUDA_ARCHS="{";".join(archs)}"')
    gencode = []
    for arch in archs:
        sm = arch.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    # The int8 GEMM plan may pick the wgmma kernel only when sm_90a machine code is built.
    sm90a = ["-DQBERT_SM90A=1"] if "9.0a" in archs else []
    ext = CUDAExtension(
        "qbert._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                                                        f"-DQBERT_WITH_CUDA=1", *sm90a, *gencode]},
    )
    print(f"qbert: building CPU and CUDA kernels for {', '.join(archs)}")
else:
    ext = CppExtension("qbert._C", cpu_sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags})
    print(f"qbert: building CPU kernels only, CUDA skipped ({why_not}); QBERT_FORCE_CUDA=1 makes this an error")

setup(
    packages=["qbert", *(f"qbert.{p.name}" for p in sorted((ROOT / "qbert").iterdir())
                         if (p / "__init__.py").exists()), "qbert.kernels", "qbert.benchmarks"],
    # Triton kernels and benchmarks live at the top of the repository and install inside the package.
    # kernels/ has no __init__.py: from the repository root it must not import as a top-level "kernels"
    # package, which would shadow Hugging Face's `kernels` (transformers imports it). The symlink
    # qbert/kernels -> ../kernels lets an editable install find qbert.kernels as well.
    package_dir={"qbert.kernels": "kernels", "qbert.benchmarks": "benchmarks"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
