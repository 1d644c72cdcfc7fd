"""Loads the compiled extension qbert._C on first use (never at ``import qbert``)."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("qbert._C"), ""
    except ImportError as exc:  # the build failed or was skipped; the reason is reported, never hidden
        return None, f"qbert._C could not be imported ({exc}); reinstall with `pip install --no-build-isolation -e .`"


def load_error() -> list[str]:
    """Empty if qbert._C is loaded, else the reason it is not."""
    module, error = _load()
    return [] if module is not None else [error]


def module() -> ModuleType:
    loaded, error = _load()
    if loaded is None:
        raise ImportError(error)
    return loaded


@functools.cache
def build_info() -> dict:
    """What this build of qbert._C contains (cached: it cannot change while the process runs)."""
    return dict(module().build_info())
