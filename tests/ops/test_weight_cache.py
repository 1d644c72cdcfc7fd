"""The packed-weight cache of the AMX kernels (csrc/cpu/weight_cache.h): int8_linear_cpu on a cached weight
stays exact against the reference when the weight changes in place, when two weights share a storage, and
after the cache is cleared; inference tensors run unpacked. Skipped where the CPU has no AMX-INT8."""

from __future__ import annotations

import pytest
import torch

from qbert import _ext
from qbert.ops.int8_linear import int8_linear_reference
from tests._backends import forced_cpu_isa

pytestmark = pytest.mark.skipif(bool(_ext.load_error()), reason="; ".join(_ext.load_error()) or "loaded")

M, N, K = 40, 48, 128  # the AMX shapes: N a multiple of 16, K of 64; M past a 32-row block


@pytest.fixture(autouse=True)
def amx():
    with forced_cpu_isa("amx_int8"):
        _ext.module().clear_weight_cache()
        yield
        _ext.module().clear_weight_cache()


def _operands(seed: int, rows: int = N):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    w_q = torch.randint(-128, 128, (rows, K), dtype=torch.int8, generator=g)
    x_scale = torch.rand(M, generator=g) / 127
    w_scale = torch.rand(rows, generator=g) / 127
    bias = torch.randn(rows, generator=g)
    return x_q, x_scale, w_q, w_scale, bias


def _check(x_q, x_scale, w_q, w_scale, bias):
    out = torch.ops.qbert.int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    torch.testing.assert_close(out, int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, torch.float32),
                               rtol=0, atol=0)


def test_repeated_calls_use_one_packed_copy():
    args = _operands(0)
    for _ in range(3):
        _check(*args)
    assert _ext.module().clear_weight_cache() == 1


def test_in_place_change_repacks():
    x_q, x_scale, w_q, w_scale, bias = _operands(1)
    _check(x_q, x_scale, w_q, w_scale, bias)
    w_q.copy_(torch.flip(w_q, dims=(0,)))  # bumps the version: the next call packs anew
    _check(x_q, x_scale, w_q, w_scale, bias)
    w_q[0] = -128
    _check(x_q, x_scale, w_q, w_scale, bias)
    assert _ext.module().clear_weight_cache() == 1  # the stale copies were replaced, not kept


def test_weights_sharing_a_storage():
    """Two row ranges of one tensor: same storage, other offsets, each its own entry."""
    x_q, x_scale, w_all, w_scale, bias = _operands(2, rows=2 * N)
    top, bottom = w_all[:N], w_all[N:]
    _check(x_q, x_scale, top, w_scale[:N], bias[:N])
    _check(x_q, x_scale, bottom, w_scale[N:], bias[N:])
    assert _ext.module().clear_weight_cache() == 2


def test_freed_weight_leaves_the_cache():
    x_q, x_scale, w_q, w_scale, bias = _operands(3)
    _check(x_q, x_scale, w_q, w_scale, bias)
    del w_q
    _check(*_operands(4))  # packing another weight drops the expired entry
    assert _ext.module().clear_weight_cache() == 1


def test_write_past_the_version_counter_needs_a_clear():
    """A write through .data is invisible to the version counter: the cache answers with the old packing
    until it is cleared, as weight_cache.h documents."""
    x_q, x_scale, w_q, w_scale, bias = _operands(5)
    _check(x_q, x_scale, w_q, w_scale, bias)
    w_q.data.copy_(torch.flip(w_q, dims=(1,)))
    stale = torch.ops.qbert.int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    assert not torch.equal(stale, int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, torch.float32))
    _ext.module().clear_weight_cache()
    _check(x_q, x_scale, w_q, w_scale, bias)


def test_inference_tensors_run_unpacked():
    with torch.inference_mode():
        args = _operands(6)
        _check(*args)
    assert _ext.module().clear_weight_cache() == 0
