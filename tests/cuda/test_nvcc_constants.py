"""csrc/common/constants.h against the Python package it mirrors.

The C++ and CUDA kernels state each shared number once, in that header, beside the Python constant it
copies. tests/cuda/constants_check.cu, built with nvcc (so the header goes through its host and device
passes), prints them and what dispatch_bits does with every width from 0 to 9; here they are compared with
qbert.quant.int8, qbert.quant.packing and qbert.ops.w4a8_linear. The CPU extension build compiles the
same header with the host compiler.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qbert.ops.w4a8_linear import W4A8_BITS, W4A8_MAX_GROUP_K
from qbert.quant import packing
from qbert.quant.int8 import INT8_GEMM_MAX_K, INT8_QMAX
from tests.cuda import _nvcc

pytestmark = pytest.mark.skipif(_nvcc.NVCC is None, reason="nvcc not found (PATH, CUDA_HOME)")

SOURCE = Path(__file__).with_name("constants_check.cu")
PROBED_BITS = range(10)  # constants_check.cu's 0 .. kMaxProbedBits
UNKNOWN = -1             # what its on_unknown returns
SLICE_WIDTHS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> dict[str, list[int]]:
    """NAME -> the values constants_check prints for it."""
    exe = tmp_path_factory.mktemp("nvcc_constants") / "constants_check"
    _nvcc.run([_nvcc.NVCC, f"-arch={_nvcc.ARCHS[0]}", *_nvcc.NVCC_FLAGS, f"-I{_nvcc.CSRC}", str(SOURCE), "-o",
               str(exe)])
    lines = _nvcc.run([str(exe)]).stdout.splitlines()
    return {name: [int(v) for v in values] for name, *values in map(str.split, lines)}


def test_int8_constants(printed):
    assert printed["INT8_QMAX"] == [INT8_QMAX]
    assert printed["INT8_GEMM_MAX_K"] == [INT8_GEMM_MAX_K]


def test_packing_constants(printed):
    assert printed["PACK_CHUNK"] == [packing.PACK_CHUNK]
    assert printed["BYTES_PER_WORD"] == [packing.BYTES_PER_WORD]
    assert printed["QUADS_PER_CHUNK"] == [packing.PACK_CHUNK // packing.BYTES_PER_WORD]
    assert printed["BYTE_MASK"] == [packing.byte_mask(w) for w in SLICE_WIDTHS]


def test_w4a8_group_limit(printed):
    assert printed["W4A8_MAX_GROUP_K"] == [W4A8_MAX_GROUP_K]


@pytest.mark.parametrize(("name", "widths"), [("BITS_CHOICES", packing.BITS_CHOICES), ("W4A8_BITS", W4A8_BITS)])
def test_bit_widths_and_dispatch(printed, name, widths):
    assert printed[name] == list(widths)
    assert printed[f"{name}_MAX"] == [max(widths)]
    # dispatch_bits runs f for exactly the widths of the set and on_unknown for every other one, whether
    # they return a value (the CUDA launchers) or nothing (the CPU kernels).
    assert printed[f"{name}_DISPATCH"] == [b if b in widths else UNKNOWN for b in PROBED_BITS]
    assert printed[f"{name}_VOID_DISPATCH"] == [sum(widths), len(PROBED_BITS) - len(widths)]
