"""The ``qbert embed`` command: embed a corpus with a quantized encoder on Ray (``qbert.ray.embed``).

    qbert embed --model minilm-w8a8.safetensors --tokenizer all-MiniLM-L6-v2/ --input corpus.jsonl \\
                --out embeddings/ [--actors 2] [--cpus-per-actor 1] [--batch-size 32] [--address auto]

Reads ``--input`` with Ray Data (parquet, JSON lines, CSV, or text with one text per line), writes the rows
with an ``embedding`` column as parquet files into ``--out``, and prints the texts embedded, the wall time
and texts/s, then Ray's per-operator statistics. Ray shows its progress view while it runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qbert import ray as qbert_ray
from qbert.cli import UsageError, existing_dir, existing_path, positive_int, writable_dir
from qbert.io import QuantizedFileError

# --input-format -> the Ray Data reader; a file's suffix picks one when the option is not given.
# (ray.data.read_text puts each line in the column "text", qbert.ray.embed's default text column.)
READERS = {"parquet": "read_parquet", "json": "read_json", "csv": "read_csv", "text": "read_text"}
SUFFIX_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
DEFAULT_ACTORS = 1
DEFAULT_CPUS_PER_ACTOR = 1

EMBED_HELP = """\
Embed the texts of a corpus with a qbert-quantized encoder on a Ray cluster: Ray Data map_batches over an
actor pool of --actors actors with --cpus-per-actor CPUs (and torch threads) each. Every actor loads
--model (a file written by qbert.save_quantized) once and tokenizes with --tokenizer (the model's tokenizer
directory; default --model when it is a directory); this process loads both once first, so that a bad
model, tokenizer or --max-length fails in one line before any actor starts. Both paths must be readable on
every node. Embeddings: the mean of the last hidden state over the attention mask, L2-normalized (as
sentence-transformers computes them for all-MiniLM-L6-v2). --address: the Ray cluster to join (default:
RAY_ADDRESS, else a new local instance).
"""


def empty_output_dir(text: str) -> Path:
    """A directory to write parquet files into: new, or empty (Ray would add files beside old ones)."""
    path = writable_dir(text)
    if path.exists() and any(path.iterdir()):
        raise argparse.ArgumentTypeError(f"{text} is not empty; embed writes into a new or empty directory")
    return path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``embed`` to ``qbert``'s subcommands; returns its parser."""
    parser = subparsers.add_parser("embed", help="embed a corpus with a quantized encoder on Ray",
                                   description=EMBED_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    suffixes = ", ".join(f"{suffix} {fmt}" for suffix, fmt in SUFFIX_FORMATS.items())
    parser.add_argument("--model", required=True, type=existing_path, help="quantized model (save_quantized)")
    parser.add_argument("--tokenizer", type=existing_dir,
                        help="tokenizer directory (default: --model if it is a directory)")
    parser.add_argument("--input", required=True, type=existing_path, help="corpus file or directory")
    parser.add_argument("--input-format", choices=READERS, help=f"default from the file's suffix: {suffixes}")
    parser.add_argument("--text-column", default=qbert_ray.DEFAULT_TEXT_COLUMN,
                        help=f"column of the texts (default {qbert_ray.DEFAULT_TEXT_COLUMN})")
    parser.add_argument("--out", required=True, type=empty_output_dir, help="directory for the parquet files")
    parser.add_argument("--batch-size", type=positive_int, default=qbert_ray.DEFAULT_BATCH_SIZE,
                        help=f"texts per batch (default {qbert_ray.DEFAULT_BATCH_SIZE})")
    parser.add_argument("--actors", type=positive_int, default=DEFAULT_ACTORS,
                        help=f"actors in the pool (default {DEFAULT_ACTORS})")
    parser.add_argument("--cpus-per-actor", type=positive_int, default=DEFAULT_CPUS_PER_ACTOR,
                        help=f"CPUs and torch threads per actor (default {DEFAULT_CPUS_PER_ACTOR})")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="truncation length (default: the tokenizer directory's sentence-transformers "
                             "max_seq_length)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    return parser


def input_format(args: argparse.Namespace) -> str:
    """--input-format, else the format named by --input's suffix."""
    if args.input_format is not None:
        return args.input_format
    fmt = SUFFIX_FORMATS.get(args.input.suffix.lower()) if args.input.is_file() else None
    if fmt is None:
        what = "a directory" if args.input.is_dir() else f"suffix {args.input.suffix!r}"
        raise UsageError(f"--input {args.input}: {what} names no format; pass --input-format "
                         f"({', '.join(READERS)})")
    return fmt


def run(args: argparse.Namespace) -> int:
    ray = qbert_ray.require_ray()
    fmt = input_format(args)
    if args.tokenizer is None and not args.model.is_dir():
        raise UsageError(f"--model {args.model} is a file, which holds no tokenizer: pass --tokenizer DIR")
    tokenizer = args.tokenizer or args.model
    try:  # what every actor will do, once here: a bad input fails before the cluster does any work
        qbert_ray.Embedder(str(args.model), str(tokenizer), args.text_column, qbert_ray.DEFAULT_OUTPUT_COLUMN,
                           args.max_length, threads=None)
    except (QuantizedFileError, qbert_ray.EmbedError) as exc:
        raise UsageError(str(exc)) from exc
    if ray.is_initialized():
        if args.address is not None:
            raise UsageError(f"--address {args.address}: this process is already connected to a Ray instance")
    else:
        ray.init(address=args.address)
    dataset = getattr(ray.data, READERS[fmt])(str(args.input))
    embedded = qbert_ray.embed(dataset, args.model, tokenizer=tokenizer, text_column=args.text_column,
                               batch_size=args.batch_size, actors=args.actors,
                               cpus_per_actor=args.cpus_per_actor, max_length=args.max_length)
    start = time.perf_counter()
    embedded.write_parquet(str(args.out))
    seconds = time.perf_counter() - start
    texts = ray.data.read_parquet(str(args.out)).count()
    print(f"embedded {texts} texts in {seconds:.1f} s: {texts / seconds:.1f} texts/s "
          f"({args.actors} actors x {args.cpus_per_actor} CPUs), written to {args.out}")
    print(embedded.stats())
    return 0
