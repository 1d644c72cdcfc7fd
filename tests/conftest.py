import os

import torch

# The Triton interpreter must be chosen before triton is first imported. On a machine without a GPU the
# triton backend is tested through it (it only runs when a test forces it, see qbert.ops._registry).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
