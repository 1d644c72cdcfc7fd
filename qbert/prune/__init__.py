"""Structured pruning of BERT-family encoders: attention heads, FFN neurons and whole layers, removed
physically so that the speedup is real in eager mode and on every backend.

A layer with hidden size h, H heads of size d and n FFN neurons computes

    a = x + o(concat_j softmax(q_j k_j^T / sqrt(d)) v_j),    y = a + down(act(up(a)))    (LayerNorms aside)

Head j owns d rows of Wq, Wk, Wv (and biases) and the same d columns of Wo; neuron i owns row i of Wup
(and bias i) and column i of Wdown; a layer is removed by making it the identity on the residual stream.

  * ``structure``: the surgery (``remove_heads``, ``remove_neurons``, ``remove_layers``), the per-layer
    shapes recorded in ``config.qbert_pruning`` and ``apply_structure`` to rebuild them before loading,
    and the counts ``layer_parameters`` and ``layer_flops`` (2*seq*(4*h*H*d + 2*h*n) + 4*seq^2*H*d).
  * ``scores``: importance on calibration data. taylor (Michel et al. 2019): I_u = sum_b |dL_b/dxi_u| for
    a gate xi of ones on the unit's contribution; hessian (HAWQ-V2): I_u = Tr(H_u)/n_u * ||W_u||^2, the
    second-order loss change of zeroing the unit's weight slice, Tr(H_u) by Hutchinson's estimator
    through ``qbert.hessian``; for layers the gate's exact second derivative d^2L/dg_l^2.
  * ``select``: ``prune_heads``, ``prune_ffn`` (optionally keeping a multiple of ``multiple_of`` neurons)
    and ``prune_layers`` under one budget -- a count, a fraction, or (heads, neurons) a FLOP or a measured
    latency limit chosen exactly by the multiple-choice knapsack of ``qbert.allocate.solvers`` --
    minimising the sum of the removed scores, with a ``PruneSummary`` of what was removed and saved.
  * ``latency``: ``measure_layer_latency`` times each layer at its candidate head / neuron counts (as it
    is, or quantized to the format it will run in) into the ``LatencyTable`` a latency budget reads.

Prune the float model, then quantize; pruned models save and load like any other.
"""

from qbert.prune.latency import LatencyTable, measure_layer_latency
from qbert.prune.scores import DEFAULT_PROBES, METHODS, head_importance, layer_importance, neuron_importance
from qbert.prune.select import PruneSummary, prune_ffn, prune_heads, prune_layers
from qbert.prune.structure import (
    DEFAULT_SEQ_LEN,
    LayerView,
    PruneError,
    apply_structure,
    encoder_layers,
    layer_flops,
    layer_parameters,
    pruning_record,
    remove_heads,
    remove_layers,
    remove_neurons,
    single_layer_encoder,
)

__all__ = ["DEFAULT_PROBES", "DEFAULT_SEQ_LEN", "METHODS", "LatencyTable", "LayerView", "PruneError",
           "PruneSummary", "apply_structure", "encoder_layers", "head_importance", "layer_flops",
           "layer_importance", "layer_parameters", "measure_layer_latency", "neuron_importance", "prune_ffn",
           "prune_heads", "prune_layers", "pruning_record", "remove_heads", "remove_layers", "remove_neurons",
           "single_layer_encoder"]
