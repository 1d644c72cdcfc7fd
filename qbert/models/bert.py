"""BERT (``BertModel``, ``BertFor*``, ``BertLMHeadModel``) and MiniLM, which is a ``BertModel``.

The pooler (``bert.pooler.dense``) belongs to the base model and is quantized with the encoder.
Heads: ``cls`` (MLM ``predictions`` with the decoder tied to the word embeddings, NSP
``seq_relationship``), ``classifier``, ``qa_outputs``.
"""

from qbert.models._family import Family

FAMILY = Family("bert", model_types=("bert",), heads=("cls", "classifier", "qa_outputs"),
                fused_encoders=("BertEncoder",), fused_layers=("BertLayer",),
                fused_attentions=("BertSelfAttention",))
