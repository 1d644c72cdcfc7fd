"""One op, several backends: the priority table every qbert op dispatches through.

An op module declares its table once, at its end, with the reference first and then its faster backends
(the order ``qbert info`` lists them in):

    _OP = op(NAME, reference=int8_gemm_reference,
             cpu=Row(kernel="int8_gemm_cpu"),             # calls torch.ops.qbert.int8_gemm_cpu(*args)
             triton=Row(_triton),                         # a function; it imports qbert.kernels lazily
             cuda=Row(kernel="int8_gemm_cuda"))

The reference is a plain function, the specification: it runs every input the op's checks accept. A
``Row`` declares one faster backend:

- ``fn``: the implementation, called with the op's dispatch arguments. A row without one calls its
  ``kernel`` with the same arguments (no hand-written forwarder).
- ``kernel``: the ``torch.ops.qbert`` op, or tuple of ops, of qbert._C the row calls. Every cpu and cuda
  row names them; ``qbert info`` checks that this build registered them.
- ``dtypes``: the dtypes of the first tensor argument the row runs (None, the default: every dtype the
  op's checks accept).
- ``bf16_dot``: the row's Triton kernels feed bfloat16 operands to ``tl.dot``, which the Triton
  interpreter computes wrongly, so the row refuses bfloat16 inputs there (triton rows only).
- ``min_capability``: the least CUDA compute capability its kernels need (a cuda row: at least, and by
  default, ``_cuda.MIN_CAPABILITY``).
- ``limits``: any other limit of the kernels: a function of the dispatch arguments that returns the
  reasons it refuses them (a row held in one program's registers, int32 offsets).

From the declaration the registry derives why a row refuses given inputs (xformers' habit), in this
order: the backend is unavailable in this process (no extension, a build without CUDA, no triton); the
tensors are on a device the backend does not run on; then ``Row.supports``: a dtype the row does not
declare, bfloat16 under the Triton interpreter (``bf16_dot``), a GPU older than ``min_capability``, a
build with no machine code for the GPU (rows that call qbert._C), and ``limits``. ``Op.reasons(backend,
*args)`` lists them; an empty list means the row runs these inputs.

Dispatch runs the first row, in backend priority order (``BACKENDS``), with no reasons. Falling back to
``reference`` for CUDA tensors warns and names every faster backend with its reasons; ``QBERT_STRICT=1``
turns that warning into an error. ``QBERT_BACKEND=<name>`` or ``with qbert.use_backend(name):`` forces one
backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch

from qbert.ops import _cuda

# Highest priority first.
BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
# Op.rows lists the specification first, then the faster backends: reference, cpu, triton, cuda.
_ROW_ORDER = tuple(reversed(BACKENDS))
INTERPRETER_BF16_DOT = "the Triton interpreter computes bf16 tl.dot wrongly"

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

def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor argument: its device and dtype are those a row's declaration is checked against
    (the op entry points check that the devices agree, and which dtypes go together)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def device_of(args: tuple, kwargs: dict) -> str:
    """The device type of the first tensor argument ("cpu" if there is none)."""
    tensor = first_tensor(args, kwargs)
    return "cpu" if tensor is None else tensor.device.type


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


# ---- rows and ops ----------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Row:
    """What one backend of an op runs, declared (see the module docstring)."""

    fn: Callable[..., Any] | None = None
    _: KW_ONLY
    kernel: str | tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] | None = None
    bf16_dot: bool = False
    min_capability: tuple[int, int] | None = None
    limits: Callable[..., list[str]] | None = None

    def __post_init__(self) -> None:
        if self.fn is None and not isinstance(self.kernel, str):
            raise ValueError("Row: a row without fn calls its kernel with the op's arguments, so it names "
                             f"exactly one (kernel='<op>_<backend>'), got kernel={self.kernel!r}")
        if self.dtypes is not None and not self.dtypes:
            raise ValueError("Row: dtypes must name at least one dtype (None: every dtype the op accepts)")

    @property
    def kernels(self) -> tuple[str, ...]:
        """The ``torch.ops.qbert`` ops this row calls (registered when qbert._C is loaded)."""
        return (self.kernel,) if isinstance(self.kernel, str) else tuple(self.kernel)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is not None:
            return self.fn(*args, **kwargs)
        return getattr(torch.ops.qbert, self.kernel)(*args, **kwargs)

    def supports(self, *args: Any, **kwargs: Any) -> list[str]:
        """Why this row refuses these inputs, from its declaration and ``limits`` (empty if it runs them).
        Whether its backend is available and runs on the inputs' device is the registry's question."""
        tensor = first_tensor(args, kwargs)
        reasons = [] if tensor is None else self._declared_reasons(tensor)
        if self.limits is not None:
            reasons += self.limits(*args, **kwargs)
        return reasons

    def _declared_reasons(self, x: torch.Tensor) -> list[str]:
        reasons = []
        if self.dtypes is not None and x.dtype not in self.dtypes:
            reasons.append(f"{_dtype_name(x.dtype)} inputs are not among its declared dtypes "
                           f"({', '.join(map(_dtype_name, self.dtypes))})")
        if self.bf16_dot and x.dtype == torch.bfloat16 and x.device.type == "cpu" and triton_interpreter():
            reasons.append(INTERPRETER_BF16_DOT)
        if x.device.type == "cuda":
            too_old = [] if self.min_capability is None else _cuda.capability_reasons(x.device, self.min_capability)
            # Past the floor: machine code for the device must be in the build (a rebuild can add it).
            reasons += too_old or (_cuda.build_reasons(x.device) if self.kernels else [])
        return reasons


def _declare(op_name: str, backend: str, row: Row) -> Row:
    """``row`` as backend ``backend`` of op ``op_name``, checked against what that backend can declare."""
    _check_name(backend, op_name)
    if backend in ("cpu", "cuda") and not row.kernels:
        raise ValueError(f"{op_name}: the {backend} row must name the torch.ops.qbert kernels it calls (kernel=...)")
    if backend == "triton" and row.kernels:
        raise ValueError(f"{op_name}: a triton row calls no qbert._C kernel, got kernel={row.kernel!r}")
    if row.bf16_dot and backend != "triton":
        raise ValueError(f"{op_name}: bf16_dot is a rule of the Triton interpreter; the {backend} row cannot "
                         "declare it")
    if backend == "cpu" and row.min_capability is not None:
        raise ValueError(f"{op_name}: the cpu row never runs CUDA tensors, so it declares no min_capability")
    if backend == "cuda":
        if row.min_capability is None:
            return dataclasses.replace(row, min_capability=_cuda.MIN_CAPABILITY)
        if row.min_capability < _cuda.MIN_CAPABILITY:
            raise ValueError(f"{op_name}: every cuda row needs compute capability {_cuda.MIN_CAPABILITY} or "
                             f"newer (the floor of csrc/cuda), got min_capability={row.min_capability}")
    return row


class Op:
    """The dispatch table of one op: its reference and the rows of its faster backends."""

    def __init__(self, name: str, reference: Callable[..., Any], **rows: Row) -> None:
        self.name = name
        declared = {"reference": Row(reference), **{b: _declare(name, b, row) for b, row in rows.items()}}
        self.rows: dict[str, Row] = {b: declared[b] for b in _ROW_ORDER if b in declared}

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
        return self.rows[self.select(*args, **kwargs)](*args, **kwargs)


OPS: dict[str, Op] = {}


def op(name: str, reference: Callable[..., Any], **rows: Row) -> Op:
    """Declare op ``name``'s dispatch table: its reference and one ``Row`` per faster backend, by backend
    name (see the module docstring). Each op is declared once."""
    if name in OPS:
        raise ValueError(f"{name}: the op is registered twice")
    OPS[name] = Op(name, reference, **rows)
    return OPS[name]
