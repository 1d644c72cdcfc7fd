"""The CPU runtimes BERT encoders are deployed with, as peers of qbert's rows in the end-to-end benchmark.

Every peer is built from the same float ``BertModel`` the qbert rows quantize, exported once per workload
(``Exports``) to ONNX under a temporary directory:

* export: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter), opset ``OPSET``, inputs
  ``input_ids`` and ``attention_mask`` [batch, seq] with both axes dynamic, output the last hidden state,
  traced from a copy of the model switched to eager attention on a sample with a padded row. That graph
  is the one ONNX Runtime's BERT optimizer recognises: it fuses the embeddings + LayerNorm, every
  self-attention (mask included) into one ``Attention`` op, the residual adds into
  ``SkipLayerNormalization`` and bias + GELU into ``BiasGelu``. (The torch.export-based exporter's graph
  gets no ``Attention`` fusion from the optimizer, nor does an SDPA trace.)
* ``ORT fp32``: that optimized graph in an ONNX Runtime CPU session.
* ``ORT int8``: the optimized graph through ``onnxruntime.quantization.quantize_dynamic`` with int8
  weights per channel (QInt8, ``per_channel=True``) and ORT's default operator set: every MatMul and the
  fused ``Attention``'s input projection become int8 (activations quantized per tensor at run time), and
  the embedding tables int8 (``QEmbedLayerNormalization``).
* ``OpenVINO int8``: the exported graph read by OpenVINO and quantized by NNCF's post-training
  quantization (``nncf.quantize``, ``ModelType.TRANSFORMER``: int8 weights per channel, int8 activations
  per tensor with static ranges from a calibration batch the benchmark never times, SmoothQuant and
  bias correction), compiled for the CPU with float32 as the precision of the layers it leaves in
  float (``OV_CONFIG``; OpenVINO would otherwise pick bf16 on CPUs that have it, as qbert does not).

Sessions run with ``threads`` intra-op threads, one inter-op thread, sequential execution (one stream and
the latency hint for OpenVINO). A peer whose package is missing, or that fails to build, raises
``PeerUnavailable`` with the reason; the benchmark lists it as unsupported.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from qbert.benchmarks import _harness as H

OPSET = 17  # ONNX Runtime 1.x's BERT fusions and OpenVINO's ONNX reader both cover it
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"
DYNAMIC_AXES = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
EXPORT_SAMPLE_SHAPE = (2, 8)  # [batch, seq] traced; the second row is padded, so the mask path is traced
INSTALL_HINT = "pip install qbert[bench]"
PACKAGES = ("onnxruntime", "onnx", "openvino", "nncf")
ORT_FP32, ORT_INT8, OPENVINO_INT8 = "ORT fp32", "ORT int8", "OpenVINO int8"
# The fusions ONNX Runtime's optimizer must find for the peer to be the runtime as deployed; each one per
# encoder layer.
REQUIRED_FUSIONS = ("Attention",)
OV_CONFIG = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


class PeerUnavailable(RuntimeError):
    """A peer that cannot be built here (its package is missing, or a build step failed); the message is
    the reason the benchmark records."""


def require(package: str) -> ModuleType:
    """``import package``, or ``PeerUnavailable`` saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == package:
            raise PeerUnavailable(f"{package} is not installed: {INSTALL_HINT}") from exc
        raise PeerUnavailable(f"{package} failed to import ({exc}): {INSTALL_HINT}") from exc


def _runtime_failures() -> tuple[type[BaseException], ...]:
    """The exceptions by which the installed runtimes report a graph they cannot build or run (ONNX
    Runtime's and onnx's derive from Exception only)."""
    failures: list[type[BaseException]] = [RuntimeError, ValueError, NotImplementedError]
    with contextlib.suppress(ImportError):
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        failures += [state.Fail, state.InvalidArgument, state.InvalidGraph, state.RuntimeException,
                     state.NotImplemented]
    with contextlib.suppress(ImportError):
        from onnx.checker import ValidationError

        failures.append(ValidationError)
    return tuple(failures)


@contextlib.contextmanager
def _as_unavailable(what: str):
    """Turn a runtime's build or run failure inside the block into ``PeerUnavailable`` naming ``what``."""
    try:
        yield
    except PeerUnavailable:
        raise
    except _runtime_failures() as exc:
        raise PeerUnavailable(f"{what}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc


class _LastHiddenState(torch.nn.Module):
    """``BertModel`` as the exported graph sees it: (input_ids, attention_mask) -> last hidden state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class Exports:
    """The ONNX files of one float model, each made on first use, under a temporary directory that
    ``close()`` removes: ``raw`` (the export), ``optimized`` (ORT's BERT fusions), ``int8`` (dynamic int8)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._dir = tempfile.TemporaryDirectory(prefix="qbert-e2e-onnx-")
        self._paths: dict[str, Path] = {}
        self.fusions: dict[str, int] = {}  # fused operator -> count in the optimized graph

    def close(self) -> None:
        self._dir.cleanup()

    def _path(self, name: str) -> Path:
        return Path(self._dir.name) / f"{name}.onnx"

    def raw(self) -> Path:
        if "raw" not in self._paths:
            require("onnx")
            path = self._path("raw")
            # The tracer needs ordinary tensors, whatever mode the caller is in (a copy made under
            # inference mode would hold inference tensors).
            with torch.inference_mode(False), torch.no_grad():
                eager = copy.deepcopy(self.model).float().cpu().eval()
                eager.set_attn_implementation("eager")  # the attention pattern the optimizer fuses
                # A module in train mode is put back into it after the export, children included: eval it.
                wrapper = _LastHiddenState(eager).eval()
                batch, seq = EXPORT_SAMPLE_SHAPE
                ids = torch.arange(batch * seq).reshape(batch, seq) % eager.config.vocab_size
                mask = torch.ones_like(ids)
                mask[-1, seq // 2:] = 0
                self._export(wrapper, ids, mask, path)
            self._paths["raw"] = path
        return self._paths["raw"]

    @staticmethod
    def _export(wrapper: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, path: Path) -> None:
        with _as_unavailable("ONNX export"), warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation, warns about its decomposition of advanced
            # indexing, and traces transformers' mask helper's "pad the mask to the key length" test (never
            # true here: both are the sequence axis).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(wrapper, (ids, mask), str(path), input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES, opset_version=OPSET,
                              dynamo=False)

    def optimized(self) -> Path:
        if "optimized" not in self._paths:
            require("onnxruntime")
            from onnxruntime.transformers.optimizer import optimize_model

            config = self.model.config
            path = self._path("optimized")
            with _as_unavailable("ONNX Runtime's BERT optimizer"):
                optimized = optimize_model(str(self.raw()), model_type="bert",
                                           num_heads=config.num_attention_heads, hidden_size=config.hidden_size)
                optimized.save_model_to_file(str(path))
            self.fusions = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
            for op in REQUIRED_FUSIONS:
                if self.fusions.get(op, 0) != config.num_hidden_layers:
                    raise PeerUnavailable(f"ONNX Runtime's BERT optimizer fused {self.fusions.get(op, 0)} {op} "
                                          f"ops for {config.num_hidden_layers} encoder layers")
            self._paths["optimized"] = path
        return self._paths["optimized"]

    def int8(self) -> Path:
        if "int8" not in self._paths:
            require("onnxruntime")
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic

            path = self._path("int8")
            with _as_unavailable("ONNX Runtime quantize_dynamic"):
                # ONNX shape inference cannot type the outputs of the fused (com.microsoft) ops; they are
                # float32.
                quantize_dynamic(str(self.optimized()), str(path), weight_type=QuantType.QInt8, per_channel=True,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            self._paths["int8"] = path
        return self._paths["int8"]


def feed(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A peer's inputs from a forward's keyword arguments: ``attention_mask`` all ones when there is none
    (the exported graph always takes one)."""
    ids = inputs["input_ids"].cpu()
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.cpu()
    return {"input_ids": ids.numpy(), "attention_mask": mask.to(ids.dtype).numpy()}


class OrtPeer:
    """An ONNX Runtime CPU session over one graph; ``peer(feed)`` is the last hidden state [batch, seq,
    hidden] float32."""

    def __init__(self, name: str, path: Path, threads: int) -> None:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.name = name
        with _as_unavailable(f"{name} session"):
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, inputs: dict[str, np.ndarray]) -> torch.Tensor:
        with _as_unavailable(self.name):
            return torch.from_numpy(self.session.run([OUTPUT_NAME], inputs)[0])


class OpenVinoPeer:
    """An OpenVINO CPU infer request over a compiled model; ``peer(feed)`` as ``OrtPeer``'s."""

    def __init__(self, name: str, model: Any, threads: int) -> None:
        ov = require("openvino")
        self.name = name
        with _as_unavailable(f"{name} compile"):
            compiled = ov.Core().compile_model(model, "CPU", {**OV_CONFIG, "INFERENCE_NUM_THREADS": threads})
            self.request = compiled.create_infer_request()

    def __call__(self, inputs: dict[str, np.ndarray]) -> torch.Tensor:
        with _as_unavailable(self.name):
            return torch.from_numpy(self.request.infer(inputs)[0])


def ort_fp32(exports: Exports, threads: int) -> OrtPeer:
    return OrtPeer(ORT_FP32, exports.optimized(), threads)


def ort_int8(exports: Exports, threads: int) -> OrtPeer:
    return OrtPeer(ORT_INT8, exports.int8(), threads)


def openvino_int8(exports: Exports, threads: int, calibration: dict[str, torch.Tensor]) -> OpenVinoPeer:
    """NNCF's static int8 of the exported graph, calibrated on ``calibration`` (forward keyword
    arguments, never the timed inputs)."""
    ov = require("openvino")
    nncf = require("nncf")
    with _as_unavailable("OpenVINO read / NNCF quantize"):
        model = ov.Core().read_model(str(exports.raw()))
        quantized = nncf.quantize(model, nncf.Dataset([feed(calibration)]), subset_size=1,
                                  model_type=nncf.ModelType.TRANSFORMER)
    return OpenVinoPeer(OPENVINO_INT8, quantized, threads)


def versions() -> dict[str, str]:
    """Installed versions of the peers' packages (from their metadata; nothing is imported)."""
    return {package: H.package_version(package) for package in PACKAGES}


def describe(threads: int) -> dict[str, Any]:
    """How the peers are built and run, for the results' metadata."""
    return {
        "export": f"torch.onnx.export TorchScript exporter (dynamo=False), opset {OPSET}, eager attention, "
                  "dynamic batch and sequence axes, inputs input_ids + attention_mask",
        ORT_FP32: "onnxruntime.transformers.optimizer.optimize_model(model_type='bert')",
        ORT_INT8: "optimized graph + quantize_dynamic(weight_type=QInt8, per_channel=True), default op types",
        OPENVINO_INT8: "nncf.quantize(model_type=TRANSFORMER) static int8 (per-channel weights, per-tensor "
                       "activations calibrated on one untimed batch), CPU plugin, float layers in f32",
        "ort_session": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                        "execution_mode": "sequential", "graph_optimization_level": "all"},
        "openvino_config": {**OV_CONFIG, "INFERENCE_NUM_THREADS": threads},
        "versions": versions(),
    }
