"""Input checks shared by the op entry points. Every message names the op and the constraint."""

from __future__ import annotations

import torch


def shape_str(t: torch.Tensor, dims: str) -> str:
    """``[M=7, K=64]`` for a tensor of shape (7, 64) and ``dims="MK"``; leading dims print bare."""
    names = list(dims)
    sizes = list(t.shape)
    lead = len(sizes) - len(names)
    parts = [str(s) for s in sizes[:lead]] + [f"{n}={s}" for n, s in zip(names, sizes[lead:])]
    return "[" + ", ".join(parts) + "]"


def check_dtype(op: str, name: str, t: torch.Tensor, *allowed: torch.dtype) -> None:
    if t.dtype not in allowed:
        want = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} must be {want}, got {str(t.dtype).removeprefix('torch.')}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {list(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {list(t.shape)}")


def check_contiguous(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got shape {list(t.shape)} strides {list(t.stride())}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_nonempty_k(op: str, name: str, t: torch.Tensor) -> None:
    if t.shape[-1] == 0:
        raise ValueError(f"{op}: the last dim (K) of {name} must be at least 1, got shape {list(t.shape)}")
