"""``python -m eval.linear --ckpt CKPT --data DATA [--hierarchy H] [--folds 5] --output-dir DIR``

Logistic-regression probe on frozen CLS features (multinomial, L2, C chosen by inner
cross-validation unless ``--C`` is given). Options: ``python -m eval.linear --help``;
outputs and protocol: docs/evaluation.md.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli_common import run_face

DESCRIPTION = ("Logistic-regression probe on frozen CLS features: stratified k-fold cross-validation (or a fixed "
               "split), flat and hierarchical metrics, metrics.json, predictions.csv and report.html.")


def main(argv: Sequence[str] | None = None) -> int:
    return run_face(argv, "python -m eval.linear", DESCRIPTION, ("logreg",))


if __name__ == "__main__":
    sys.exit(main())
