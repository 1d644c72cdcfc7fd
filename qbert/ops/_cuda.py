"""Which GPUs the CUDA kernels of this build can run on: the ``supports`` rule every ``cuda`` row shares.

The kernels need sm_80 features (``mma.sync`` m16n8k16 / m16n8k32, ``cp.async``). setup.py compiles
machine code only (``-gencode arch=compute_XY,code=sm_XY``, no PTX), so a device runs this build only if
one of its archs has the device's major version and a minor version no newer than the device's; an
arch-specific ``a`` target (``9.0a``, wgmma) runs on exactly that compute capability.
"""

from __future__ import annotations

import functools

import torch

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


def capability_reasons(device: torch.device) -> list[str]:
    """Why this build's CUDA kernels cannot run on ``device`` (empty if they can, or for non-CUDA devices:
    the registry refuses those for the cuda backend itself)."""
    if device.type != "cuda":
        return []
    index = device.index if device.index is not None else torch.cuda.current_device()
    return list(_capability_reasons(index))


@functools.cache
def _capability_reasons(index: int) -> tuple[str, ...]:
    # Fixed per device and process, and asked on every dispatch of a cuda row: computed once.
    from qbert import _ext

    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return ((f"needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (mma.sync, cp.async), "
                f"got {capability[0]}.{capability[1]}"),)
    archs = _ext.build_info().get("cuda_archs", "")
    if not runs_on(archs, capability):
        return ((f"qbert._C has machine code for {archs or 'no arch'}, none of which runs on compute "
                f"capability {capability[0]}.{capability[1]}; rebuild with QBERT_CUDA_ARCHS including "
                f"{capability[0]}.{capability[1]}"),)
    return ()


def tensor_supports(x: torch.Tensor, *args, **kwargs) -> list[str]:
    """A ``supports`` function for ``cuda`` rows whose first argument is a tensor."""
    return capability_reasons(x.device)
