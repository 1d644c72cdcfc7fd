"""RoBERTa (``RobertaModel``, ``RobertaFor*``).

The pooler (``roberta.pooler.dense``) is quantized with the encoder. Heads: ``lm_head`` (its decoder is
tied to the word embeddings), ``classifier`` (``dense`` + ``out_proj`` for sequence classification, one
Linear for tokens / multiple choice), ``qa_outputs``.
"""

from qbert.models._family import Family

FAMILY = Family("roberta", model_types=("roberta",), heads=("lm_head", "classifier", "qa_outputs"),
                add_norm=("RobertaSelfOutput", "RobertaOutput"), intermediate=("RobertaIntermediate",),
                embeddings=("RobertaEmbeddings",), embeddings_consumers=("encoder.layer.0.attention.self.query",))
