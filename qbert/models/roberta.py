"""RoBERTa (``RobertaModel``, ``RobertaFor*``).

The pooler (``roberta.pooler.dense``) is quantized with the encoder. Heads: ``lm_head`` (its decoder is
tied to the word embeddings), ``classifier`` (``dense`` + ``out_proj`` for sequence classification, one
Linear for tokens / multiple choice), ``qa_outputs``.
"""

from qbert.models._family import Family

FAMILY = Family("roberta", model_types=("roberta",), heads=("lm_head", "classifier", "qa_outputs"),
                fused_encoders=("RobertaEncoder",), fused_layers=("RobertaLayer",),
                fused_attentions=("RobertaSelfAttention",))
