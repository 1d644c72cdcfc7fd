"""qbert_block_sparse as a Hugging Face attention implementation, through qbert.sparsify_attention.

Tolerance: same math in float32 (the reference backend of qbert.ops.block_sparse_attention against
transformers' eager attention, or against eager attention given the layout as a 4-D mask).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.masking_utils import create_bidirectional_mask

import qbert
from qbert.sparse import BlockLayout, LayoutSpec, bigbird, per_head, restore_attention, sliding_window
from qbert.sparse.attention import (
    ATTENTION_NAME,
    LAYOUT_ATTR,
    BlockSparseAttentionError,
    block_sparse_attention_forward,
    key_padding_mask,
    resolve_layout,
)
from qbert.sparse.sparsify import SparsifySummary
from tests.nn import _tiny_models as tiny

# head_dim 32: the smallest the block-sparse op takes.
HEADS = 2
OVERRIDES = {"num_attention_heads": HEADS}
ATOL = 1e-5
FAMILY_MODELS = ["BertModel", "RobertaModel", "ElectraModel", "DistilBertModel", "AlbertModel",
                 "BertForSequenceClassification"]


def build(class_name: str, family: str | None = None, **overrides) -> torch.nn.Module:
    """A tiny random-init model on transformers' eager attention (the reference)."""
    model = tiny.build(class_name, family, **{**OVERRIDES, **overrides})
    model.set_attn_implementation("eager")
    return model


def run(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask)[0]


def to_additive(allowed: torch.Tensor) -> torch.Tensor:
    """A bool [b, h, s, s] mask (True = attend) as the additive float mask eager attention adds."""
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("class_name", FAMILY_MODELS)
def test_a_dense_layout_reproduces_eager_attention(class_name):
    model = build(class_name)
    inputs = tiny.inputs(class_name)  # the second sequence is padded
    expected = run(model, **inputs)
    qbert.sparsify_attention(model, layout="dense", block_size=16)
    assert model.config._attn_implementation == ATTENTION_NAME
    torch.testing.assert_close(run(model, **inputs), expected, rtol=0, atol=ATOL)
    restore_attention(model)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(run(model, **inputs), expected, rtol=0, atol=ATOL)


def test_minilm_is_a_bert_model():
    model = build("BertModel", "minilm", num_attention_heads=3)  # hidden 96: head_dim 32
    expected = run(model, **tiny.inputs())
    qbert.sparsify_attention(model, "dense", block_size=16)
    torch.testing.assert_close(run(model, **tiny.inputs()), expected, rtol=0, atol=ATOL)


def test_sparsify_records_what_it_did():
    model = build("BertForSequenceClassification")
    qbert.sparsify_attention(model, "bigbird", block_size=32, random_blocks=1)
    summary = model.qbert_sparse_attention
    assert isinstance(summary, SparsifySummary) and summary.family == "bert"
    assert summary.layout == LayoutSpec.of("bigbird", 32, random_blocks=1)
    assert summary.modules == tuple(f"bert.encoder.layer.{i}.attention.self" for i in range(tiny.LAYERS))
    assert summary.previous_implementation == "eager"
    assert all(getattr(model.get_submodule(name), LAYOUT_ATTR) is summary.layout for name in summary.modules)


def test_the_mask_function_keeps_padding_as_a_key_mask():
    """The model builds a [batch, 1, 1, seq] key-padding mask, not a dense [batch, 1, seq, seq] one."""
    model = qbert.sparsify_attention(build("BertModel"), "dense", block_size=16)
    inputs = tiny.inputs()
    embeds = torch.zeros(tiny.BATCH, tiny.SEQ, model.config.hidden_size)
    mask = create_bidirectional_mask(config=model.config, inputs_embeds=embeds,
                                      attention_mask=inputs["attention_mask"])
    assert mask.dtype == torch.bool and mask.shape == (tiny.BATCH, 1, 1, tiny.SEQ)
    assert torch.equal(mask[:, 0, 0], inputs["attention_mask"].bool())
    assert create_bidirectional_mask(config=model.config, inputs_embeds=embeds, attention_mask=None) is None


def long_context_model(layers: int = 2) -> torch.nn.Module:
    """A random-init long-context BERT: 4096 positions, small enough to run on a CPU."""
    config = transformers.BertConfig(vocab_size=tiny.VOCAB, hidden_size=64, num_hidden_layers=layers,
                                     num_attention_heads=HEADS, intermediate_size=128,
                                     max_position_embeddings=4096)
    torch.manual_seed(tiny.SEED)
    model = transformers.BertModel(config).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("seq, layout", [
    (4096, lambda seq: bigbird(seq, 64, random_blocks=2, heads=HEADS)),
    (1000, lambda seq: sliding_window(seq, 64, window=2)),
    (1000, lambda seq: per_head([sliding_window(seq, 32, window=1), bigbird(seq, 32, random_blocks=3)])),
], ids=["bigbird-4096", "sliding-1000", "per_head-1000"])
def test_long_context_matches_masked_eager_attention(seq, layout):
    """The sparsified model equals eager attention given the layout and padding as a 4-D mask."""
    layout = layout(seq)
    model = long_context_model()
    g = torch.Generator().manual_seed(1)
    batch = 2 if seq < 4096 else 1
    input_ids = torch.randint(0, tiny.VOCAB, (batch, seq), generator=g)
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[-1, seq - 300:] = False  # the last sequence ends in 300 padding tokens
    allowed = layout.token_mask(seq)[None] & padding[:, None, None, :]
    expected = run(model, input_ids, to_additive(allowed))
    qbert.sparsify_attention(model, layout)
    out = run(model, input_ids, padding.long())
    # A padding query whose blocks hold only padding keys gets zeros here and the mean of the masked keys in
    # eager attention; no real token reads it (padding keys are masked), so compare the real tokens.
    torch.testing.assert_close(out[padding], expected[padding], rtol=0, atol=ATOL)


def test_layouts_follow_the_sequence_length_through_the_cache():
    model = qbert.sparsify_attention(long_context_model(layers=1), "sliding_window", block_size=32, window=1)
    spec = model.qbert_sparse_attention.layout
    for seq in (40, 64, 100):
        input_ids = torch.randint(0, tiny.VOCAB, (1, seq))
        out = run(model, input_ids)
        assert out.shape == (1, seq, 64)
        assert resolve_layout(spec, seq) is spec.layout(seq) and spec.layout(seq).q_blocks == -(-seq // 32)


def test_a_callable_layout_is_called_with_the_sequence_length():
    seen = []

    def layout_for(seq):
        seen.append(seq)
        return sliding_window(seq, 16, window=0)

    model = qbert.sparsify_attention(build("BertModel"), layout_for)
    run(model, **tiny.inputs())
    assert seen == [tiny.SEQ] * tiny.LAYERS


def test_triton_backend_through_the_model():
    """The model on the triton kernel (CPU: the Triton interpreter) matches eager on a dense layout."""
    model = build("BertModel", num_hidden_layers=1)
    inputs = tiny.inputs()
    expected = run(model, **inputs)
    qbert.sparsify_attention(model, "dense", block_size=16)
    with qbert.use_backend("triton"):
        out = run(model, **inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


# ---- the padding mask ---------------------------------------------------------------------------------

def test_key_padding_mask_accepts_padding_masks_in_every_form():
    keep = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(key_padding_mask(keep.long(), 2, 3), keep)
    assert torch.equal(key_padding_mask(keep[:, None, None, :], 2, 3), keep)
    additive = to_additive(keep[:, None, None, :].expand(2, 1, 3, 3))
    assert torch.equal(key_padding_mask(additive, 2, 3), keep)
    additive[..., 2] = float("-inf")
    assert torch.equal(key_padding_mask(additive, 2, 3), keep)
    assert key_padding_mask(None, 2, 3) is None


@pytest.mark.parametrize("mask, match", [
    (torch.full((2, 1, 1, 3), 0.5), "an attention bias"),
    (torch.eye(3, dtype=torch.bool)[None, None].expand(2, 1, 3, 3), "differs between query rows"),
    (torch.ones(2, 3, 3), r"must be \[batch, seq\] or \[batch, 1, 1 or seq, seq\]"),
    (torch.ones(2, 4, dtype=torch.bool), r"the padding mask is \[2, 4\], expected \[2, 3\]"),
    (torch.ones(2, 1, 1, 3, dtype=torch.int32), "must be bool or float"),
    ("mask", "must be a padding-mask tensor"),
])
def test_key_padding_mask_refuses_other_masks(mask, match):
    with pytest.raises(BlockSparseAttentionError, match=match):
        key_padding_mask(mask, 2, 3)


# ---- what it refuses ----------------------------------------------------------------------------------

def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="unsupported model type None; supported: bert, roberta"):
        qbert.sparsify_attention(torch.nn.Linear(2, 2), "dense")
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=tiny.VOCAB))
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        qbert.sparsify_attention(gpt2, "dense")
    with pytest.raises(ValueError, match="decoder models .* are not supported"):
        qbert.sparsify_attention(build("BertModel", is_decoder=True), "dense")
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        qbert.sparsify_attention(build("BertModel", output_attentions=True), "dense")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"layout": "bigbird", "heads": 3}, ValueError, "heads=3 must be 1 or the model's num_attention_heads=2"),
    ({"layout": sliding_window(64, 16), "window": 2}, TypeError, "only apply to a builder name"),
    ({"layout": sliding_window(64, 16), "block_size": 32}, ValueError, "contradicts the layout's block_size=16"),
    ({"layout": bigbird(64, 16, heads=3)}, ValueError, "the layout has 3 heads"),
    ({"layout": lambda seq: None, "block_size": 16}, ValueError, "leave it None"),
    ({"layout": 3}, TypeError, "layout must be a builder name"),
    ({"layout": "banded"}, ValueError, "unknown layout builder 'banded'"),
])
def test_invalid_layouts_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        qbert.sparsify_attention(build("BertModel"), **kwargs)


def test_head_pruned_models_are_checked_against_each_layers_head_count():
    # 4 heads of size 32 (hidden 128): one head pruned from every layer leaves 3 per layer, so a 3-head
    # layout fits although the config still says 4; pruned unevenly, only a 1-head layout fits.
    overrides = {"hidden_size": 128, "num_attention_heads": 4}
    model = build("BertModel", **overrides)
    qbert.prune.remove_heads(model, {0: [1], 1: [2]})
    inputs = tiny.inputs()
    expected = run(model, **inputs)
    with pytest.raises(ValueError, match="heads=4 must be 1 or the model's num_attention_heads=3"):
        qbert.sparsify_attention(model, "dense", block_size=16, heads=4)
    qbert.sparsify_attention(model, per_head([sliding_window(tiny.SEQ, 16, window=8)] * 3))
    torch.testing.assert_close(run(model, **inputs), expected, rtol=0, atol=ATOL)

    uneven = build("BertModel", **overrides)
    qbert.prune.remove_heads(uneven, {0: [1]})
    expected = run(uneven, **inputs)
    with pytest.raises(ValueError, match=r"the attention modules have \[3, 4\] heads \(pruned unevenly\)"):
        qbert.sparsify_attention(uneven, per_head([sliding_window(tiny.SEQ, 16, window=8)] * 3))
    qbert.sparsify_attention(uneven, "dense", block_size=16)
    torch.testing.assert_close(run(uneven, **inputs), expected, rtol=0, atol=ATOL)


def test_calls_it_cannot_serve_are_refused():
    model = qbert.sparsify_attention(build("BertModel"), "dense", block_size=16)
    inputs = tiny.inputs()
    with pytest.raises(BlockSparseAttentionError, match="output_attentions is not supported"), torch.no_grad():
        model(**inputs, output_attentions=True)
    model.train()
    with pytest.raises(BlockSparseAttentionError, match=r"attention dropout p=0.1 in training"):
        model(**inputs)
    model.eval()
    fixed = qbert.sparsify_attention(build("BertModel"), BlockLayout(torch.ones(1, 2, 2, dtype=torch.bool), 16))
    with pytest.raises(BlockSparseAttentionError, match=r"needs a 1x1-block layout at block_size=16"):
        run(fixed, inputs["input_ids"][:, :10])
    by_hand = build("BertModel")
    by_hand.set_attn_implementation(ATTENTION_NAME)
    with pytest.raises(BlockSparseAttentionError, match="has no block layout; call qbert.sparsify_attention"):
        run(by_hand, **inputs)
    attention = model.get_submodule("encoder.layer.0.attention.self")
    q = torch.zeros(1, HEADS, 4, 32)
    with pytest.raises(BlockSparseAttentionError, match="cross-attention and key/value caches"):
        block_sparse_attention_forward(attention, q, torch.zeros(1, HEADS, 8, 32), q, None)
