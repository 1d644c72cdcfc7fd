"""DistilBERT (``DistilBertModel``, ``DistilBertFor*``); it has no pooler.

Heads: ``vocab_transform`` and ``vocab_projector`` (MLM; the projector is tied to the word embeddings),
``pre_classifier`` + ``classifier`` (sequence classification, multiple choice), ``classifier`` (tokens),
``qa_outputs``.
"""

from qbert.models._family import Family

FAMILY = Family("distilbert", model_types=("distilbert",),
                heads=("vocab_transform", "vocab_projector", "pre_classifier", "classifier", "qa_outputs"))
