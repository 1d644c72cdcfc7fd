"""Peak memory of ``from_pretrained`` for BERT-large: float, quantized while loading, quantized after loading.

A random-init ``BertModel`` of bert-large sizes is saved with ``save_pretrained`` to a temporary directory
(``--smoke``: a tiny one). Each load then runs in a fresh Python process, which reports

- peak RSS: ``VmRSS`` of ``/proc/self/status``, all resident memory, including the pages of the
  memory-mapped checkpoint that the load read (file-backed: the kernel may drop them);
- peak anonymous RSS: ``RssAnon``, the memory the process itself holds (tensors);

both sampled every ``SAMPLE_S`` seconds, each minus its value just before the load (after the imports and the config). Rows:

- ``float``: ``AutoModel.from_pretrained(path)``: on the CPU the tensors are views of the memory-mapped
  checkpoint, so nothing is read until the model runs;
- ``float, every weight read once``: the same, then every tensor summed (as a forward reads them);
- ``qbert on load``: ``AutoModel.from_pretrained(path, quantization_config=qbert.QbertConfig(FORMAT))``,
  which quantizes layer by layer while the weights load;
- ``float, then qbert.quantize``: the float load, then ``qbert.quantize`` (both copies alive at once).

It also reports the bytes of the loaded model's tensors and of the directory ``save_pretrained`` writes.

    python benchmarks/bench_load_memory.py [--smoke] [--out DIR] [--format w8a8] [--device-tag cpu-amd-epyc]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BERT_LARGE = {"vocab_size": 30522, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096}
SMOKE = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128}
SEED = 0
SAMPLE_S = 0.005
KIB = 1024
MIB = 2**20
MODES = {"float": "float", "float-read": "float, every weight read once", "on-load": "qbert on load",
         "after-load": "float, then qbert.quantize"}
SUITE = "load_memory"


def _rss_bytes() -> tuple[int, int]:
    """(VmRSS, RssAnon) of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) * KIB
    if len(values) != 2:
        raise RuntimeError("bench_load_memory: /proc/self/status lacks VmRSS / RssAnon (Linux only)")
    return values["VmRSS"], values["RssAnon"]


def child(mode: str, path: str, fmt: str) -> dict:
    """One load in this (fresh) process; returns the memory it took."""
    import transformers

    import qbert

    transformers.AutoConfig.from_pretrained(path)  # imports the model's modules before the baseline
    baseline = _rss_bytes()
    peak = list(baseline)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[:] = map(max, peak, _rss_bytes())
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    if mode == "on-load":
        model = transformers.AutoModel.from_pretrained(path, quantization_config=qbert.QbertConfig(fmt))
    else:
        model = transformers.AutoModel.from_pretrained(path)
        if mode == "float-read":  # what running the model does to the memory-mapped checkpoint's pages
            for tensor in model.state_dict().values():
                tensor.sum()
        if mode == "after-load":
            qbert.quantize(model, fmt)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[:] = map(max, peak, _rss_bytes())
    result = {"mode": mode, "load_s": seconds, "peak_rss_bytes": peak[0] - baseline[0],
              "peak_anon_bytes": peak[1] - baseline[1],
              "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}
    if mode in ("on-load", "after-load"):
        with tempfile.TemporaryDirectory() as saved:
            model.save_pretrained(saved)
            result["saved_bytes"] = sum(p.stat().st_size for p in Path(saved).iterdir())
    return result


def _measure(mode: str, path: str, fmt: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode, path, fmt], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.machine()


def _save_random_model(sizes: dict, directory: str) -> int:
    import torch
    import transformers

    torch.manual_seed(SEED)
    transformers.BertModel(transformers.BertConfig(**sizes)).save_pretrained(directory)
    return sum(p.stat().st_size for p in Path(directory).iterdir())


def _markdown(meta: dict, rows: list[dict]) -> str:
    intro = (f"{meta['date']}, {meta['device']}, Python {meta['python']}, torch {meta['torch']}, transformers "
             f"{meta['transformers']}; checkpoint {meta['checkpoint_bytes'] / MIB:.0f} MiB (float32 safetensors). "
             f"Each row is a fresh process; memory is the peak minus the value just before the load.")
    header = ("| load | peak RSS (MiB) | peak anonymous RSS (MiB) | model tensors (MiB) | saved directory (MiB) "
              "| time (s) |")
    lines = [f"# Peak memory of from_pretrained: {meta['model']} ({meta['format']})", "", intro, "", header,
             "|---|---|---|---|---|---|"]
    for row in rows:
        saved = f"{row['saved_bytes'] / MIB:.0f}" if "saved_bytes" in row else "—"
        lines.append(f"| {MODES[row['mode']]} | {row['peak_rss_bytes'] / MIB:.0f} | "
                     f"{row['peak_anon_bytes'] / MIB:.0f} | {row['model_bytes'] / MIB:.0f} | {saved} | "
                     f"{row['load_s']:.1f} |")
    reading = ("Reading: on the CPU, transformers maps the safetensors checkpoint and its float tensors are views "
               "of the file's pages, so peak RSS counts every page a load reads (file-backed page cache, which the "
               "kernel can drop) and peak anonymous RSS is the memory the process holds. Quantizing on load holds "
               "the quantized model plus one layer's float weight at a time; on the CPU, quantizing after a float "
               "load costs about as much, as its float tensors are file views too. Where a load copies the float "
               "weights (to a GPU with device_map), quantizing on load keeps the float model from ever being "
               "resident at once.")
    lines += ["", reading]
    return "\n".join(lines) + "\n"


def run(smoke: bool, out_dir: Path, fmt: str, device_tag: str) -> Path:
    import torch
    import transformers

    sizes = SMOKE if smoke else BERT_LARGE
    with tempfile.TemporaryDirectory() as checkpoint:
        checkpoint_bytes = _save_random_model(sizes, checkpoint)
        rows = [_measure(mode, checkpoint, fmt) for mode in MODES]
    meta = {"model": "tiny BERT (smoke)" if smoke else "BERT-large (random init)", "format": fmt,
            "date": datetime.date.today().isoformat(), "device": _cpu_name(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "checkpoint_bytes": checkpoint_bytes, "sizes": sizes}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}-{device_tag}-{SUITE}{'-smoke' if smoke else ''}"
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    report = out_dir / f"{stem}.md"
    report.write_text(_markdown(meta, rows))
    print(report.read_text())
    return report


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model instead of BERT-large")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--format", default="w8a8", help="the qbert format (default w8a8)")
    parser.add_argument("--device-tag", default="cpu", help="names the results: DATE-TAG-load_memory.md")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return None
    return run(args.smoke, args.out, args.format, args.device_tag)


if __name__ == "__main__":
    main()
