"""Tiny random-init Hugging Face encoders of every tested family (built offline from configs, no hub)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

SEED = 0
VOCAB = 1000
HIDDEN = 64
EMBEDDING = 32  # ALBERT / ELECTRA factorize the embeddings: embedding_size -> hidden_size
LAYERS = 2
HEADS = 4
FFN = 128
BATCH, SEQ, PADDED = 2, 16, 5  # the second sequence ends with PADDED padding tokens
CHOICES = 2  # multiple-choice inputs are [BATCH, CHOICES, SEQ]

_COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "intermediate_size": FFN}
CONFIGS = {
    "bert": lambda: transformers.BertConfig(**_COMMON),
    # MiniLM is a BertModel: deeper and narrower per head than the others here.
    "minilm": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3,
                                              num_attention_heads=HEADS, intermediate_size=384),
    "roberta": lambda: transformers.RobertaConfig(**_COMMON),
    "distilbert": lambda: transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                                        n_heads=HEADS, hidden_dim=FFN),
    "albert": lambda: transformers.AlbertConfig(embedding_size=EMBEDDING, **_COMMON),
    "electra": lambda: transformers.ElectraConfig(embedding_size=EMBEDDING, **_COMMON),
}
BASE_MODELS = {"bert": "BertModel", "minilm": "BertModel", "roberta": "RobertaModel",
               "distilbert": "DistilBertModel", "albert": "AlbertModel", "electra": "ElectraModel"}
# Classes with heads, per family (the family of a class is the lower-cased prefix of its name).
HEAD_MODELS = [
    "BertForPreTraining", "BertForSequenceClassification", "BertForQuestionAnswering",
    "BertForMultipleChoice",
    "RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaForTokenClassification",
    "DistilBertForMaskedLM", "DistilBertForSequenceClassification", "DistilBertForQuestionAnswering",
    "AlbertForPreTraining", "AlbertForMaskedLM", "AlbertForSequenceClassification",
    "ElectraForPreTraining", "ElectraForMaskedLM", "ElectraForSequenceClassification",
    "ElectraForMultipleChoice",
]
FAMILY_OF_CLASS = {"Bert": "bert", "Roberta": "roberta", "DistilBert": "distilbert", "Albert": "albert",
                   "Electra": "electra"}


def family_of_class(class_name: str) -> str:
    for prefix in sorted(FAMILY_OF_CLASS, key=len, reverse=True):
        if class_name.startswith(prefix):
            return FAMILY_OF_CLASS[prefix]
    raise KeyError(f"no tiny config for {class_name}")


def build(class_name: str, family: str | None = None, **config_overrides) -> nn.Module:
    """A random-init model of ``class_name`` in eval mode, the same weights for the same arguments."""
    config = CONFIGS[family or family_of_class(class_name)]()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(SEED)
    return getattr(transformers, class_name)(config).eval()


def inputs(class_name: str = "") -> dict[str, torch.Tensor]:
    """Token ids and an attention mask with padding; [batch, choices, seq] for multiple choice."""
    g = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, SEQ - PADDED:] = 0
    if class_name.endswith("MultipleChoice"):
        input_ids = input_ids[:, None].repeat(1, CHOICES, 1)
        attention_mask = attention_mask[:, None].repeat(1, CHOICES, 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def first_output(model: nn.Module, class_name: str = "") -> torch.Tensor:
    """The model's first output tensor (last hidden state, logits, prediction logits, ...), with the rows
    of padding tokens zeroed when it has one per token: outputs at padding positions carry no meaning,
    and the unpadded W8A8 encoder (qbert.nn.unpad) leaves them zero."""
    batch = inputs(class_name)
    with torch.no_grad():
        out = model(**batch)[0]
    mask = batch["attention_mask"]
    if out.shape[:mask.dim()] == mask.shape and out.dim() > mask.dim():
        out = out * mask[..., None].to(out.dtype)
    return out


def linear_names(model: nn.Module, kind: type = nn.Linear) -> set[str]:
    return {name for name, module in model.named_modules(remove_duplicate=False) if type(module) is kind}


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(||y||^2 / ||y - y_hat||^2)."""
    reference, approx = reference.double(), approx.double()
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum())).item()

