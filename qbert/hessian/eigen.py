"""Top Hessian eigenvalue of each module's weight block by power iteration (Q-BERT).

For each module i, with the block H_i of the calibration loss (``qbert.hessian.hvp``) and a seeded
Gaussian start v_0 (unit norm):

    w_k = H_i v_k,   lambda_k = v_k^T w_k   (Rayleigh quotient),   v_{k+1} = w_k / ||w_k||

lambda_k converges to the eigenvalue of largest magnitude (with its sign). Iteration stops when the
residual is small: ||w_k - lambda_k v_k|| <= rel_tol * |lambda_k|. For a symmetric H_i some eigenvalue then
lies within rel_tol * |lambda_k| of lambda_k (and the Rayleigh quotient's own error is at most
residual^2 / spectral gap), so the stop bounds the relative error itself, unlike a stop on the change of
lambda_k, which can be far smaller than the error when |lambda_2| / |lambda_1| is close to 1. A module not
there after ``max_iter`` products warns with its last relative residual. A zero block gives 0. All modules advance together, so each step costs one forward + backward per batch plus one double
backward per module still iterating.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qbert.hessian.hvp import Batch, BlockHVP, LossFn, flat_dot, hessian_mode, module_weights


class PowerIterationWarning(UserWarning):
    """Power iteration stopped at ``max_iter`` before reaching ``rel_tol``."""


def _unit_start(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU from one generator, so the start does not depend on the device.
    v = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    return (v / v.norm()).to(weight.device)


def top_eigenvalues(model: nn.Module, module_names: Sequence[str], batches: Iterable[Batch], loss_fn: LossFn, *,
                    max_iter: int = 100, rel_tol: float = 1e-3, seed: int = 0,
                    progress: bool = True) -> dict[str, float]:
    """``{name: lambda_max(H_i)}``: power iteration on each module's weight block (module docstring).

    batches: the calibration batches (dicts of tensors, moved to the weights' device); the loss is their
        mean ``(1/B) sum_b loss_fn(model, batch_b)``. loss_fn(model, batch) returns a scalar tensor.
    max_iter: Hessian-vector products per module at most; rel_tol: the relative residual at which a module
        stops (module docstring); seed: the start
        vectors (one generator, drawn in ``module_names`` order), so a call is reproducible.
    """
    if max_iter < 1 or rel_tol <= 0:
        raise ValueError(f"top_eigenvalues: need max_iter >= 1 and rel_tol > 0, got {max_iter}, {rel_tol}")
    weights = module_weights(model, module_names)
    generator = torch.Generator().manual_seed(seed)
    vectors = {name: _unit_start(w, generator) for name, w in weights.items()}
    eigen: dict[str, float] = {}
    residual: dict[str, float] = {}
    active = dict(vectors)
    with hessian_mode(model, weights.values()):
        products = BlockHVP(model, weights, batches, loss_fn)
        bar = tqdm(range(max_iter), desc="power iteration", unit="step", disable=not progress)
        for _ in bar:
            for name, hv in products(active).items():
                value = flat_dot(active[name], hv)
                eigen[name] = value
                norm = hv.norm()
                if norm == 0:  # a zero block
                    del active[name]
                    continue
                residual[name] = (hv - value * active[name]).norm().item() / abs(value) if value else math.inf
                if residual[name] <= rel_tol:
                    del active[name]
                else:
                    active[name] = hv / norm
            bar.set_postfix(converged=f"{len(weights) - len(active)}/{len(weights)}")
            if not active:
                break
        bar.close()
    for name in active:
        warnings.warn(f"top_eigenvalues: {name!r} did not converge in {max_iter} iterations (relative "
                      f"residual {residual[name]:.2e} > rel_tol {rel_tol:.1e})", PowerIterationWarning, stacklevel=2)
    return {name: eigen[name] for name in weights}
