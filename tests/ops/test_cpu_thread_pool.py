"""qbert's CPU thread pool (csrc/cpu/parallel.h): the kernels' results do not depend on who runs them
(concurrent callers, more threads than cores, a forked child), and its idle workers sleep instead of
spinning (the reason it exists: OpenMP's waiting threads spin for milliseconds)."""

import multiprocessing
import os
import threading
import time

import pytest
import torch

from qbert import _ext
from qbert.ops.int8_gemm import int8_gemm_reference
from tests._backends import int8_codes

pytestmark = pytest.mark.skipif(bool(_ext.load_error()), reason="; ".join(_ext.load_error()) or "loaded")

# BERT-base's projection at batch 1: enough panels for every thread.
M, N, K = 128, 768, 768
CALLERS = 4
CALLS_PER_CALLER = 8
# CPU time the whole process may use while it sleeps after a kernel: at 2 threads the pool's one worker
# spins at most 1 ms (kSpinIdle, csrc/cpu/parallel.cpp) before it sleeps; GNU OpenMP's spin for ~10 ms
# after each parallel region under its default policy (measured on the CI machine: 5-10 ms).
IDLE_CPU_BUDGET_S = 3e-3
IDLE_S = 0.2
# Long enough for OpenMP's workers, woken by the aten ops that made the operands, to stop spinning.
SETTLE_S = 0.2
FORK_TIMEOUT_S = 60


def _operands(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return int8_codes(M, K, generator=g), int8_codes(N, K, generator=g)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    _ext.module().set_serial_torch(False)
    torch.set_num_threads(threads)


def _pool(threads: int) -> None:
    """Kernels on this thread run on qbert's pool at ``threads`` threads (torch's ops serial)."""
    torch.set_num_threads(threads)
    _ext.module().set_serial_torch(True)


def test_concurrent_callers_each_get_the_reference(restore_threads):
    # One caller holds the pool at a time; the others run the same chunks themselves. All exact.
    cases = [_operands(seed) for seed in range(CALLERS)]
    expected = [int8_gemm_reference(a, b) for a, b in cases]
    failures: list[str] = []

    def caller(i: int) -> None:
        _pool(2)  # the setting is per thread
        a, b = cases[i]
        for _ in range(CALLS_PER_CALLER):
            if not torch.equal(torch.ops.qbert.int8_gemm_cpu(a, b), expected[i]):
                failures.append(f"caller {i}")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_more_threads_than_cores(restore_threads):
    a, b = _operands(seed=7)
    _pool(2 * (os.cpu_count() or 1) + 1)
    torch.testing.assert_close(torch.ops.qbert.int8_gemm_cpu(a, b), int8_gemm_reference(a, b), rtol=0, atol=0)


def _gemm_in_child(a: torch.Tensor, b: torch.Tensor):
    # Only qbert's kernel runs in the child: GNU OpenMP itself hangs in a forked child once the parent has
    # used it, so the parent checks the result.
    return torch.ops.qbert.int8_gemm_cpu(a, b).numpy()


def test_forked_child_runs_kernels(restore_threads):
    # The parent's workers do not exist in a forked child: the child makes its own pool.
    a, b = _operands(seed=3)
    _pool(2)
    expected = torch.ops.qbert.int8_gemm_cpu(a, b)  # the parent's pool has its workers now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_gemm_in_child, (a, b)).get(timeout=FORK_TIMEOUT_S)
    torch.testing.assert_close(torch.from_numpy(got), int8_gemm_reference(a, b), rtol=0, atol=0)
    torch.testing.assert_close(expected, int8_gemm_reference(a, b), rtol=0, atol=0)


def test_idle_workers_sleep(restore_threads):
    a, b = _operands(seed=11)
    _pool(2)
    torch.ops.qbert.int8_gemm_cpu(a, b)  # the pool's workers exist from here
    time.sleep(SETTLE_S)
    torch.ops.qbert.int8_gemm_cpu(a, b)
    start = time.process_time()
    time.sleep(IDLE_S)
    burnt = time.process_time() - start
    assert burnt < IDLE_CPU_BUDGET_S, f"the process used {burnt * 1e3:.2f} ms of CPU while idle"
