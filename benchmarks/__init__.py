"""Benchmarks, installed as qbert.benchmarks and run by `qbert bench`.

``SUITES`` maps each suite name to its module (imported only when the suite runs); every module has
``run(smoke, out_dir, threads) -> BenchOutput`` and ``main(argv)``.
"""

import importlib
from types import ModuleType

SUITES = {
    "int8_linear": "bench_int8_linear",
    "int8_gemm": "bench_int8_gemm",
    "lowbit_linear": "bench_lowbit_linear",
    "block_sparse": "bench_block_sparse",
    "e2e": "bench_e2e",
    "profile": "profile_forward",
    "contention": "contention",
}


def suite_module(name: str) -> ModuleType:
    return importlib.import_module(f"qbert.benchmarks.{SUITES[name]}")
