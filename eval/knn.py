"""``python -m eval.knn --ckpt CKPT --data DATA [--k 1 20] [--metric cosine|euclidean] --output-dir DIR``

k-nearest-neighbour probes on frozen CLS features (cosine similarity of L2-normalised
features by default). Options: ``python -m eval.knn --help``; outputs and protocol:
docs/evaluation.md.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli_common import run_face

DESCRIPTION = ("k-nearest-neighbour probes on frozen CLS features: stratified k-fold cross-validation (or a fixed "
               "split), flat and hierarchical metrics, metrics.json, predictions.csv and report.html.")


def main(argv: Sequence[str] | None = None) -> int:
    return run_face(argv, "python -m eval.knn", DESCRIPTION, ("knn",))


if __name__ == "__main__":
    sys.exit(main())
