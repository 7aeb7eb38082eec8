"""``python -m eval.run --ckpt CKPT --data DATA [--hierarchy H] --output-dir DIR``

Both probes (kNN with ``--k``, default 1 and 20, and logistic regression) on the same
frozen features and folds, plus the report. Options: ``python -m eval.run --help``;
outputs and protocol: docs/evaluation.md.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli_common import run_face

DESCRIPTION = ("kNN and logistic-regression probes on frozen CLS features (same features, same folds), flat and "
               "hierarchical metrics, metrics.json, predictions.csv and report.html.")


def main(argv: Sequence[str] | None = None) -> int:
    return run_face(argv, "python -m eval.run", DESCRIPTION, ("knn", "logreg"))


if __name__ == "__main__":
    sys.exit(main())
