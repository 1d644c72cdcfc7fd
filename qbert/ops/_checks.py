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


def values_readable(*tensors: torch.Tensor | None) -> bool:
    """Whether a check may read the values of ``tensors`` now (checks of values, as opposed to shapes, run
    in the real op only: a fake tensor has none). Reading a CUDA tensor's value waits for the GPU, which a
    CUDA graph capture forbids, so there such checks are skipped; the eager calls a capture is always
    preceded by (warm-up) have checked the same weights and layouts."""
    return not any(t is not None and t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
                   for t in tensors)


def check_nonempty_k(op: str, name: str, t: torch.Tensor) -> None:
    if t.shape[-1] == 0:
        raise ValueError(f"{op}: the last dim (K) of {name} must be at least 1, got shape {list(t.shape)}")


def check_int8_gemm_k(op: str, name: str, t: torch.Tensor) -> None:
    """K (the last dim of ``t``) of an int8 x int8 GEMM: at most INT8_GEMM_MAX_K, where int32 sums are exact."""
    from qbert.quant.int8 import INT8_GEMM_MAX_K

    if t.shape[-1] > INT8_GEMM_MAX_K:
        raise ValueError(f"{op}: K={t.shape[-1]} exceeds {INT8_GEMM_MAX_K}, beyond which an int32 accumulator "
                         f"can overflow ({name} has shape {list(t.shape)})")


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


def check_lowbit_linear(op: str, x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None, bits: int, group_size: int, bias: torch.Tensor | None,
                        allowed_bits: tuple[int, ...]) -> None:
    """Float activations x [..., K] against packed low-bit codes (``qbert.quant.packing``) with
    K-group scales / zeros ``[ceil(K / group_size), N]``."""
    from qbert.quant.packing import PACK_CHUNK, packed_rows

    check_dtype(op, "x", x, *FLOAT_DTYPES)
    check_ndim(op, "x", x, min_ndim=1)
    check_nonempty_k(op, "x", x)
    if bits not in allowed_bits:
        raise ValueError(f"{op}: bits must be one of {allowed_bits}, got {bits!r}")
    k = x.shape[-1]
    if not isinstance(group_size, int) or group_size < 1 or (group_size % PACK_CHUNK and group_size < k):
        raise ValueError(f"{op}: group_size must be a positive multiple of {PACK_CHUNK}, or >= K={k} "
                         f"(one group per row), got {group_size!r}")
    check_dtype(op, "w_packed", w_packed, torch.int32)
    check_ndim(op, "w_packed", w_packed, ndim=2)
    rows = packed_rows(k, bits)
    if w_packed.shape[0] != rows:
        raise ValueError(f"{op}: w_packed must have ceil(K/{PACK_CHUNK})*bits = {rows} rows for K={k}, "
                         f"bits={bits}, got shape {list(w_packed.shape)}")
    n = w_packed.shape[1]
    groups = -(-k // group_size)
    check_dtype(op, "scales", scales, torch.float32)
    if scales.shape != (groups, n):
        raise ValueError(f"{op}: scales must have shape [ceil(K/group_size)={groups}, N={n}] for K={k}, "
                         f"group_size={group_size}, got {list(scales.shape)}")
    if zeros is not None:
        check_dtype(op, "zeros", zeros, torch.uint8)
        if zeros.shape != (groups, n):
            raise ValueError(f"{op}: zeros must have shape [ceil(K/group_size)={groups}, N={n}] (like "
                             f"scales), got {list(zeros.shape)}")
    if bias is not None:
        check_dtype(op, "bias", bias, *FLOAT_DTYPES)
        if bias.shape != (n,):
            raise ValueError(f"{op}: bias must have shape [N={n}], got {list(bias.shape)}")
    check_contiguous(op, x=x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)
    check_same_device(op, x=x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)
