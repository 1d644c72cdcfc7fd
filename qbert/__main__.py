"""``python -m qbert``: the ``qbert`` command (``qbert.cli``)."""

import sys

from qbert.cli import main

sys.exit(main())
