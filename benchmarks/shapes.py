"""The linear-layer shapes of real BERT models, and the token counts M they are benchmarked at.

A layer is ``y[M, N] = x[M, K] @ W[N, K].T`` with M = batch * sequence tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearShape:
    model: str
    layer: str
    n: int  # output features
    k: int  # input features


def _bert_layers(model: str, hidden: int, intermediate: int) -> tuple[LinearShape, ...]:
    heads_qkv = 3  # query, key and value projections fused into one GEMM
    return (
        LinearShape(model, "attn_out", hidden, hidden),  # also each of q, k, v unfused
        LinearShape(model, "qkv", heads_qkv * hidden, hidden),
        LinearShape(model, "ffn_up", intermediate, hidden),
        LinearShape(model, "ffn_down", hidden, intermediate),
    )


BERT_BASE_HIDDEN, BERT_BASE_INTERMEDIATE = 768, 3072
BERT_LARGE_HIDDEN, BERT_LARGE_INTERMEDIATE = 1024, 4096

BERT_BASE = _bert_layers("bert-base", BERT_BASE_HIDDEN, BERT_BASE_INTERMEDIATE)
BERT_LARGE = _bert_layers("bert-large", BERT_LARGE_HIDDEN, BERT_LARGE_INTERMEDIATE)
LINEAR_SHAPES = BERT_BASE + BERT_LARGE

# One token (online inference), a small batch, one sequence of 128 / 512, and a large batch.
M_VALUES = (1, 16, 128, 512, 4096)

# The int8_gemm suite's token counts: from one 16-token sentence, where a GEMM only streams its weight, to
# 384 sequences of 128 tokens, where every BERT GEMM is compute bound.
M_SWEEP = (16, 64, 256, 1024, 4096, 16384, 49152)

# The large square GEMM (M = N = K) on which int8 tensor-core kernels are commonly compared.
SQUARE_SIZE = 8192
SQUARE = LinearShape("square", f"{SQUARE_SIZE}^3", SQUARE_SIZE, SQUARE_SIZE)

# --smoke: tiny, with a K that is not a multiple of common tile sizes, in a couple of seconds.
SMOKE_SHAPES = (LinearShape("tiny", "square", 64, 64), LinearShape("tiny", "odd", 96, 40))
SMOKE_M_VALUES = (1, 16)
SMOKE_SQUARE_SIZE = 64
SMOKE_SQUARE = LinearShape("square", f"{SMOKE_SQUARE_SIZE}^3", SMOKE_SQUARE_SIZE, SMOKE_SQUARE_SIZE)
