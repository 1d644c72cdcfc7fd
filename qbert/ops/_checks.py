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


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_linear(op: str, x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> None:
    """Float activations x [..., K] against an int8 weight w_q [N, K] with per-channel f32 scales [N]."""
    check_dtype(op, "x", x, *FLOAT_DTYPES)
    check_ndim(op, "x", x, min_ndim=1)
    check_dtype(op, "w_q", w_q, torch.int8)
    check_ndim(op, "w_q", w_q, ndim=2)
    check_nonempty_k(op, "x", x)
    if x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"{op}: K mismatch: x is {shape_str(x, 'MK')}, w_q is {shape_str(w_q, 'NK')}")
    check_dtype(op, "w_scale", w_scale, torch.float32)
    n = w_q.shape[0]
    if w_scale.shape != (n,):
        raise ValueError(f"{op}: w_scale must have shape [N={n}], got {list(w_scale.shape)}")
    if bias is not None:
        check_dtype(op, "bias", bias, *FLOAT_DTYPES)
        if bias.shape != (n,):
            raise ValueError(f"{op}: bias must have shape [N={n}], got {list(bias.shape)}")
    check_contiguous(op, x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    check_same_device(op, x=x, w_q=w_q, w_scale=w_scale, bias=bias)
