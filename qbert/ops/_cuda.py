"""Which GPUs a row can run on: the compute-capability rules the registry derives from a row's declaration.

A row declares the least compute capability its kernels need (``Row.min_capability``); every ``cuda`` row
needs at least ``MIN_CAPABILITY``. A row that calls C++ kernels of qbert._C also needs machine code for
the device in this build: setup.py compiles machine code only (``-gencode arch=compute_XY,code=sm_XY``, no
PTX), so a device runs this build only if one of its archs has the device's major version and a minor
version no newer than the device's; an arch-specific ``a`` target (``9.0a``, wgmma) runs on exactly that
compute capability.
"""

from __future__ import annotations

import functools

import torch

# Every kernel in csrc/cuda needs sm_80 features: mma.sync m16n8k16 / m16n8k32 and cp.async.
MIN_CAPABILITY = (8, 0)


def parse_archs(archs: str) -> list[tuple[int, int, bool]]:
    """``"8.0;9.0a"`` -> ``[(8, 0, False), (9, 0, True)]`` (major, minor, arch-specific)."""
    parsed = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        specific = arch.endswith("a")
        major, _, minor = arch.removesuffix("a").partition(".")
        parsed.append((int(major), int(minor or 0), specific))
    return parsed


def runs_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether machine code built for ``archs`` runs on a device of ``capability``."""
    major, minor = capability
    return any(major == a_major and (minor == a_minor if specific else minor >= a_minor)
               for a_major, a_minor, specific in parse_archs(archs))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# Both are fixed per device and process, and asked on every dispatch of a row on CUDA tensors: cached.
@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability_reasons(device: torch.device, minimum: tuple[int, int]) -> list[str]:
    """Why CUDA ``device`` is too old for kernels that need compute capability ``minimum`` (empty if it
    is not)."""
    capability = _capability(_index(device))
    if capability < minimum:
        return [f"needs compute capability {minimum[0]}.{minimum[1]}+, got {capability[0]}.{capability[1]}"]
    return []


def build_reasons(device: torch.device) -> list[str]:
    """Why this build of qbert._C has no machine code that runs on CUDA ``device`` (empty if it has)."""
    return list(_build_reasons(_index(device)))


@functools.cache
def _build_reasons(index: int) -> tuple[str, ...]:
    from qbert import _ext

    capability = _capability(index)
    archs = _ext.build_info().get("cuda_archs", "")
    if not runs_on(archs, capability):
        return ((f"qbert._C has machine code for {archs or 'no arch'}, none of which runs on compute "
                f"capability {capability[0]}.{capability[1]}; rebuild with QBERT_CUDA_ARCHS including "
                f"{capability[0]}.{capability[1]}"),)
    return ()
