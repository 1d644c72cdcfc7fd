"""Model-family glue: which modules of a Hugging Face encoder are task heads, and which stay in float.

``family_of(model)`` looks the family up by ``model.config.model_type``. A model of another type gets
the generic rule of ``generic_family``: the modules outside ``model.base_model`` are its heads.
Importing this package does not import transformers.
"""

from __future__ import annotations

from torch import nn

from qbert.models import albert, bert, distilbert, electra, roberta
from qbert.models._family import Family, first_match

FAMILIES: dict[str, Family] = {
    model_type: module.FAMILY
    for module in (bert, roberta, distilbert, albert, electra)
    for model_type in module.FAMILY.model_types
}


def model_type_of(model: nn.Module) -> str | None:
    """``model.config.model_type`` for a Hugging Face model, else None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def generic_family(model: nn.Module) -> Family:
    """For models of an untested type: every child of the root except the base model is a head.

    A model without a separate base model (a ``BertModel``-like root or a plain ``nn.Module``) has no heads.
    """
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        return Family("generic", model_types=(), heads=())
    heads = tuple(name for name, _ in model.named_children() if name != prefix)
    return Family("generic", model_types=(), heads=heads)


def family_of(model: nn.Module) -> Family:
    """The family glue for ``model`` (see ``FAMILIES``), or ``generic_family(model)``."""
    family = FAMILIES.get(model_type_of(model))
    return family if family is not None else generic_family(model)


__all__ = ["FAMILIES", "Family", "family_of", "first_match", "generic_family", "model_type_of"]
