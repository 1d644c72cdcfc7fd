"""Embed a corpus with a qbert-quantized encoder on a Ray cluster (Ray Data ``map_batches``, an actor pool).

    import ray, qbert.ray
    texts = ray.data.read_parquet("s3://bucket/corpus/")          # a column "text"
    embedded = qbert.ray.embed(texts, "minilm-w8a8.safetensors", tokenizer="all-MiniLM-L6-v2/",
                               actors=8, cpus_per_actor=4)
    embedded.write_parquet("s3://bucket/embeddings/")              # runs it: Ray's progress view

Each actor of the pool loads the quantized model once, in its ``__init__``, from ``model_path`` (what
``qbert.save_quantized`` wrote; ``qbert.load_quantized`` reads it), and the tokenizer from its directory;
only the path travels to the actors, never the model, and the texts are tokenized inside the actor. A
batch's embeddings are what sentence-transformers computes for all-MiniLM-L6-v2: the mean of the encoder's
last hidden state over the attention mask, L2-normalized (``embed_texts``, the single-process function
every actor runs). Ray must be installed (``pip install 'qbert[ray]'``); ``import qbert`` never imports it.

Reproducibility: a text's embedding depends on the batch it is embedded in (the batch's padded length and
shape change float rounding, and int8 rounding of the activations can turn a last-bit difference into one
code step, about 1e-2 in a component), never on the thread count. A Ray run therefore gives the bits of a
single-process ``embed_texts`` run over the same batches, which Ray forms when every block of the dataset
holds a multiple of ``batch_size`` rows. Rows keep their other columns (e.g. an id), since Ray Data does
not keep the row order across actors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import qbert

if TYPE_CHECKING:
    import ray.data

RAY_PIP_NAME = "qbert[ray]"
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_OUTPUT_COLUMN = "embedding"
DEFAULT_BATCH_SIZE = 32
# sentence-transformers' per-model config: its max_seq_length is the truncation length the model was
# trained and evaluated with (256 for all-MiniLM-L6-v2, below the tokenizer's 512).
SENTENCE_CONFIG = "sentence_bert_config.json"
EMBEDDING_DTYPE = np.float32


class EmbedError(ValueError):
    """``embed`` cannot run as asked; the message names the argument or input and the constraint."""


def require_ray():
    """The ``ray`` module with Ray Data, or an ImportError that says how to install it."""
    try:
        import ray.data
    except ImportError as exc:
        raise ImportError(f"qbert.ray needs Ray Data, which is not installed: pip install '{RAY_PIP_NAME}' "
                          f"(or pip install 'ray[data]')") from exc
    return ray


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EmbedError(f"qbert.ray.embed: {name} must be an integer >= 1, got {value!r}")


def tokenizer_path(model_path: str | os.PathLike, tokenizer: str | os.PathLike | None) -> Path:
    """The tokenizer directory: ``tokenizer``, or ``model_path`` when that is a directory."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_dir():
            raise EmbedError(f"qbert.ray.embed: tokenizer {str(path)!r} is not a directory (a tokenizer "
                             f"saved with save_pretrained)")
        return path
    if Path(model_path).is_dir():
        return Path(model_path)
    raise EmbedError(f"qbert.ray.embed: {os.fspath(model_path)!r} is a file, which holds no tokenizer: pass "
                     f"tokenizer=<directory of the model's tokenizer>")


def resolve_max_length(tokenizer_dir: Path, tokenizer, config, requested: int | None) -> int:
    """The truncation length: ``requested``, else the directory's sentence-transformers ``max_seq_length``,
    else the tokenizer's ``model_max_length``; at most the model's ``max_position_embeddings``."""
    if requested is not None:
        _check_positive("max_length", requested)
        length, source = requested, "max_length"
    elif (tokenizer_dir / SENTENCE_CONFIG).is_file():
        length = json.loads((tokenizer_dir / SENTENCE_CONFIG).read_text())["max_seq_length"]
        source = f"{tokenizer_dir / SENTENCE_CONFIG}'s max_seq_length"
    else:
        length, source = tokenizer.model_max_length, "the tokenizer's model_max_length"
    if length > config.max_position_embeddings:
        raise EmbedError(f"qbert.ray.embed: {source} is {length}, more than the model's "
                         f"max_position_embeddings ({config.max_position_embeddings}): pass max_length")
    return length


def load_tokenizer(tokenizer_dir: Path, config):
    """The tokenizer saved in ``tokenizer_dir``, offline; its vocabulary must fit the model's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if len(tokenizer) > config.vocab_size:
        raise EmbedError(f"qbert.ray.embed: the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, "
                         f"the model's vocabulary {config.vocab_size}: it is not this model's tokenizer")
    return tokenizer


def embed_texts(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """Sentence embeddings of ``texts`` as one padded batch: [len(texts), hidden] float32, unit rows.

    The mean of ``model.base_model``'s last hidden state over the attention mask (a task model embeds with
    its encoder, its head unused), L2-normalized; texts truncated to ``max_length`` tokens.
    """
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model.base_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1).numpy().astype(EMBEDDING_DTYPE, copy=False)


class Embedder:
    """The callable class of the actor pool: loads the model once per actor, embeds one batch per call.

    ``threads``: torch's thread count for this process (None: leave it as it is).
    """

    def __init__(self, model_path: str, tokenizer_dir: str, text_column: str, output_column: str,
                 max_length: int | None, threads: int | None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = qbert.load_quantized(model_path)
        self.tokenizer = load_tokenizer(Path(tokenizer_dir), self.model.config)
        self.max_length = resolve_max_length(Path(tokenizer_dir), self.tokenizer, self.model.config,
                                             max_length)
        self.text_column, self.output_column = text_column, output_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.text_column not in batch:
            raise EmbedError(f"qbert.ray.embed: the dataset has no column {self.text_column!r} "
                             f"(text_column); its columns: {sorted(batch)}")
        if self.output_column in batch:
            raise EmbedError(f"qbert.ray.embed: the dataset already has a column {self.output_column!r}; "
                             f"pass another output_column")
        texts = batch[self.text_column].tolist()
        if not all(isinstance(text, str) for text in texts):
            kinds = sorted({type(text).__name__ for text in texts} - {"str"})
            raise EmbedError(f"qbert.ray.embed: column {self.text_column!r} must hold strings, found {kinds}")
        return {**batch, self.output_column: embed_texts(self.model, self.tokenizer, texts, self.max_length)}


def embed(dataset: ray.data.Dataset, model_path: str | os.PathLike, *,
          tokenizer: str | os.PathLike | None = None,
          text_column: str = DEFAULT_TEXT_COLUMN, output_column: str = DEFAULT_OUTPUT_COLUMN,
          batch_size: int = DEFAULT_BATCH_SIZE, actors: int = 1, cpus_per_actor: int = 1,
          max_length: int | None = None, **ray_remote_args: Any) -> ray.data.Dataset:
    """``dataset`` with a column ``output_column`` of sentence embeddings (float32 [hidden] per row), lazily.

    ``model_path``: what ``qbert.save_quantized`` wrote, at a path every node of the cluster can read (Ray
    does not copy it), loaded once by each of ``actors`` actors (each with ``cpus_per_actor`` CPUs and as
    many torch threads); ``tokenizer``: the model's tokenizer directory, likewise readable everywhere
    (default: ``model_path`` if it is a directory). Batches of ``batch_size`` texts from ``text_column``;
    ``max_length``: see ``resolve_max_length`` (default: the directory's sentence-transformers length). Other
    keyword arguments go to ``map_batches`` (e.g. ``memory``, ``resources``). Nothing runs until the
    result is consumed (``write_parquet``, ``materialize``, ``iter_batches``): then Ray shows its progress.
    """
    ray = require_ray()
    for name, value in (("batch_size", batch_size), ("actors", actors), ("cpus_per_actor", cpus_per_actor)):
        _check_positive(name, value)
    if max_length is not None:
        _check_positive("max_length", max_length)
    if not os.path.exists(model_path):
        raise EmbedError(f"qbert.ray.embed: model_path {os.fspath(model_path)!r} does not exist")
    tokenizer_dir = tokenizer_path(model_path, tokenizer)
    return dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_path": os.path.abspath(model_path),
                               "tokenizer_dir": str(tokenizer_dir.resolve()), "text_column": text_column,
                               "output_column": output_column, "max_length": max_length,
                               "threads": cpus_per_actor},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, **ray_remote_args)
