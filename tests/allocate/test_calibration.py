"""Calibration batches (qbert.allocate.calibration): the size limits, labels the model's loss can take,
checked for library callers as for `qbert allocate`, and batches of model inputs only (GPTQ's)."""

from __future__ import annotations

import itertools
import json
import re
import string

import pytest
import torch
import transformers

from qbert.allocate import calibration as C
from tests.nn import _tiny_models as T

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)][:32]
NUM_LABELS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.BertTokenizer(vocab={token: i for i, token in enumerate(SPECIAL + WORDS)})


def _batches(tokenizer, examples, task="classification", *, batch_size=3, max_length=16, max_batches=None,
             num_labels=NUM_LABELS):
    return C.make_batches(examples, tokenizer, task, batch_size=batch_size, max_length=max_length,
                          max_batches=max_batches, seed=0, num_labels=num_labels)


def _labelled(*labels):
    return [{"text": f"{WORDS[i]} {WORDS[i + 1]}", "label": label} for i, label in enumerate(labels)]


@pytest.mark.parametrize("batch_size,max_length,max_batches", [
    (0, 16, None), (4, C.MIN_MAX_LENGTH - 1, None), (4, 0, None), (4, 16, 0),
], ids=["batch-size-0", "max-length-below-minimum", "max-length-0", "max-batches-0"])
def test_sizes_out_of_range_are_refused(tokenizer, batch_size, max_length, max_batches):
    with pytest.raises(C.CalibrationError, match=rf"need batch_size >= 1, max_length >= {C.MIN_MAX_LENGTH} and "
                                                 rf"max_batches >= 1, got {batch_size}, {max_length}, {max_batches}"):
        _batches(tokenizer, _labelled(0, 1), batch_size=batch_size, max_length=max_length, max_batches=max_batches)


def test_the_minimum_max_length_keeps_one_token_of_text(tokenizer):
    (batch,) = _batches(tokenizer, _labelled(0), max_length=C.MIN_MAX_LENGTH)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == C.MIN_MAX_LENGTH and ids[1] == tokenizer.convert_tokens_to_ids(WORDS[0])


def test_a_max_length_without_room_for_a_pair_is_refused(tokenizer):
    examples = [{"text": "aa ab", "text_pair": "ac ad", "label": 0}]
    pair_special = tokenizer.num_special_tokens_to_add(pair=True)
    with pytest.raises(C.CalibrationError, match=rf"max_length {pair_special} leaves no token of text: "
                                                 rf"BertTokenizer adds {pair_special} special tokens to a text pair"):
        _batches(tokenizer, examples, max_length=pair_special)
    assert len(_batches(tokenizer, examples, max_length=pair_special + 1)) == 1


@pytest.mark.parametrize("label", [NUM_LABELS, 7, -1])
def test_labels_outside_num_labels_are_refused(tokenizer, label):
    # Example 4 is the first of the second batch: positions count across batches, from 1.
    with pytest.raises(C.CalibrationError, match=rf"^example 4 has label {label}; the model has num_labels=2, "
                                                 rf"so a label must be in 0\.\.1$"):
        _batches(tokenizer, _labelled(0, 1, 1, label))


@pytest.mark.parametrize("label", [None, 1.0, "1", True], ids=["missing", "float", "string", "bool"])
def test_labels_must_be_integers(tokenizer, label):
    examples = _labelled(0, label)
    if label is None:
        del examples[1]["label"]
    with pytest.raises(C.CalibrationError, match=rf"^example 2 has label {label!r}; sequence classification "
                                                 r"needs an integer 'label'"):
        _batches(tokenizer, examples)


def test_labels_of_a_loss_without_classes_are_not_range_checked(tokenizer):
    batches = _batches(tokenizer, _labelled(0, 7, -1), num_labels=None)
    assert batches[0]["labels"].tolist() == [0, 7, -1]


def test_an_example_without_a_token_to_mask_is_named(tokenizer):
    examples = [{"text": "aa ab"}, {"text": ""}]
    with pytest.raises(C.CalibrationError, match=r"^example 2 has no token to mask"):
        _batches(tokenizer, examples, "mlm", batch_size=1, num_labels=None)


@pytest.mark.parametrize("class_name,num_labels,problem_type,expected", [
    ("BertForSequenceClassification", 3, None, 3),
    ("BertForSequenceClassification", 3, "single_label_classification", 3),
    ("BertForSequenceClassification", 1, None, None),
    ("BertForSequenceClassification", 3, "regression", None),
    ("BertForSequenceClassification", 3, "multi_label_classification", None),
    ("BertForMaskedLM", 2, None, None),
], ids=["classes", "single-label", "one-label-regression", "regression", "multi-label", "masked-lm"])
def test_label_classes_only_for_losses_that_index_the_logits(class_name, num_labels, problem_type, expected):
    model = T.build(class_name, num_labels=num_labels, problem_type=problem_type)
    assert C.label_classes(model) == expected


def test_input_batches_are_the_tokenized_batches_without_labels_or_masks(tokenizer):
    examples = _labelled(0, 1, 1, 0)
    inputs = _batches(tokenizer, examples, C.INPUTS, num_labels=None)
    labelled = _batches(tokenizer, examples)
    masked = _batches(tokenizer, examples, "mlm", num_labels=None)
    assert len(inputs) == len(labelled) == 2
    for plain, with_labels, with_masks in zip(inputs, labelled, masked, strict=True):
        assert set(plain) == set(with_labels) - {"labels"} == {"input_ids", "token_type_ids", "attention_mask"}
        assert all(torch.equal(plain[key], with_labels[key]) for key in plain)
        assert not torch.equal(plain["input_ids"], with_masks["input_ids"])  # the MLM batches are masked
        assert tokenizer.mask_token_id not in plain["input_ids"]


def test_input_batches_take_examples_without_labels(tokenizer):
    examples = [{"text": "aa ab ac"}, {"text": "ag", "label": "any"}, {"text": "ad", "text_pair": "ae af"}]
    batches = _batches(tokenizer, examples, C.INPUTS, batch_size=2, num_labels=None)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1] and not any("labels" in b for b in batches)
    assert (batches[1]["token_type_ids"] == 1).any()  # the pair's second text


def test_unknown_task_and_mlm_without_seed_are_refused(tokenizer):
    with pytest.raises(C.CalibrationError, match=r"^task must be one of classification, mlm, inputs, got 'qa'$"):
        _batches(tokenizer, _labelled(0), "qa")
    with pytest.raises(C.CalibrationError, match=r"^masked LM needs a seed for its masks"):
        C.make_batches(_labelled(0), tokenizer, "mlm", batch_size=1, max_length=16, max_batches=None, seed=None,
                       num_labels=None)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_input_batches_of_a_data_file(tokenizer, tmp_path, suffix):
    """``input_batches`` reads the file and the tokenizer saved beside the model (no model needed)."""
    tokenizer.save_pretrained(tmp_path / "model")
    texts = [f"{WORDS[i]} {WORDS[i + 2]}" for i in range(5)]
    data = tmp_path / f"data{suffix}"
    data.write_text("".join((json.dumps({"text": t, "label": 1}) if suffix == ".jsonl" else t) + "\n" for t in texts))
    batches = C.input_batches(tmp_path / "model", data, batch_size=2, max_length=16, max_batches=2)
    expected = _batches(tokenizer, [{"text": t} for t in texts], C.INPUTS, batch_size=2, max_batches=2,
                        num_labels=None)
    assert len(batches) == 2 and all(set(b) == set(e) and all(torch.equal(b[k], e[k]) for k in b)
                                     for b, e in zip(batches, expected, strict=True))
    with pytest.raises(C.CalibrationError, match=rf"^{re.escape(str(data))}: need batch_size >= 1, max_length >= "):
        C.input_batches(tmp_path / "model", data, batch_size=2, max_length=C.MIN_MAX_LENGTH - 1, max_batches=2)
