"""Block-sparse attention layouts: builders, the layout cache, CSR form, and ``sparsify_attention``.

FlexAttention conversions live in ``qbert.sparse.flex`` (imported on demand: it imports FlexAttention), the
Hugging Face attention implementation ``"qbert_block_sparse"`` in ``qbert.sparse.attention`` (imported by
``sparsify_attention`` when it runs: it imports transformers). Importing this package does not import
transformers.
"""

from qbert.sparse.builders import (
    BUILDERS,
    bigbird,
    custom,
    dense,
    fixed,
    longformer,
    num_blocks,
    per_head,
    sliding_window,
    variable,
)
from qbert.sparse.cache import LayoutSpec, cache_info, cached_layout, clear_cache
from qbert.sparse.csr import from_csr, to_csr
from qbert.sparse.layout import BLOCK_SIZES, BlockLayout
from qbert.sparse.sparsify import SparsifySummary, restore_attention, sparsify_attention

__all__ = ["BLOCK_SIZES", "BUILDERS", "BlockLayout", "LayoutSpec", "SparsifySummary", "bigbird", "cache_info",
           "cached_layout", "clear_cache", "custom", "dense", "fixed", "from_csr", "longformer", "num_blocks",
           "per_head", "restore_attention", "sliding_window", "sparsify_attention", "to_csr", "variable"]
