"""Hessian-vector products restricted to one module's weight block, over a calibration set.

For a loss averaged over calibration batches, L(W) = (1/B) sum_b loss_fn(model, batch_b), and the weight
W_i of module i, the block H_i = d^2 L / dW_i^2 (a [n_i, n_i] matrix, n_i = W_i.numel(), never formed)
acts on a vector v_i of W_i's shape by double backward (Pearlmutter's trick):

    H_i v_i = d/dW_i ( (dL/dW_i) . v_i )

The first gradient is taken with ``create_graph=True``; one forward and first backward per batch serve
every module, then each module's block costs one more backward. ``joint=True`` instead differentiates
the sum over modules once: block i of the result is sum_j H_ij v_j (cross-blocks included), which is what
Hutchinson's estimator may use (E[v_i^T H_ij v_j] = 0 for independent probes, i != j).

Hugging Face attention must run in ``eager`` mode for double backward (the fused SDPA kernels have no
second derivative); ``hessian_mode`` switches it and restores it, together with eval mode (no dropout:
the loss is a deterministic function of the weights) and ``requires_grad`` on the weights studied only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

EAGER = "eager"
Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with ``attn_implementation="eager"`` inside the block and restore the previous one.

    A model without ``config._attn_implementation`` (not a Hugging Face model) is left as it is. A Hugging
    Face model that cannot switch (its ``set_attn_implementation`` leaves the setting unchanged) is an
    error: the fused attention kernels have no double backward.
    """
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if previous is None or previous == EAGER:
        yield model
        return
    model.set_attn_implementation(EAGER)
    try:
        if model.config._attn_implementation != EAGER:
            raise RuntimeError(f"eager_attention: {type(model).__name__} kept attn_implementation="
                               f"{model.config._attn_implementation!r}; Hessian-vector products need 'eager' "
                               f"attention (double backward)")
        yield model
    finally:
        model.set_attn_implementation(previous)


def module_weights(model: nn.Module, module_names: Sequence[str]) -> dict[str, nn.Parameter]:
    """``name -> module.weight`` for each name; unknown names, modules without a float weight and two names
    of one shared weight (list a shared layer once) are errors."""
    if isinstance(module_names, str):
        raise TypeError(f"module_names must be a sequence of names, got the string {module_names!r}")
    modules = dict(model.named_modules(remove_duplicate=False))
    weights: dict[str, nn.Parameter] = {}
    seen: dict[int, str] = {}
    for name in module_names:
        if name not in modules:
            raise ValueError(f"no module {name!r} in {type(model).__name__}")
        weight = getattr(modules[name], "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
            raise ValueError(f"module {name!r} ({type(modules[name]).__name__}) has no float weight parameter")
        if id(weight) in seen:
            raise ValueError(f"modules {seen[id(weight)]!r} and {name!r} share one weight; list it once")
        seen[id(weight)] = name
        weights[name] = weight
    if not weights:
        raise ValueError("module_names is empty")
    return weights


@contextlib.contextmanager
def hessian_mode(model: nn.Module, weights: Iterable[nn.Parameter]) -> Iterator[None]:
    """Eval mode, eager attention and ``requires_grad`` only on ``weights`` inside the block; restored after."""
    wanted = {id(w) for w in weights}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        model.eval()
        with eager_attention(model), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def to_device(batch: Batch, device: torch.device) -> dict:
    """The batch with every tensor moved to ``device`` (other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def hvp(loss: torch.Tensor, params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v for the Hessian of the scalar ``loss`` w.r.t. ``params`` (jointly), one tensor per parameter.

    A parameter the loss does not depend on is an error; one that enters the loss linearly has a zero
    block (its products are zeros).
    """
    grads = first_gradients(loss, params)
    products = torch.autograd.grad(grads, params, grad_outputs=list(vectors), allow_unused=True)
    return [torch.zeros_like(p) if hv is None else hv for p, hv in zip(params, products)]


def first_gradients(loss: torch.Tensor, params: Sequence[torch.Tensor],
                    names: Sequence[str] | None = None) -> tuple[torch.Tensor, ...]:
    """dL/dp with ``create_graph=True`` (for a second derivative); a parameter unused by the loss is an error."""
    if loss.dim() != 0:
        raise ValueError(f"the loss must be a scalar tensor, got shape {list(loss.shape)}")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    for i, g in enumerate(grads):
        if g is None:
            what = f"module {names[i]!r}" if names is not None else f"parameter {i}"
            raise ValueError(f"the loss does not depend on the weight of {what}; drop it from the modules")
    return grads


class BlockHVP:
    """Products with the Hessian blocks H_i of the calibration loss (module docstring), averaged over batches.

    Use inside ``hessian_mode(model, weights.values())``. ``__call__({name: v_i})`` returns
    ``{name: H_i v_i}`` (or ``{name: sum_j H_ij v_j}`` with ``joint=True``) for the names given.
    """

    def __init__(self, model: nn.Module, weights: Mapping[str, nn.Parameter], batches: Iterable[Batch],
                 loss_fn: LossFn, joint: bool = False) -> None:
        self.model, self.weights, self.loss_fn, self.joint = model, dict(weights), loss_fn, joint
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("the calibration data holds no batches")
        self.device = next(iter(self.weights.values())).device

    def __call__(self, vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(vectors)
        params = [self.weights[n] for n in names]
        out = {n: torch.zeros_like(self.weights[n], dtype=torch.float32) for n in names}
        for batch in self.batches:
            loss = self.loss_fn(self.model, to_device(batch, self.device))
            grads = first_gradients(loss, params, names)
            if self.joint:
                products = torch.autograd.grad(grads, params, grad_outputs=[vectors[n] for n in names],
                                               allow_unused=True)
            else:
                products = [torch.autograd.grad(g, p, grad_outputs=vectors[n], retain_graph=True,
                                                allow_unused=True)[0]
                            for n, g, p in zip(names, grads, params)]
            for n, hv in zip(names, products):
                if hv is not None:  # None: the gradient does not depend on the weight (zero block)
                    out[n] += hv.detach().float()
        return {n: hv / len(self.batches) for n, hv in out.items()}


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> accumulated in float64."""
    return torch.dot(a.flatten().double(), b.flatten().double()).item()
