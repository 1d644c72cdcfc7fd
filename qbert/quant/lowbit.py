"""Low-bit weight quantization: 2/3/4/8-bit codes with per-channel, K-group or Q-BERT row-group ranges.

A weight W [N, K] (N output rows, K input features) becomes unsigned codes ``u`` [N, K] (packed by
``qbert.quant.packing``), float32 scales ``s`` and, for asymmetric schemes, uint8 zero points ``z``:

    W[n, k] ~= (u[n, k] - z[g(k), r(n)]) * s[g(k), r(n)]

    g(k) = k // group_size   K-group of input feature k (one group over the whole row when group_size
                             is None)
    r(n) = n // (N // G)     row group of output row n: Q-BERT's group-wise quantization splits the N
                             rows into G groups that share one range (G = N: one range per channel,
                             the default; G = 1: one range for the whole matrix)

Scales and zeros are stored ``[K groups, row groups]``; ``expand_rows`` repeats them to one column per
output channel, the ``[K groups, N]`` form the GEMM kernels read. A scheme uses K groups or row groups,
not both.

Ranges (round half to even, in float32):
  * symmetric: ``qmax = 2**(bits-1) - 1``, ``s = max|W| / qmax``, ``z = 2**(bits-1)`` (implicit, not
    stored), ``u = clamp(round(W / s), -qmax, qmax) + z``. 2-bit symmetric codes are ternary {-1, 0, 1}.
  * asymmetric: the range ``[lo, hi] = [min(min W, 0), max(max W, 0)]`` (zero stays exactly
    representable), ``s = (hi - lo) / (2**bits - 1)``, ``z = clamp(round(-lo / s), 0, 2**bits - 1)``,
    ``u = clamp(round(W / s) + z, 0, 2**bits - 1)``.
  * an all-zero group gets ``s = 0``: every code dequantizes to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qbert.quant.packing import BITS_CHOICES, PACK_CHUNK, check_bits, packed_rows

_FLOAT32_BYTES = 4
_ZERO_POINT_BYTES = 1  # uint8
_WORD_BYTES = 4


@dataclass(frozen=True)
class LowBitScheme:
    """How one weight matrix is quantized; see the module docstring for the math.

    bits: 2, 3, 4 or 8.
    symmetric: True for an implicit zero point ``2**(bits-1)``; False stores one uint8 zero per group.
    group_size: K values sharing a range, a positive multiple of 32 (the packing chunk); None: whole row.
    row_groups: Q-BERT row groups G (G divides N); None: one range per output channel.
    """

    bits: int
    symmetric: bool = False
    group_size: int | None = None
    row_groups: int | None = None

    def __post_init__(self) -> None:
        check_bits("LowBitScheme", self.bits)
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1
                                            or self.group_size % PACK_CHUNK):
            raise ValueError(f"LowBitScheme: group_size must be a positive multiple of {PACK_CHUNK} "
                             f"(or None for one group per row), got {self.group_size!r}")
        if self.row_groups is not None and (not isinstance(self.row_groups, int) or self.row_groups < 1):
            raise ValueError(f"LowBitScheme: row_groups must be a positive int (or None for one range per "
                             f"output channel), got {self.row_groups!r}")
        if self.group_size is not None and self.row_groups is not None:
            raise ValueError(f"LowBitScheme: use K groups (group_size={self.group_size}) or row groups "
                             f"(row_groups={self.row_groups}), not both")

    def check_shape(self, n: int, k: int) -> None:
        if self.row_groups is not None and n % self.row_groups:
            raise ValueError(f"LowBitScheme: row_groups={self.row_groups} must divide the {n} output rows")

    def k_groups(self, k: int) -> int:
        return 1 if self.group_size is None else -(-k // self.group_size)

    def kernel_group_size(self, k: int) -> int:
        """The ``group_size`` argument of the GEMM ops: K values per scale (K itself for whole rows)."""
        return k if self.group_size is None else self.group_size

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        """Stored shape of the scales (and zeros): ``[K groups, row groups]``."""
        self.check_shape(n, k)
        return self.k_groups(k), n if self.row_groups is None else self.row_groups

    def nbytes(self, n: int, k: int) -> dict[str, int]:
        """Exact bytes stored for an [N, K] weight: packed codes, float32 scales, uint8 zeros."""
        scales = self.scale_shape(n, k)
        count = scales[0] * scales[1]
        return {"codes": packed_rows(k, self.bits) * n * _WORD_BYTES,
                "scales": count * _FLOAT32_BYTES,
                "zeros": 0 if self.symmetric else count * _ZERO_POINT_BYTES}


@dataclass(frozen=True)
class LowBitWeight:
    """Unpacked result of ``quantize_lowbit``: codes uint8 [N, K], scale float32 and zero uint8 (or None)
    of the stored shape ``[K groups, row groups]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def implicit_zero(bits: int) -> int:
    """The zero point of symmetric codes (not stored)."""
    return 1 << (bits - 1)


def _grouped(weight: torch.Tensor, scheme: LowBitScheme) -> torch.Tensor:
    """W [N, K] as [row groups, rows per group, K groups, group size], zero-padded along K."""
    n, k = weight.shape
    kg, rg = scheme.scale_shape(n, k)
    size = scheme.kernel_group_size(k)
    padded = torch.zeros(n, kg * size, dtype=torch.float32, device=weight.device)
    padded[:, :k] = weight
    return padded.view(rg, n // rg, kg, size)


def _ranges(groups: torch.Tensor, scheme: LowBitScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (float32) [row groups, K groups] of ``groups`` [rg, rows, kg, size]."""
    if scheme.symmetric:
        scale = groups.abs().amax(dim=(1, 3)) / (implicit_zero(scheme.bits) - 1)
        return scale, torch.full_like(scale, implicit_zero(scheme.bits))
    levels = (1 << scheme.bits) - 1
    lo = groups.amin(dim=(1, 3)).clamp(max=0)
    hi = groups.amax(dim=(1, 3)).clamp(min=0)
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.where(scale > 0, torch.round(-lo / safe).clamp(0, levels), torch.zeros_like(scale))
    return scale, zero


def lowbit_ranges(weight: torch.Tensor, scheme: LowBitScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 scales and zero points that ``quantize_lowbit`` gives ``weight`` [N, K], in the stored
    shape ``[K groups, row groups]`` (zeros as floats; symmetric schemes get the implicit zero)."""
    scale, zero = _ranges(_grouped(weight.detach().float(), scheme), scheme)
    return scale.T.contiguous(), zero.T.contiguous()


def lowbit_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 symmetric: bool) -> torch.Tensor:
    """Codes (float32 integers in ``0 .. 2**bits - 1``) of float32 ``values`` under ``scale`` / ``zero``
    (float32, broadcastable to ``values``): the rounding rule of the module docstring."""
    levels = (1 << bits) - 1
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(values / safe)
    if symmetric:
        qmax = implicit_zero(bits) - 1
        q = q.clamp(-qmax, qmax)
    u = (q + zero).clamp(0, levels)
    return torch.where(scale > 0, u, zero)


def quantize_lowbit(weight: torch.Tensor, scheme: LowBitScheme) -> LowBitWeight:
    """Quantize a float weight [N, K] under ``scheme`` (module docstring); zero padding never widens a range."""
    if weight.dim() != 2 or not weight.is_floating_point() or 0 in weight.shape:
        raise ValueError(f"quantize_lowbit: the weight must be a non-empty float [N, K] tensor, got "
                         f"{weight.dtype} of shape {list(weight.shape)}")
    n, k = weight.shape
    groups = _grouped(weight.detach().float(), scheme)
    scale, zero = _ranges(groups, scheme)
    u = lowbit_codes(groups, scale[:, None, :, None], zero[:, None, :, None], scheme.bits, scheme.symmetric)
    codes = u.reshape(n, -1)[:, :k].to(torch.uint8)
    scale_t = scale.T.contiguous()
    zero_t = None if scheme.symmetric else zero.T.contiguous().to(torch.uint8)
    return LowBitWeight(codes, scale_t, zero_t)


def expand_rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Scales or zeros [K groups, row groups] -> [K groups, N] (one column per output channel)."""
    if t is None or t.shape[1] == n:
        return t
    return t.repeat_interleave(n // t.shape[1], dim=1)


def dequantize_lowbit(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      bits: int, group_size: int) -> torch.Tensor:
    """float32 [N, K] from codes [N, K] and per-channel scale / zero ``[ceil(K / group_size), N]``.

    ``zero=None`` means symmetric codes (implicit zero ``2**(bits-1)``)."""
    k = codes.shape[1]
    group = torch.arange(k, device=codes.device) // group_size
    s = scale.float()[group].T  # [N, K]
    z = implicit_zero(bits) if zero is None else zero.float()[group].T
    return (codes.float() - z) * s


__all__ = ["BITS_CHOICES", "LowBitScheme", "LowBitWeight", "dequantize_lowbit", "expand_rows",
           "implicit_zero", "lowbit_codes", "lowbit_ranges", "quantize_lowbit"]
