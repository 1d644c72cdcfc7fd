"""Hessian-aware rounding of one weight matrix (OBQ / GPTQ), in the codes of a qbert format.

For a linear layer y = x W^T with calibration inputs X [T, K] (T tokens), rounding W [N, K] to a grid
changes the outputs by ||X (W_hat - W)^T||^2 = sum_n dW_n H dW_n^T / 2 with the input Hessian

    H = 2 X^T X / T                                                        [K, K]

(the same H for every output row n). Round to nearest ignores H. OBQ quantizes one column k at a time
and moves its rounding error onto the columns not yet quantized along the optimal direction,

    err_n = (W[n, k] - Q(W[n, k])) / Hinv[k, k],   W[n, j] -= err_n * Hinv[k, j]   (j > k),

then drops k from the inverse Hessian. GPTQ (Frantar et al., 2023) does the same for all rows at once in
a fixed column order, takes the successive inverses from the upper Cholesky factor U of H^-1 (row k of U
over U[k, k] is row k of the inverse after the columns before k are dropped), and applies the updates
lazily: inside a block of ``block_size`` columns directly, to the columns after the block in one matrix
product. With a diagonal H every error stays in its own column, and GPTQ gives round to nearest exactly.

Grids (``qbert.quant.lowbit``, ``qbert.quant.int8``): scales and zero points are those of the format.
Per-channel and row-group ranges cover all of K and are computed from W before any update; K groups get
their range when their first column is reached, from the updated weights of the group (blocks are cut so
that a group never spans two of them). With ``act_order`` the columns are visited by decreasing H[k, k]
and every K group's range is computed from W up front ("static groups"), so that the stored layout, the
scales and the kernels stay as they are. Each column is quantized in float32 exactly as the format
dequantizes, so the returned codes reproduce the weight GPTQ chose; the error feedback runs in float64.

Damping: ``damp * mean(diag H)`` is added to the diagonal before the inverse (GPTQ's percdamp). An input
feature that is zero on every calibration token (H[k, k] = 0) has no curvature: its diagonal entry gets
the mean diagonal, so that column receives no updates: it is rounded to nearest on its group's grid (its
round-to-nearest code, except in a lazy K group, whose range follows the updates of its other columns).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from qbert.quant.int8 import INT8_QMAX
from qbert.quant.lowbit import LowBitScheme, expand_rows, lowbit_codes, lowbit_ranges

if TYPE_CHECKING:
    from qbert.nn.formats import LinearFormat

DEFAULT_DAMP = 0.01  # GPTQ's percdamp: a hundredth of the mean diagonal
DEFAULT_BLOCK_SIZE = 128  # columns per lazy update (GPTQ's blocksize)


class GPTQError(ValueError):
    """GPTQ cannot quantize a layer with the given inputs; the message names the layer and the remedy."""


@dataclasses.dataclass(frozen=True)
class GPTQWeight:
    """Codes in the storage of the layer's format (``QLinear.from_codes``): int8 formats codes int8 [N, K]
    and scale float32 [N]; packed formats codes uint8 [N, K] (unpacked), scale float32 and, asymmetric,
    zero uint8 ``[K groups, row groups]``. ``dequantized`` is the float32 weight they stand for."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    dequantized: torch.Tensor


class _Grid:
    """The rounding of one column of W [N, K] under a format: per-row scale and zero for column k."""

    def __init__(self, weight: torch.Tensor, fmt: LinearFormat, act_order: bool) -> None:
        n, k = weight.shape
        self.int8 = not fmt.packed
        self.scheme: LowBitScheme | None = None if self.int8 else fmt.scheme
        self.lazy = not self.int8 and self.scheme.group_size is not None and not act_order
        if self.int8:  # the int8 storage's scales: qbert.ops.quantize_per_token of the rows, as QLinear has them
            from qbert import ops

            self.row_scale = ops.quantize_per_token(weight.contiguous())[1]  # [N]
            return
        self.group = self.scheme.kernel_group_size(k)
        if self.lazy:
            self.scale = torch.zeros(self.scheme.k_groups(k), n, dtype=torch.float32, device=weight.device)
            self.zero = torch.zeros_like(self.scale)
        else:
            scale, zero = lowbit_ranges(weight, self.scheme)  # [K groups, row groups]
            self.scale, self.zero = expand_rows(scale, n).clone(), expand_rows(zero, n).clone()

    def start_group(self, columns: torch.Tensor, group: int) -> None:
        """Lazy K groups: the range of ``group`` from its current weights ``columns`` [N, group width]."""
        per_row = dataclasses.replace(self.scheme, group_size=None, row_groups=None)
        scale, zero = lowbit_ranges(columns, per_row)  # [1, N]
        self.scale[group], self.zero[group] = scale[0], zero[0]

    def quantize(self, column: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized float32) of the float32 column [N] at input feature ``k``."""
        if self.int8:
            codes = torch.round(column / self.row_scale).clamp(-INT8_QMAX, INT8_QMAX)
            return codes, codes * self.row_scale
        g = k // self.group
        scale, zero = self.scale[g], self.zero[g]
        codes = lowbit_codes(column, scale, zero, self.scheme.bits, self.scheme.symmetric)
        return codes, (codes - zero) * scale

    def stored(self, codes: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.int8:
            return codes.to(torch.int8), self.row_scale.float(), None
        rows = n if self.scheme.row_groups is None else self.scheme.row_groups
        # Row groups repeat one range over n // rows consecutive rows: keep the first row of each.
        scale = self.scale[:, ::n // rows].contiguous()
        zero = None if self.scheme.symmetric else self.zero[:, ::n // rows].to(torch.uint8).contiguous()
        return codes.to(torch.uint8), scale, zero


def input_hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / T in float64 for inputs X [..., K] (all leading dims are tokens)."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
    return 2 * x.T @ x / max(x.shape[0], 1)


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer-output error tr(dW H dW^T) / 2 of replacing ``weight`` by ``quantized`` under ``hessian``
    (``input_hessian``): the mean over calibration tokens of ||x (W_hat - W)^T||^2."""
    delta = quantized.double() - weight.double()
    return 0.5 * torch.einsum("nk,kj,nj->", delta, hessian.double(), delta).item()


def _check(weight: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int, name: str) -> None:
    if weight.dim() != 2 or not weight.is_floating_point() or 0 in weight.shape:
        raise GPTQError(f"gptq: {name}: the weight must be a non-empty float [N, K] tensor, got {weight.dtype} "
                        f"of shape {list(weight.shape)}")
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise GPTQError(f"gptq: {name}: the input Hessian must be [K, K] = [{k}, {k}] for a weight of shape "
                        f"{list(weight.shape)}, got {list(hessian.shape)}")
    if not torch.isfinite(weight).all():
        raise GPTQError(f"gptq: {name}: the weight has non-finite values")
    if not torch.isfinite(hessian).all():
        raise GPTQError(f"gptq: {name}: the input Hessian has non-finite values (the calibration inputs of "
                        f"this layer overflowed or were NaN)")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise GPTQError(f"gptq: damp must be a float >= 0 (a fraction of the mean diagonal of H), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise GPTQError(f"gptq: block_size must be a positive int, got {block_size!r}")


def _inverse_cholesky(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, after giving dead inputs the mean diagonal (module
    docstring)."""
    h = hessian.double().clone()
    diag = h.diagonal()
    dead = diag == 0
    if dead.all():
        raise GPTQError(f"gptq: {name}: every calibration input of this layer is zero (H = 0); GPTQ has nothing "
                        f"to weigh the rounding by: calibrate on data that reaches it, or use rounding='nearest'")
    mean = diag[~dead].mean()
    diag[dead] = mean
    diag += damp * mean
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if info.item() != 0:
        raise GPTQError(f"gptq: {name}: the damped input Hessian is not positive definite (damp={damp}); "
                        f"a larger damp (e.g. {max(10 * damp, DEFAULT_DAMP):g}) or more calibration tokens "
                        f"make it so")
    return factor


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: LinearFormat, *, damp: float = DEFAULT_DAMP,
                  block_size: int = DEFAULT_BLOCK_SIZE, act_order: bool = False, name: str = "layer") -> GPTQWeight:
    """GPTQ-round ``weight`` [N, K] to ``fmt``'s codes under the input Hessian ``hessian`` [K, K]
    (``input_hessian``; module docstring for the algorithm, the grids, damping and ``act_order``).

    Runs on ``weight``'s device; ``name`` labels errors: a non-finite weight or H, an H of the wrong
    shape, inputs that are all zero, or an H that damping does not make positive definite.
    """
    _check(weight, hessian, damp, block_size, name)
    n, k = weight.shape
    w = weight.detach().double().clone()
    h = hessian.to(device=w.device, dtype=torch.float64)
    grid = _Grid(weight.detach().float(), fmt, act_order)
    order = (torch.argsort(h.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(k, device=w.device))
    w, h = w[:, order], h[order][:, order]
    u = _inverse_cholesky(h, damp, name)
    if grid.lazy:  # a K group never spans two blocks, so its range sees every update made before it
        block_size = max(1, block_size // grid.group) * grid.group
    codes = torch.empty(n, k, dtype=torch.float32, device=w.device)
    dequantized = torch.empty_like(codes)
    for start in range(0, k, block_size):
        stop = min(start + block_size, k)
        block = w[:, start:stop].clone()
        errors = torch.empty_like(block)
        u_block = u[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            feature = int(order[column])
            if grid.lazy and feature % grid.group == 0:
                grid.start_group(block[:, i:i + grid.group].float(), feature // grid.group)
            q, d = grid.quantize(block[:, i].float(), feature)
            codes[:, column], dequantized[:, column] = q, d
            err = (block[:, i] - d.double()) / u_block[i, i]
            block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    inverse = torch.argsort(order)
    stored_codes, scale, zero = grid.stored(codes[:, inverse], n)
    return GPTQWeight(stored_codes, scale, zero, dequantized[:, inverse])


__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_DAMP", "GPTQError", "GPTQWeight", "gptq_quantize", "input_hessian",
           "reconstruction_error"]
