"""One op, several backends: the priority table every qbert op dispatches through.

Each op registers rows ``(backend, fn, supports)``. ``supports(*args, **kwargs)`` returns the reasons
the row refuses these inputs (an empty list means it can run them). Dispatch runs the first row, in
backend priority order, with no reasons. Falling back to ``reference`` for CUDA tensors warns and
names every faster backend with its reasons; ``QBERT_STRICT=1`` turns that warning into an error.
``QBERT_BACKEND=<name>`` or ``with qbert.use_backend(name):`` forces one backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Highest priority first.
BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("qbert_backend", default=None)


class BackendError(RuntimeError):
    """No backend can run an op on the given inputs, or a forced backend refuses them."""


class FallbackWarning(UserWarning):
    """An op on CUDA tensors ran on the pure-PyTorch reference."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` (innermost) or else ``QBERT_BACKEND``, or None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("QBERT_BACKEND", "").strip()
    return _check_name(env, "QBERT_BACKEND") if env else None


def strict() -> bool:
    return os.environ.get("QBERT_STRICT", "0") == "1"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every qbert op inside the block onto one backend (an unknown name is an error)."""
    token = _forced.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


# ---- backend availability: why a backend cannot run at all in this process -------------------------

def _extension_reasons() -> list[str]:
    from qbert import _ext

    return _ext.load_error()


def _cuda_reasons() -> list[str]:
    reasons = _extension_reasons()
    if reasons:
        return reasons
    from qbert import _ext

    if not _ext.build_info()["with_cuda"]:
        return ["qbert._C was built without CUDA sources (see `qbert info`; rebuild with QBERT_FORCE_CUDA=1)"]
    return []


def _triton_reasons() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    return []


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _no_reasons() -> list[str]:
    return []


_AVAILABILITY: dict[str, Callable[[], list[str]]] = {
    "cuda": _cuda_reasons,
    "triton": _triton_reasons,
    "cpu": _extension_reasons,
    "reference": _no_reasons,
}


@functools.cache
def _unavailable(backend: str) -> tuple[str, ...]:
    return tuple(_AVAILABILITY[backend]())


def backend_unavailable(backend: str) -> list[str]:
    """Reasons ``backend`` cannot run anything in this process (empty if it can); fixed per process."""
    return list(_unavailable(backend))


# ---- device rules ----------------------------------------------------------------------------------

def device_of(args: tuple, kwargs: dict) -> str:
    """The device type of the first tensor argument (the op entry points check that all agree)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def device_reasons(backend: str, device: str) -> list[str]:
    """Why ``backend`` cannot run on ``device`` tensors.

    cuda needs CUDA tensors; cpu needs CPU tensors; triton needs CUDA tensors, or CPU tensors when it is
    forced and ``TRITON_INTERPRET=1`` (the interpreter is for tests, never an automatic choice).
    """
    if backend == "cuda" and device != "cuda":
        return [f"tensors are on {device}, not cuda"]
    if backend == "cpu" and device != "cpu":
        return [f"tensors are on {device}, not cpu"]
    if backend == "triton" and device != "cuda":
        if device != "cpu" or not triton_interpreter():
            return [f"tensors are on {device}; triton runs on cpu only under TRITON_INTERPRET=1"]
        if forced_backend() != "triton":
            return ["the triton interpreter runs only when forced (use_backend('triton'))"]
    return []


# ---- ops -------------------------------------------------------------------------------------------

def _accepts_all(*args: Any, **kwargs: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class Row:
    backend: str
    fn: Callable[..., Any]
    supports: Callable[..., list[str]]
    kernels: tuple[str, ...] = ()  # the torch.ops.qbert ops a cpu / cuda row calls (registered by qbert._C)


@dataclass
class Op:
    name: str
    rows: dict[str, Row] = field(default_factory=dict)

    def register(self, backend: str, fn: Callable[..., Any],
                 supports: Callable[..., list[str]] = _accepts_all, kernels: tuple[str, ...] | None = None) -> None:
        """Add a backend row. ``supports`` states the op-specific limits of ``fn``; the registry itself
        checks that the backend is available in this process and runs on the inputs' device. ``kernels``:
        the C++ ops a cpu / cuda row calls, by default ``<op>_<backend>`` (``qbert info`` checks that this
        build registered them)."""
        _check_name(backend, f"{self.name}.register")
        if backend in self.rows:
            raise ValueError(f"{self.name}: backend {backend!r} is registered twice")
        if kernels is None:
            kernels = (f"{self.name}_{backend}",) if backend in ("cpu", "cuda") else ()
        self.rows[backend] = Row(backend, fn, supports, kernels)

    def _reasons(self, backend: str, device: str, args: tuple, kwargs: dict) -> list[str]:
        row = self.rows.get(backend)
        if row is None:
            return [f"{self.name} has no {backend} implementation"]
        return backend_unavailable(backend) or device_reasons(backend, device) or row.supports(*args, **kwargs)

    def reasons(self, backend: str, *args: Any, **kwargs: Any) -> list[str]:
        """Why ``backend`` would refuse these inputs (empty if it would run them)."""
        return self._reasons(backend, device_of(args, kwargs), args, kwargs)

    def select(self, *args: Any, **kwargs: Any) -> str:
        """The backend dispatch would run for these inputs."""
        device = device_of(args, kwargs)
        forced = forced_backend()
        if forced is not None:
            reasons = self._reasons(forced, device, args, kwargs)
            if reasons:
                raise BackendError(f"{self.name}: forced backend {forced!r} cannot run: " + "; ".join(reasons))
            return forced
        refused: dict[str, list[str]] = {}
        for backend in BACKENDS:
            reasons = self._reasons(backend, device, args, kwargs)
            if not reasons:
                break
            refused[backend] = reasons
        else:
            raise BackendError(f"{self.name}: no backend can run these inputs: {refused}")
        if backend == "reference" and device == "cuda":
            detail = "; ".join(f"{b}: {', '.join(r)}" for b, r in refused.items())
            message = f"{self.name} falls back to the PyTorch reference on CUDA tensors ({detail})"
            if strict():
                raise BackendError(message + " [QBERT_STRICT=1]")
            warnings.warn(message, FallbackWarning, stacklevel=3)
        return backend

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.rows[self.select(*args, **kwargs)].fn(*args, **kwargs)


OPS: dict[str, Op] = {}


def op(name: str) -> Op:
    """The dispatch table of op ``name`` (created on first use)."""
    return OPS.setdefault(name, Op(name))
