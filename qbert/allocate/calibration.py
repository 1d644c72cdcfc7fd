"""Calibration data for ``qbert allocate``: a saved model, its tokenizer, batches and the loss.

Model: a ``save_pretrained`` directory of a transformers model whose ``config.architectures[0]`` is a
``*ForSequenceClassification`` or ``*ForMaskedLM`` class, with its tokenizer saved beside it.

Data: a ``.jsonl`` file, one JSON object per line with ``"text"`` (and optionally ``"text_pair"`` and an
integer ``"label"``), or any other file as plain text, one example per non-empty line. Examples are
tokenized with truncation to ``max_length`` tokens (at least ``MIN_MAX_LENGTH``, and room for one token
of text beside the tokenizer's special tokens) and padded to the longest in their batch. Errors name an
example by its position, counted from 1 (its line among the file's non-empty lines).

Loss (the model's own ``.loss``):
  * sequence classification: the task loss with the examples' labels (cross-entropy for
    ``num_labels > 1``); every example needs an integer ``"label"``, in ``0 .. num_labels - 1`` where the
    loss indexes the logits with it (``label_classes``).
  * masked LM: the MLM loss. In each sequence ``MLM_PROBABILITY`` of the real tokens (not padding nor
    special tokens other than the unknown-word token), at least one, are replaced by the mask token and
    predicted; the positions are drawn once from a seeded generator, so the loss is a fixed function of the
    weights.

Model inputs only (task ``INPUTS``, ``input_batches``): the same tokenized batches without labels nor
masks, e.g. GPTQ's calibration inputs (``qbert quantize --data``); labels in the examples are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

MLM_PROBABILITY = 0.15
IGNORE_INDEX = -100  # the label Hugging Face's losses skip
TASKS = {"ForSequenceClassification": "classification", "ForMaskedLM": "mlm"}
INPUTS = "inputs"  # make_batches' task for batches of model inputs only (no loss)
# The shortest truncation that keeps any text: a BERT-family tokenizer adds two special tokens around one
# sequence ([CLS] ... [SEP], <s> ... </s>), so one token of text needs three. make_batches also checks the
# tokenizer's own count (a pair has more): at or below it a tokenizer cannot truncate and keeps no text.
MIN_MAX_LENGTH = 3
# Classification losses that index the logits with the label (regression and multi-label ones do not).
_INDEXING_PROBLEMS = (None, "single_label_classification")


class CalibrationError(ValueError):
    """The model directory or the data file cannot be used; the message names it and the problem."""


def model_class_name(model_dir: str | os.PathLike) -> str:
    """``config.architectures[0]`` of a ``save_pretrained`` directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CalibrationError(f"{model_dir}: no config.json; expected a save_pretrained model directory")
    architectures = json.loads(path.read_text(encoding="utf-8")).get("architectures") or []
    if not architectures:
        raise CalibrationError(f"{path}: 'architectures' is empty; cannot tell which model class to load")
    return architectures[0]


def load_model(model_dir: str | os.PathLike) -> nn.Module:
    """The model of a ``save_pretrained`` directory (class ``config.architectures[0]``), in eval mode."""
    import transformers

    name = model_class_name(model_dir)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise CalibrationError(f"{model_dir}: transformers has no model class {name!r}")
    return cls.from_pretrained(model_dir).eval()


def task_of(model: nn.Module) -> str:
    """``"classification"`` or ``"mlm"`` from the model's class name."""
    name = type(model).__name__
    for suffix, task in TASKS.items():
        if name.endswith(suffix):
            return task
    raise CalibrationError(f"{name}: qbert allocate needs a *ForSequenceClassification or *ForMaskedLM model "
                           f"(the loss comes from its task)")


def label_classes(model: nn.Module) -> int | None:
    """How many classes a calibration label indexes (labels must be in ``0 .. n - 1``), or None where the
    labels are not class indices: masked LM (token ids), regression (``num_labels == 1`` or that
    ``problem_type``: any target value) and multi-label classification."""
    config = model.config
    if task_of(model) != "classification" or config.num_labels == 1 or config.problem_type not in _INDEXING_PROBLEMS:
        return None
    return config.num_labels


def read_examples(path: str | os.PathLike) -> list[dict]:
    """``[{"text": ..., "text_pair"?: ..., "label"?: ...}]`` from a JSONL or plain-text file (module docstring)."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise CalibrationError(f"{path}: no examples")
    if path.suffix != ".jsonl":
        return [{"text": line} for line in lines]
    examples = []
    for number, line in enumerate(lines, 1):
        try:
            example = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not valid JSON: {exc}") from exc
        if not isinstance(example, dict) or not isinstance(example.get("text"), str):
            raise CalibrationError(f"{path}:{number}: expected an object with a string 'text'")
        examples.append(example)
    return examples


def _mask_tokens(batch: dict, tokenizer, generator: torch.Generator, first: int) -> dict:
    input_ids = batch["input_ids"]
    # Unknown words are real input; the other special tokens ([CLS], [SEP], [PAD], ...) are not.
    special = sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})
    real = ~torch.isin(input_ids, torch.tensor(special, dtype=input_ids.dtype)) & batch["attention_mask"].bool()
    chosen = (torch.rand(input_ids.shape, generator=generator) < MLM_PROBABILITY) & real
    for row in range(input_ids.shape[0]):
        candidates = real[row].nonzero().flatten()
        if not len(candidates):
            raise CalibrationError(f"example {first + row + 1} has no token to mask (empty after tokenization)")
        if not chosen[row].any():  # at least one prediction per sequence
            chosen[row, candidates[torch.randint(len(candidates), (1,), generator=generator)]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return dict(batch, input_ids=torch.where(chosen, torch.full_like(input_ids, tokenizer.mask_token_id),
                                             input_ids), labels=labels)


def _class_labels(chunk: list[dict], first: int, num_labels: int | None) -> torch.Tensor:
    """The labels of examples ``first ..`` (``chunk``): integers, in ``0 .. num_labels - 1`` unless
    ``num_labels`` is None."""
    for row, example in enumerate(chunk):
        label = example.get("label")
        if not isinstance(label, int) or isinstance(label, bool):
            raise CalibrationError(f"example {first + row + 1} has label {label!r}; sequence classification needs "
                                   f"an integer 'label' in every example (a .jsonl data file)")
        if num_labels is not None and not 0 <= label < num_labels:
            raise CalibrationError(f"example {first + row + 1} has label {label}; the model has "
                                   f"num_labels={num_labels}, so a label must be in 0..{num_labels - 1}")
    return torch.tensor([example["label"] for example in chunk])


def make_batches(examples: list[dict], tokenizer, task: str, *, batch_size: int, max_length: int,
                 max_batches: int | None, seed: int | None, num_labels: int | None) -> list[dict]:
    """Tokenized batches (dicts of tensors; with ``labels`` unless ``task`` is ``INPUTS``) of the first
    examples (module docstring).

    task: ``"classification"``, ``"mlm"`` or ``INPUTS``. seed: the masks' (masked LM; the other tasks draw
    nothing and may pass None). ``num_labels``: the classes a classification label indexes
    (``label_classes(model)``); None accepts any integer label (regression, multi-label) and is what the
    other tasks pass."""
    tasks = (*TASKS.values(), INPUTS)
    if task not in tasks:
        raise CalibrationError(f"task must be one of {', '.join(tasks)}, got {task!r}")
    if task == "mlm" and seed is None:
        raise CalibrationError("masked LM needs a seed for its masks, got seed=None")
    if batch_size < 1 or max_length < MIN_MAX_LENGTH or (max_batches is not None and max_batches < 1):
        raise CalibrationError(f"need batch_size >= 1, max_length >= {MIN_MAX_LENGTH} and max_batches >= 1, "
                               f"got {batch_size}, {max_length}, {max_batches}")
    if task == "mlm" and tokenizer.mask_token_id is None:
        raise CalibrationError(f"{type(tokenizer).__name__} has no mask token; the MLM loss needs one")
    pair = any(e.get("text_pair") is not None for e in examples)
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    if max_length <= special:
        raise CalibrationError(f"max_length {max_length} leaves no token of text: {type(tokenizer).__name__} adds "
                               f"{special} special tokens to {'a text pair' if pair else 'a text'}")
    generator = torch.Generator().manual_seed(seed) if task == "mlm" else None
    starts = range(0, len(examples), batch_size)
    batches = []
    for start in starts if max_batches is None else starts[:max_batches]:
        chunk = examples[start:start + batch_size]
        pairs = [e.get("text_pair") for e in chunk]
        batch = dict(tokenizer([e["text"] for e in chunk], None if all(p is None for p in pairs) else pairs,
                               truncation=True, max_length=max_length, padding=True, return_tensors="pt"))
        if task == "classification":
            batch["labels"] = _class_labels(chunk, start, num_labels)
        elif task == "mlm":
            batch = _mask_tokens(batch, tokenizer, generator, start)
        batches.append(batch)
    return batches


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss on a batch with ``labels`` (module docstring)."""
    return model(**batch).loss


def calibration(model_dir: str | os.PathLike, data: str | os.PathLike, *, batch_size: int, max_length: int,
                max_batches: int | None, seed: int) -> tuple[nn.Module, list[dict], Callable]:
    """(model, batches, loss_fn) for ``qbert allocate``; an example the model's loss cannot take is a
    ``CalibrationError`` naming ``data``."""
    from transformers import AutoTokenizer

    model = load_model(model_dir)
    task = task_of(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = read_examples(data)
    try:
        batches = make_batches(examples, tokenizer, task, batch_size=batch_size, max_length=max_length,
                               max_batches=max_batches, seed=seed, num_labels=label_classes(model))
    except CalibrationError as exc:
        raise CalibrationError(f"{data}: {exc}") from exc
    return model, batches, model_loss


def input_batches(model_dir: str | os.PathLike, data: str | os.PathLike, *, batch_size: int, max_length: int,
                  max_batches: int | None) -> list[dict]:
    """Batches of model inputs only (``make_batches`` with task ``INPUTS``) of ``data``, tokenized by the
    tokenizer saved in ``model_dir`` (the model is not loaded); a ``CalibrationError`` names ``data``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = read_examples(data)
    try:
        return make_batches(examples, tokenizer, INPUTS, batch_size=batch_size, max_length=max_length,
                            max_batches=max_batches, seed=None, num_labels=None)
    except CalibrationError as exc:
        raise CalibrationError(f"{data}: {exc}") from exc
