"""Models with a known Hessian: a quadratic form and least squares (H = 2 X^T X / n)."""

from __future__ import annotations

import torch
from torch import nn

SEED = 0


class Quadratic(nn.Module):
    """L(W) = 1/2 vec(W)^T A vec(W) + b^T vec(W) over the weights of ``a`` and ``b`` jointly: the Hessian is A,
    its diagonal blocks A[:n_a, :n_a] (module ``a``) and A[n_a:, n_a:] (module ``b``)."""

    def __init__(self, matrix: torch.Tensor, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(SEED)
        self.a = nn.Linear(shape_a[1], shape_a[0], bias=False)
        self.b = nn.Linear(shape_b[1], shape_b[0], bias=False)
        for layer in (self.a, self.b):
            layer.weight.data = torch.randn(layer.weight.shape, generator=g)
        self.register_buffer("matrix", matrix)
        self.register_buffer("linear", torch.randn(matrix.shape[0], generator=g))

    @property
    def split(self) -> int:
        return self.a.weight.numel()

    def loss(self) -> torch.Tensor:
        w = torch.cat([self.a.weight.flatten(), self.b.weight.flatten()])
        return 0.5 * w @ self.matrix @ w + self.linear @ w


def quadratic_loss(model: Quadratic, batch: dict) -> torch.Tensor:
    return model.loss()


def spd_matrix(n: int, top_gap: float = 1.0) -> torch.Tensor:
    """A random symmetric positive definite matrix (float32) with eigenvalues in (0, 1] plus a top eigenvalue
    ``1 + top_gap``, so power iteration converges quickly on it."""
    g = torch.Generator().manual_seed(SEED)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.rand(n, generator=g, dtype=torch.float64)
    eigenvalues[0] = 1 + top_gap
    return ((q * eigenvalues) @ q.T).float()


def least_squares(n: int = 96, d: int = 10, batches: int = 3):
    """(model, batches, loss_fn, X): y_hat = x w^T with w [1, d]; the loss, the mean over equal batches of
    their mean squared error, is (1/n) ||X w^T - y||^2, so H = 2 X^T X / n."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
    y = torch.randn(n, 1, generator=g)
    model = nn.Sequential(nn.Linear(d, 1, bias=False))
    size = n // batches
    data = [{"x": x[i * size:(i + 1) * size], "y": y[i * size:(i + 1) * size]} for i in range(batches)]

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        return (m(batch["x"]) - batch["y"]).pow(2).mean()

    return model, data, loss_fn, x[: size * batches]
