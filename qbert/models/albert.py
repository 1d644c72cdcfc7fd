"""ALBERT (``AlbertModel``, ``AlbertFor*``).

ALBERT shares one layer's weights across layers: ``encoder.albert_layer_groups[g]`` is one module run
``num_hidden_layers / num_hidden_groups`` times, so swapping its Linear layers once keeps the sharing.
``encoder.embedding_hidden_mapping_in`` (embedding_size -> hidden) and ``pooler`` (a bare Linear) belong
to the base model and are quantized. Heads: ``predictions`` (MLM; the decoder is tied to the word
embeddings), ``sop_classifier``, ``classifier``, ``qa_outputs``.
"""

from qbert.models._family import Family

FAMILY = Family("albert", model_types=("albert",),
                heads=("predictions", "sop_classifier", "classifier", "qa_outputs"))
