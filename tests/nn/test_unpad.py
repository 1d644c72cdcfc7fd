"""Unpadded execution of the fused W8A8 encoder (qbert.nn.unpad) against its padded path.

Tiers. Layers run op by op: exact. Every op but attention is row-wise, and attention gives a masked key
probability exactly 0 whether it holds the pad token or zeros, so each real token's output must equal the
padded path's bitwise. Layers run as one call (qbert.ops.w8a8_encoder_layer: attention on each
sequence's real tokens alone): same math in float (SAME_MATH_TOLERANCE), as the attention kernel blocks
the keys differently and a requantized code can move by one step.
"""

import copy
import functools

import pytest
import torch
from sentence_transformers import SentenceTransformer

import qbert
from qbert.demo import SENTENCES, model_path
from qbert.nn import unpad
from qbert.nn.fused import FusedEncoder, FusedLayer
from qbert.nn.unpad import unpadding
from tests.nn import _tiny_models as tiny

FAMILIES = ("bert", "minilm", "roberta", "electra")
IMPLEMENTATIONS = ("eager", "sdpa")
SEQ = tiny.SEQ
# The lengths of a batch's sequences, each padded to SEQ (or to SEQ on the left).
PATTERNS = {
    "one_long_one_short": (SEQ, 5),
    "all_equal_but_padded": (11, 11, 11),
    "a_sequence_of_length_1": (SEQ, 1, 9),
    "ragged": (3, SEQ, 7, 12, 2),
    "an_empty_sequence": (9, 0),
}
MIN = torch.finfo(torch.float32).min
# Relative to the output's largest magnitude: a code moved by one step in a requantization (tests/nn/test_fused.py).
SAME_MATH_TOLERANCE = 1e-3
FIDELITY_SLACK = 1e-3  # of cosine to the float model's embedding, per sentence


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return qbert.quantize(tiny.build(tiny.BASE_MODELS[family], family), "w8a8")


def _fused(family: str, implementation: str) -> torch.nn.Module:
    model = _model(family)
    model.set_attn_implementation(implementation)
    return model


def _batch(lengths: tuple[int, ...], left: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(tiny.SEED)
    input_ids = torch.randint(0, tiny.VOCAB, (len(lengths), SEQ), generator=g)
    positions = torch.arange(SEQ).expand(len(lengths), SEQ)
    lengths = torch.tensor(lengths)[:, None]
    real = positions >= SEQ - lengths if left else positions < lengths
    return {"input_ids": input_ids, "attention_mask": real.long()}


def _run(model: torch.nn.Module, inputs: dict, op_by_op: bool = True, **kwargs) -> tuple[object, tuple[int, ...]]:
    """The model's output and the leading shape of the input layer 0's attention output projection saw:
    (T,) on the unpadded path, (batch, seq) on the padded one. The hook that sees it makes layer 0 run op
    by op; ``op_by_op`` hooks every other layer's FFN up-projection too (hooks on a layer's sub-modules
    must see them run), else those layers run as one call where they can."""
    seen = []
    dense = model.encoder.layer[0].attention.output.dense
    handles = [dense.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:-1])))]
    if op_by_op:
        handles += [layer.intermediate.dense.register_forward_hook(lambda *_: None) for layer in model.encoder.layer]
    try:
        with torch.no_grad():
            out = model(**inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen[0]


def _assert_unpadded_equals_padded(model: torch.nn.Module, inputs: dict, **kwargs) -> None:
    real = inputs["attention_mask"].bool()
    for op_by_op in (True, False):
        with unpadding(False):
            padded, padded_rows = _run(model, inputs, op_by_op, **kwargs)
        out, rows = _run(model, inputs, op_by_op, **kwargs)
        assert padded_rows == tuple(real.shape) and rows == (int(real.sum()),)
        got, want = out.last_hidden_state[real], padded.last_hidden_state[real]
        if op_by_op:
            assert torch.equal(got, want)
        else:
            error = (got - want).abs().max().item()
            assert error <= SAME_MATH_TOLERANCE * want.abs().max().item(), error
        assert not out.last_hidden_state[~real].any()  # zeros at the pad positions


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_equals_padded_on_the_real_tokens(family, implementation, pattern):
    with qbert.use_backend("cpu"):
        _assert_unpadded_equals_padded(_fused(family, implementation), _batch(PATTERNS[pattern]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_equals_padded_on_the_reference(family, implementation):
    # The reference ops (the spec) are row-wise too; one ragged batch each (they are slow on the CPU).
    with qbert.use_backend("reference"):
        _assert_unpadded_equals_padded(_fused(family, implementation), _batch(PATTERNS["ragged"]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_left_padding(implementation):
    _assert_unpadded_equals_padded(_fused("bert", implementation), _batch((SEQ, 6, 1), left=True))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask", ["all_ones", "none"])
def test_no_padding_runs_the_padded_path(implementation, mask):
    # Hugging Face hands the encoder no mask when nothing is padded: nothing to unpad, same as before.
    model = _fused("bert", implementation)
    inputs = _batch((SEQ, SEQ))
    if mask == "none":
        inputs.pop("attention_mask")
    out, rows = _run(model, inputs)
    with unpadding(False):
        padded, _ = _run(model, inputs)
    assert rows == (2, SEQ)
    assert torch.equal(out.last_hidden_state, padded.last_hidden_state)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_capture_runs_the_padded_path(family):
    model = _fused(family, "eager")  # sdpa returns no attention weights
    inputs = _batch(PATTERNS["one_long_one_short"])
    out, rows = _run(model, inputs, output_hidden_states=True, output_attentions=True)
    with unpadding(False):
        padded, _ = _run(model, inputs, output_hidden_states=True, output_attentions=True)
    assert rows == (2, SEQ)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for got, want in zip(out.hidden_states + out.attentions, padded.hidden_states + padded.attentions,
                         strict=True):
        assert got.shape[0] == 2 and got.shape[-2] == SEQ  # [batch, seq, hidden], [batch, heads, seq, seq]
        assert torch.equal(got, want)


def test_output_capture_from_the_config_runs_the_padded_path():
    model = copy.deepcopy(_fused("bert", "sdpa"))
    model.config.output_hidden_states = True
    out, rows = _run(model, _batch(PATTERNS["one_long_one_short"]))
    assert rows == (2, SEQ) and len(out.hidden_states) == model.config.num_hidden_layers + 1


def _key_padding(lengths: tuple[int, ...]) -> torch.Tensor:
    """[batch, 1, SEQ, SEQ] bool, True where the key is a real token."""
    real = _batch(lengths)["attention_mask"].bool()
    return real[:, None, None, :].expand(-1, 1, SEQ, SEQ)


def test_a_users_4d_key_padding_mask_is_unpadded():
    lengths = PATTERNS["one_long_one_short"]
    keys = _key_padding(lengths)
    float_mask = torch.zeros(keys.shape).masked_fill(~keys, MIN)
    for implementation, mask in (("sdpa", keys), ("eager", float_mask), ("sdpa", float_mask)):
        inputs = {"input_ids": _batch(lengths)["input_ids"], "attention_mask": mask}
        with unpadding(False):
            padded, _ = _run(_fused("bert", implementation), inputs)
        out, rows = _run(_fused("bert", implementation), inputs)
        real = keys[:, 0, 0]
        assert rows == (int(real.sum()),)
        assert torch.equal(out.last_hidden_state[real], padded.last_hidden_state[real])


@pytest.mark.parametrize("case", ["causal", "additive_bias", "bool_under_eager"])
def test_a_mask_that_is_not_plain_key_padding_runs_the_padded_path(case):
    keys = _key_padding(PATTERNS["one_long_one_short"])
    implementation, mask = {
        "causal": ("sdpa", keys & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()),
        "additive_bias": ("eager", torch.zeros(keys.shape).masked_fill(~keys, -1e4)),
        "bool_under_eager": ("eager", keys),  # eager adds the mask to the scores: a bool mask masks nothing
    }[case]
    inputs = {"input_ids": _batch(PATTERNS["one_long_one_short"])["input_ids"], "attention_mask": mask}
    out, rows = _run(_fused("bert", implementation), inputs)
    with unpadding(False):
        padded, _ = _run(_fused("bert", implementation), inputs)
    assert rows == (2, SEQ)
    assert torch.equal(out.last_hidden_state, padded.last_hidden_state)


def _mask_cases() -> dict[str, tuple[torch.Tensor, str, list[list[bool]] | None]]:
    keys = torch.tensor([[True, True, False], [True, False, False]])
    bool_mask = keys[:, None, None, :].expand(2, 1, 3, 3)
    additive = torch.zeros(2, 1, 3, 3).masked_fill(~bool_mask, MIN)
    per_head = bool_mask.expand(2, 2, 3, 3).clone()
    per_head[0, 1, :, 1] = False
    return {
        "bool": (bool_mask, "sdpa", keys.tolist()),
        "bool_one_query_row": (bool_mask[:, :, :1], "sdpa", keys.tolist()),
        "bool_one_row_for_the_batch": (bool_mask[:1], "sdpa", [keys[0].tolist()] * 2),
        "additive_min": (additive, "eager", keys.tolist()),
        "additive_inf": (additive.masked_fill(~bool_mask, float("-inf")), "eager", keys.tolist()),
        "bool_under_eager": (bool_mask, "eager", None),
        "additive_bias": (additive.masked_fill(~bool_mask, -1e4), "eager", None),
        "depends_on_the_query": (bool_mask & torch.ones(3, 3, dtype=torch.bool).tril(), "sdpa", None),
        "depends_on_the_head": (per_head, "sdpa", None),
        "integer": (bool_mask.long(), "sdpa", None),
        "2d": (keys, "sdpa", None),
        "wrong_length": (bool_mask[..., :2], "sdpa", None),
    }


@pytest.mark.parametrize("case", _mask_cases())
def test_real_tokens_of_a_mask(case):
    mask, implementation, expected = _mask_cases()[case]
    valid = unpad.real_tokens(mask, 2, 3, implementation)
    assert (None if valid is None else valid.tolist()) == expected


def test_plan_keeps_a_batch_without_real_tokens_padded():
    hidden = torch.randn(2, 3, 4)
    assert unpad.plan(hidden, torch.zeros(2, 1, 3, 3, dtype=torch.bool), "sdpa") is None
    assert unpad.plan(hidden, torch.ones(2, 1, 3, 3, dtype=torch.bool), "sdpa") is None
    plan = unpad.plan(hidden, torch.tensor([True, False, True])[None, None, None].expand(2, 1, 3, 3), "sdpa")
    assert plan.indices.tolist() == [0, 2, 3, 5]
    assert torch.equal(plan.scatter(plan.gather(hidden)), hidden * torch.tensor([1.0, 0.0, 1.0])[:, None])


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_tracing_runs_the_padded_path():
    # torch.jit.trace would bake one batch's token count into the graph.
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([True, False, True])[None, None, None].expand(2, 1, 3, 3)

    def real_rows(x: torch.Tensor) -> torch.Tensor:
        plan = unpad.plan(x, mask, "sdpa")
        return x if plan is None else plan.gather(x)

    assert real_rows(hidden).shape == (4, 4)
    assert torch.jit.trace(real_rows, (hidden,), check_trace=False)(hidden).shape == (2, 3, 4)


def test_a_layer_left_unfused_runs_padded_inside_the_unpadded_encoder():
    partial = qbert.quantize(tiny.build("BertModel", "bert", num_hidden_layers=3), "w8a8",
                             skip=("encoder.layer.1.*",))
    assert isinstance(partial.encoder, FusedEncoder) and not isinstance(partial.encoder.layer[1], FusedLayer)
    inputs = _batch(PATTERNS["ragged"])
    seen = []
    plain = partial.encoder.layer[1].attention.output.dense
    handle = plain.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:-1])))
    try:
        _assert_unpadded_equals_padded(partial, inputs)
    finally:
        handle.remove()
    assert seen == [(5, SEQ)] * 4  # padded under both paths, op by op and in one call


def test_block_sparse_attention_is_unpadded():
    # qbert's block-sparse attention gets a [batch, 1, 1, seq] bool key-padding mask; head_dim 32 and two
    # blocks of 16 per sequence, as its kernels need.
    seq, block = 32, 16
    model = qbert.sparsify_attention(tiny.build("BertModel", "bert", num_attention_heads=2), "sliding_window",
                                     block_size=block, window=1)
    model = qbert.quantize(model, "w8a8")
    ids = torch.randint(0, tiny.VOCAB, (3, seq), generator=torch.Generator().manual_seed(tiny.SEED))
    mask = (torch.arange(seq)[None] < torch.tensor([seq, 20, 5])[:, None]).long()
    _assert_unpadded_equals_padded(model, {"input_ids": ids, "attention_mask": mask})


def test_unpadding_switch():
    with pytest.raises(TypeError, match="unpadding: enabled must be a bool, got int"), unpadding(0):
        pass
    inputs = _batch(PATTERNS["one_long_one_short"])
    with unpadding(False):
        with unpadding(True):
            assert _run(_fused("bert", "sdpa"), inputs)[1] == (int(inputs["attention_mask"].sum()),)
        assert _run(_fused("bert", "sdpa"), inputs)[1] == (2, SEQ)


def test_sentence_transformer_embeddings_are_unchanged():
    model = qbert.quantize(SentenceTransformer(str(model_path()), device="cpu"), "w8a8")
    transformer = model[0].model
    assert isinstance(transformer.encoder, FusedEncoder)
    mask = model.tokenize(list(SENTENCES))["attention_mask"]
    assert not mask.all()  # the batch is padded
    seen = []
    dense = transformer.encoder.layer[0].attention.output.dense
    handle = dense.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:-1])))
    try:
        unpadded = model.encode(list(SENTENCES), convert_to_tensor=True, batch_size=len(SENTENCES))
        with unpadding(False):
            padded = model.encode(list(SENTENCES), convert_to_tensor=True, batch_size=len(SENTENCES))
    finally:
        handle.remove()
    assert seen == [(int(mask.sum()),), tuple(mask.shape)]
    # Tier: fidelity. Layers 1-5 run as one call (attention on the real tokens alone): a requantized code
    # that moves by one step moves a sentence's embedding by about the int8 noise, so each embedding is
    # held to the padded one's fidelity to the float model, within FIDELITY_SLACK of cosine.
    float_model = SentenceTransformer(str(model_path()), device="cpu")
    truth = float_model.encode(list(SENTENCES), convert_to_tensor=True, batch_size=len(SENTENCES))
    cos = torch.nn.functional.cosine_similarity
    loss = (cos(padded, truth) - cos(unpadded, truth)).max().item()
    assert loss <= FIDELITY_SLACK, loss
