"""``python -m eval.multilabel``: see :mod:`eval.multilabel`."""
import sys

from .cli import main

sys.exit(main())
