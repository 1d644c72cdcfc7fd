"""``import qbert.sparse`` stays light: no transformers, no Triton, no FlexAttention until asked for."""

from __future__ import annotations

import subprocess
import sys


def test_importing_qbert_sparse_imports_neither_transformers_nor_triton():
    code = ("import sys, qbert, qbert.sparse; "
            "print(sorted(m for m in ('transformers', 'triton', 'qbert.sparse.flex', 'qbert.sparse.attention') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
