"""ELECTRA (``ElectraModel``, ``ElectraFor*``); it has no pooler.

``electra.embeddings_project`` (embedding_size -> hidden, present when they differ) belongs to the base
model and is quantized. Heads: ``discriminator_predictions`` (replaced-token detection),
``generator_predictions`` + ``generator_lm_head`` (MLM; the lm head is tied to the word embeddings),
``sequence_summary`` (multiple choice), ``classifier``, ``qa_outputs``.
"""

from qbert.models._family import Family

FAMILY = Family("electra", model_types=("electra",),
                heads=("discriminator_predictions", "generator_predictions", "generator_lm_head",
                       "sequence_summary", "classifier", "qa_outputs"),
                fused_encoders=("ElectraEncoder",), fused_layers=("ElectraLayer",),
                fused_attentions=("ElectraSelfAttention",))
