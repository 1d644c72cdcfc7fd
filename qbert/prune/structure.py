"""The physical surgery of structured pruning: remove attention heads, FFN neurons and whole layers.

A layer of a BERT-family encoder, with hidden size h, H heads of size d and n FFN neurons:

    q, k, v = x Wq^T + bq, x Wk^T + bk, x Wv^T + bv      Wq, Wk, Wv: [H*d, h]; head j owns rows j*d..j*d+d-1
    a = o(concat_j softmax(q_j k_j^T / sqrt(d)) v_j)     Wo: [h, H*d]; head j owns the same columns of Wo
    y = down(act(up(a)))                                 Wup: [n, h] (row i + bias i), Wdown: [h, n] (column i)

so removing head j deletes its d rows of Wq, Wk, Wv (and biases) and its d columns of Wo, and removing
neuron i deletes row i of Wup (and bias i) and column i of Wdown. The output is unchanged wherever the
removed slices contributed nothing (a head whose columns of Wo are zero, or whose input of o is masked to
zero); otherwise it equals the unpruned model with those slices masked. A removed layer is the identity.

Transformers 5 reshapes with ``view(*input_shape, -1, attention_head_size)``, so a layer with fewer heads
runs once its Linear layers have the smaller shapes and its head-count attributes say so; the layers of
one model may keep different numbers of heads and neurons. The per-layer shapes are recorded in
``config.qbert_pruning`` (``{"version": 1, "heads": [...], "intermediate": [...]}``, one count per
current layer), which the config's JSON carries, so ``apply_structure`` can resize a model freshly built
from that config before its weights are loaded.

Families: the BERT layout (``model_type`` bert, roberta, electra; MiniLM is a BertModel) and DistilBERT.
ALBERT shares one layer across every depth, so a per-layer structure does not exist there; other families
are refused too. Prune the float model: quantized and fake-quantized layers are refused.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

RECORD_ATTR = "qbert_pruning"  # the config attribute holding the record
RECORD_VERSION = 1
RECORD_KEYS = ("version", "heads", "intermediate")
ATTENTION_PIECES = ("query", "key", "value", "out")
FFN_PIECES = ("up", "down")
PIECES = ATTENTION_PIECES + FFN_PIECES
# Multiply-accumulates counted as two floating-point operations (a multiply and an add).
FLOPS_PER_MAC = 2
ATTENTION_MATMULS = 2  # the scores Q K^T and the weighted sum P V, each seq x seq x (H*d) MACs
DEFAULT_SEQ_LEN = 128  # tokens per sequence at which FLOPs and latency are counted (a common BERT length)


class PruneError(ValueError):
    """A pruning request, record or model that structured pruning cannot handle."""


@dataclass(frozen=True)
class _Layout:
    """Where a family keeps its layers and their pieces (module paths relative to one layer).

    layer_list: the tail of the layer ModuleList's name; layers_field: the config's layer count;
    heads_field / intermediate_field: the config's built head and neuron counts per layer;
    attention: the module holding the head attributes; heads_attr: its head count; width_attr: its
    H*d width attribute; list_owner_count: a layer-count attribute on the module owning the list, if any."""

    layer_list: str
    layers_field: str
    heads_field: str
    intermediate_field: str
    attention: str
    heads_attr: str
    width_attr: str
    list_owner_count: str | None
    linears: Mapping[str, str]


_BERT_LAYOUT = _Layout(
    layer_list="encoder.layer", layers_field="num_hidden_layers", heads_field="num_attention_heads",
    intermediate_field="intermediate_size", attention="attention.self", heads_attr="num_attention_heads",
    width_attr="all_head_size", list_owner_count=None,
    linears={"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "out": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"})
# DistilBERT's attention keeps ``dim`` = n_heads * attention_head_size once pruned, the invariant its
# __init__ checks (it is the hidden size only while every head is kept), as transformers' former
# DistilBERT prune_heads did; the forward reads n_heads' slices through attention_head_size alone.
_DISTILBERT_LAYOUT = _Layout(
    layer_list="transformer.layer", layers_field="n_layers", heads_field="n_heads",
    intermediate_field="hidden_dim", attention="attention", heads_attr="n_heads", width_attr="dim",
    list_owner_count="n_layers",
    linears={"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
             "out": "attention.out_lin", "up": "ffn.lin1", "down": "ffn.lin2"})
LAYOUTS: dict[str, _Layout] = {"bert": _BERT_LAYOUT, "roberta": _BERT_LAYOUT, "electra": _BERT_LAYOUT,
                               "distilbert": _DISTILBERT_LAYOUT}


@dataclass(frozen=True)
class LayerView:
    """One encoder layer as pruning sees it: a snapshot, to be taken again after a ``remove_*``.

    index: position in the encoder; name: dotted module path of the layer; heads: current head count;
    head_size: d; intermediate: current FFN neuron count; hidden: h (the input width of q/k/v and up);
    layer: the layer module; attention: the module holding the head-count attributes;
    modules / names: piece -> Linear module / dotted module name, pieces ``query, key, value, out, up,
    down`` (also attributes: ``view.query``)."""

    index: int
    name: str
    heads: int
    head_size: int
    intermediate: int
    hidden: int
    layer: nn.Module
    attention: nn.Module
    modules: Mapping[str, nn.Module]
    names: Mapping[str, str]

    @property
    def query(self) -> nn.Module:
        return self.modules["query"]

    @property
    def key(self) -> nn.Module:
        return self.modules["key"]

    @property
    def value(self) -> nn.Module:
        return self.modules["value"]

    @property
    def out(self) -> nn.Module:
        return self.modules["out"]

    @property
    def up(self) -> nn.Module:
        return self.modules["up"]

    @property
    def down(self) -> nn.Module:
        return self.modules["down"]


@dataclass(frozen=True)
class _Encoder:
    config: object
    layout: _Layout
    list_name: str
    layers: nn.ModuleList
    list_owner: nn.Module


def _find_config(model: nn.Module):
    """The first Hugging Face config (``.config`` with a ``model_type``) in module order, else None; a
    wrapper's ``config`` is its encoder's."""
    for _, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "model_type"):
            return config
    return None


def _encoder(model: nn.Module, caller: str) -> _Encoder:
    config = _find_config(model)
    if config is None:
        raise PruneError(f"{caller}: no Hugging Face config (a module with .config.model_type) in "
                         f"{type(model).__name__}")
    model_type = config.model_type
    if model_type == "albert":
        raise PruneError(f"{caller}: ALBERT shares one layer across every depth, so it has no per-layer "
                         f"heads or neurons to remove; supported families: {sorted(LAYOUTS)}")
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise PruneError(f"{caller}: model_type {model_type!r} is not supported; supported families: "
                         f"{sorted(LAYOUTS)}")
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList)
             and (name == layout.layer_list or name.endswith("." + layout.layer_list))]
    if len(found) != 1:
        raise PruneError(f"{caller}: expected one layer list named *{layout.layer_list} in the "
                         f"{model_type} model, found {[name for name, _ in found]}")
    list_name, layers = found[0]
    owner_name = list_name.rpartition(".")[0]
    return _Encoder(config, layout, list_name, layers, model.get_submodule(owner_name))


def _views(encoder: _Encoder, caller: str) -> list[LayerView]:
    layout, views = encoder.layout, []
    for index, layer in enumerate(encoder.layers):
        name = f"{encoder.list_name}.{index}"
        attention = layer.get_submodule(layout.attention)
        modules = {piece: layer.get_submodule(path) for piece, path in layout.linears.items()}
        heads, head_size = getattr(attention, layout.heads_attr), attention.attention_head_size
        view = LayerView(index=index, name=name, heads=heads, head_size=head_size,
                         intermediate=modules["up"].out_features, hidden=modules["query"].in_features,
                         layer=layer, attention=attention, modules=modules,
                         names={piece: f"{name}.{path}" for piece, path in layout.linears.items()})
        width = heads * head_size
        shapes = {"query.out_features": view.query.out_features, "key.out_features": view.key.out_features,
                  "value.out_features": view.value.out_features, "out.in_features": view.out.in_features}
        wrong = {field: size for field, size in shapes.items() if size != width}
        if view.down.in_features != view.intermediate:
            wrong["down.in_features"] = view.down.in_features
        if wrong:
            raise PruneError(f"{caller}: {name} is inconsistent: {heads} heads of size {head_size} "
                             f"(width {width}) and {view.intermediate} neurons, but {wrong}")
        views.append(view)
    return views


def encoder_layers(model: nn.Module) -> list[LayerView]:
    """One ``LayerView`` per encoder layer, in order. Raises PruneError for an unsupported family."""
    return _views(_encoder(model, "encoder_layers"), "encoder_layers")


def require_plain(views: list[LayerView], caller: str) -> None:
    """PruneError unless every q/k/v/o/up/down of ``views`` is a plain ``nn.Linear`` (prune before quantizing)."""
    for view in views:
        for piece in PIECES:
            module = view.modules[piece]
            if type(module) is not nn.Linear:
                raise PruneError(f"{caller}: {view.names[piece]} is a {type(module).__name__}, not a plain "
                                 f"nn.Linear: prune before quantize / prepare_qat")


def _index(value, caller: str, what: str) -> int:
    if isinstance(value, bool):
        raise PruneError(f"{caller}: {what} must be an int index, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise PruneError(f"{caller}: {what} must be an int index, got {value!r}") from None


def _indices(values, size: int, caller: str, what: str, unit: str) -> list[int]:
    """``values`` as distinct ints in 0..size-1 (sorted), for ``what`` (e.g. ``"layer 3"``)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise PruneError(f"{caller}: {what}: expected an iterable of {unit} indices, got {values!r}")
    seen: list[int] = []
    for value in values:
        index = _index(value, caller, f"{what}: a {unit} index")
        if not 0 <= index < size:
            raise PruneError(f"{caller}: {what}: {unit} {index} out of range: there are {size} {unit}s "
                             f"(0..{size - 1})")
        if index in seen:
            raise PruneError(f"{caller}: {what}: {unit} {index} listed twice")
        seen.append(index)
    return sorted(seen)


def _removal(request, views: list[LayerView], caller: str, unit: str, size_of) -> dict[int, list[int]]:
    """The checked request {layer: sorted indices} of ``remove_heads`` / ``remove_neurons``."""
    if not isinstance(request, Mapping):
        raise PruneError(f"{caller}: expected a mapping layer index -> {unit} indices, got "
                         f"{type(request).__name__}")
    removal = {}
    for key, values in request.items():
        layer = _index(key, caller, "a layer index")
        if not 0 <= layer < len(views):
            raise PruneError(f"{caller}: layer {layer} out of range: the encoder has {len(views)} layers "
                             f"(0..{len(views) - 1})")
        size = size_of(views[layer])
        indices = _indices(values, size, caller, f"layer {layer}", unit)
        if len(indices) == size:
            raise PruneError(f"{caller}: layer {layer}: removing all {size} {unit}s leaves the layer empty; "
                             f"to drop the whole layer use remove_layers")
        removal[layer] = indices
    return removal


def _sliced(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding ``old``'s weight restricted to ``rows`` (output features; the bias too)
    and ``cols`` (input features), with old's dtype, device, requires_grad and training flags."""
    weight = old.weight.detach()
    bias = old.bias
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        if bias is not None:
            bias = nn.Parameter(bias.detach().index_select(0, rows.to(bias.device)),
                                requires_grad=old.bias.requires_grad)
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=old.weight.requires_grad)
    if bias is not None:
        new.bias = bias
    return new.train(old.training)


def _head_rows(kept: list[int], head_size: int) -> torch.Tensor:
    """The rows of q/k/v (columns of o) of the ``kept`` heads: h*d + 0..d-1 for each kept head h."""
    return (torch.tensor(kept)[:, None] * head_size + torch.arange(head_size)).flatten()


def _keep_heads(view: LayerView, layout: _Layout, kept: list[int]) -> None:
    rows = _head_rows(kept, view.head_size)
    for piece in ("query", "key", "value"):
        view.layer.set_submodule(layout.linears[piece], _sliced(view.modules[piece], rows=rows))
    view.layer.set_submodule(layout.linears["out"], _sliced(view.out, cols=rows))
    setattr(view.attention, layout.heads_attr, len(kept))
    setattr(view.attention, layout.width_attr, len(kept) * view.head_size)


def _keep_neurons(view: LayerView, layout: _Layout, kept: list[int]) -> None:
    index = torch.tensor(kept)
    view.layer.set_submodule(layout.linears["up"], _sliced(view.up, rows=index))
    view.layer.set_submodule(layout.linears["down"], _sliced(view.down, cols=index))


def _write_record(encoder: _Encoder, caller: str) -> None:
    views = _views(encoder, caller)
    setattr(encoder.config, RECORD_ATTR, {"version": RECORD_VERSION, "heads": [v.heads for v in views],
                                          "intermediate": [v.intermediate for v in views]})


def remove_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> None:
    """Physically remove attention heads, in place: ``heads[layer]`` lists indices among that layer's
    current heads (0-based). For each removed head j: rows j*d..j*d+d-1 of Wq, Wk, Wv and their biases,
    the same columns of Wo; the head-count attributes follow. Updates ``config.qbert_pruning``.

    Every index is checked before anything changes: PruneError for a layer or head out of range, a head
    listed twice, every head of a layer (use ``remove_layers``), or a layer that is not plain nn.Linear."""
    encoder = _encoder(model, "remove_heads")
    views = _views(encoder, "remove_heads")
    removal = _removal(heads, views, "remove_heads", "head", lambda view: view.heads)
    require_plain(views, "remove_heads")
    for layer, removed in removal.items():
        view = views[layer]
        _keep_heads(view, encoder.layout, [j for j in range(view.heads) if j not in removed])
    _write_record(encoder, "remove_heads")


def remove_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]]) -> None:
    """Physically remove FFN intermediate neurons, in place: ``neurons[layer]`` lists indices among that
    layer's current neurons. For each removed neuron i: row i of Wup and bias i, column i of Wdown.
    Updates ``config.qbert_pruning``; refuses as ``remove_heads`` does (every neuron of a layer:
    use ``remove_layers``)."""
    encoder = _encoder(model, "remove_neurons")
    views = _views(encoder, "remove_neurons")
    removal = _removal(neurons, views, "remove_neurons", "neuron", lambda view: view.intermediate)
    require_plain(views, "remove_neurons")
    for layer, removed in removal.items():
        view = views[layer]
        _keep_neurons(view, encoder.layout, [i for i in range(view.intermediate) if i not in removed])
    _write_record(encoder, "remove_neurons")


def remove_layers(model: nn.Module, layers: Iterable[int]) -> None:
    """Drop whole layers (indices among the current layers), in place: each becomes the identity on the
    residual stream. Updates the config's layer count (``num_hidden_layers``, ``n_layers`` for
    DistilBERT), renumbers the remaining layers' ``layer_idx`` (as a model built with fewer layers has
    them) and ``config.qbert_pruning``. PruneError for an index out of range or repeated, every layer, or
    a layer that is not plain nn.Linear."""
    encoder = _encoder(model, "remove_layers")
    views = _views(encoder, "remove_layers")
    removed = _indices(layers, len(views), "remove_layers", "layers", "layer")
    if len(removed) == len(views):
        raise PruneError(f"remove_layers: removing all {len(views)} layers leaves no encoder")
    require_plain(views, "remove_layers")
    for index in reversed(removed):
        del encoder.layers[index]
    for index, layer in enumerate(encoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    setattr(encoder.config, encoder.layout.layers_field, len(encoder.layers))
    if encoder.layout.list_owner_count is not None:
        setattr(encoder.list_owner, encoder.layout.list_owner_count, len(encoder.layers))
    _write_record(encoder, "remove_layers")


def pruning_record(model: nn.Module) -> dict | None:
    """A copy of ``config.qbert_pruning`` (``{"version": 1, "heads": [kept heads per layer],
    "intermediate": [kept neurons per layer]}``), or None when the model was not pruned (or has no
    Hugging Face config)."""
    config = _find_config(model)
    record = getattr(config, RECORD_ATTR, None) if config is not None else None
    return copy.deepcopy(record)


def _checked_counts(record: Mapping, field: str, layers: int, built: int) -> list[int]:
    counts = record[field]
    if not isinstance(counts, (list, tuple)):
        raise PruneError(f"apply_structure: record field {field!r} must be a list, got {type(counts).__name__}")
    if len(counts) != layers:
        raise PruneError(f"apply_structure: record field {field!r} has {len(counts)} entries, the model has "
                         f"{layers} layers")
    for layer, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= built:
            raise PruneError(f"apply_structure: record field {field!r}[{layer}] must be an int in "
                             f"1..{built} (the built size), got {count!r}")
    return list(counts)


def _checked_record(record, layers: int, built_heads: int, built_intermediate: int) -> dict:
    if not isinstance(record, Mapping):
        raise PruneError(f"apply_structure: the record must be a dict, got {type(record).__name__}")
    if set(record) != set(RECORD_KEYS):
        raise PruneError(f"apply_structure: the record must have exactly the fields {list(RECORD_KEYS)}, got "
                         f"{sorted(map(str, record))}")
    version = record["version"]
    if isinstance(version, bool) or version != RECORD_VERSION:
        raise PruneError(f"apply_structure: record field 'version' must be {RECORD_VERSION}, got {version!r}")
    return {"version": RECORD_VERSION, "heads": _checked_counts(record, "heads", layers, built_heads),
            "intermediate": _checked_counts(record, "intermediate", layers, built_intermediate)}


def apply_structure(model: nn.Module, record: Mapping | None = None) -> nn.Module:
    """Resize a model freshly built from a pruned config to the record's per-layer shapes, in place, and
    return it: layer i keeps its first ``heads[i]`` heads and first ``intermediate[i]`` neurons (new
    nn.Linear layers of the same dtype and device, any device including meta); the values are to be loaded
    afterwards. record None: ``config.qbert_pruning``; absent too: the model is returned unchanged.

    The record is validated first (version, fields, types, one count per layer, counts in 1..the config's
    built size): PruneError naming the field. A layer smaller than the record asks is refused (apply the
    record to a freshly built model). Sets ``config.qbert_pruning`` to the record."""
    if record is None:
        config = _find_config(model)
        record = getattr(config, RECORD_ATTR, None) if config is not None else None
        if record is None:
            return model
    encoder = _encoder(model, "apply_structure")
    views = _views(encoder, "apply_structure")
    layout = encoder.layout
    checked = _checked_record(record, len(views), getattr(encoder.config, layout.heads_field),
                              getattr(encoder.config, layout.intermediate_field))
    require_plain(views, "apply_structure")
    for view, heads, intermediate in zip(views, checked["heads"], checked["intermediate"], strict=True):
        if heads > view.heads or intermediate > view.intermediate:
            raise PruneError(f"apply_structure: {view.name} has {view.heads} heads and {view.intermediate} "
                             f"neurons, the record asks for {heads} and {intermediate}: apply the record to "
                             f"a model freshly built from its config")
    for view, heads, intermediate in zip(views, checked["heads"], checked["intermediate"], strict=True):
        if heads < view.heads:
            _keep_heads(view, layout, list(range(heads)))
        if intermediate < view.intermediate:
            _keep_neurons(view, layout, list(range(intermediate)))
    setattr(encoder.config, RECORD_ATTR, checked)
    return model


def single_layer_encoder(model: nn.Module, index: int, heads: int | None = None,
                         intermediate: int | None = None) -> nn.Module:
    """A copy of the module holding ``model``'s encoder layers (``BertEncoder``, DistilBERT's
    ``Transformer``) that holds one layer only: a copy of layer ``index`` keeping its first ``heads`` heads
    and first ``intermediate`` neurons (None: all of them). ``model`` is left untouched; the copy runs on
    hidden states [batch, seq, h] like the encoder, e.g. to time a layer at a candidate shape. PruneError
    for an index or a count out of range, or a layer that is not plain nn.Linear."""
    caller = "single_layer_encoder"
    encoder = _encoder(model, caller)
    views = _views(encoder, caller)
    view = views[_indices([index], len(views), caller, "layers", "layer")[0]]
    require_plain([view], caller)
    counts = {"heads": (heads, view.heads), "intermediate": (intermediate, view.intermediate)}
    for what, (count, size) in counts.items():
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= size):
            raise PruneError(f"{caller}: {what} must be an int in 1..{size} ({view.name} has {size}), got {count!r}")
    layers = nn.ModuleList([copy.deepcopy(view.layer)])
    # The copied owner gets the one-layer list in place of the original list (deepcopy's memo), so the
    # other layers are never copied.
    owner = copy.deepcopy(encoder.list_owner, memo={id(encoder.layers): layers})
    if encoder.layout.list_owner_count is not None:
        setattr(owner, encoder.layout.list_owner_count, len(layers))
    copied = _views(_Encoder(encoder.config, encoder.layout, view.name, layers, owner), caller)[0]
    if heads is not None and heads < view.heads:
        _keep_heads(copied, encoder.layout, list(range(heads)))
    if intermediate is not None and intermediate < view.intermediate:
        _keep_neurons(copied, encoder.layout, list(range(intermediate)))
    return owner


def _linear_parameters(module: nn.Module) -> int:
    """in*out weights plus out biases (counted from the shapes, so a packed QLinear counts the same)."""
    bias = module.out_features if getattr(module, "bias", None) is not None else 0
    return module.in_features * module.out_features + bias


def layer_parameters(view: LayerView) -> int:
    """Weights and biases of the layer's q, k, v, o, up and down: with biases,
    3*(h*H*d + H*d) + (H*d*h + h) + (h*n + n) + (n*h + h)."""
    return sum(_linear_parameters(view.modules[piece]) for piece in PIECES)


def layer_flops(view: LayerView, seq_len: int) -> int:
    """Floating-point operations of one layer over one sequence of ``seq_len`` tokens, multiply-accumulates
    counted twice: linears 2*seq*(4*h*H*d + 2*h*n) (q, k, v, o; up, down) plus the attention scores
    Q K^T and the weighted sum P V, 2*2*seq*seq*H*d (h hidden, H heads, d head size, n neurons).
    Biases, softmax, LayerNorm and activations are left out."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise PruneError(f"layer_flops: seq_len must be a positive int, got {seq_len!r}")
    h, width, n = view.hidden, view.heads * view.head_size, view.intermediate
    linears = FLOPS_PER_MAC * seq_len * (len(ATTENTION_PIECES) * h * width + len(FFN_PIECES) * h * n)
    attention = FLOPS_PER_MAC * ATTENTION_MATMULS * seq_len * seq_len * width
    return linears + attention


__all__ = ["DEFAULT_SEQ_LEN", "LayerView", "PruneError", "apply_structure", "encoder_layers", "layer_flops", "layer_parameters",
           "pruning_record", "remove_heads", "remove_layers", "remove_neurons", "require_plain",
           "single_layer_encoder"]
