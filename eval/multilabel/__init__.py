"""``python -m eval.multilabel --ckpt CKPT --data MANIFEST --constraints FILE --output-dir DIR``

Biologically constrained multi-label classification on frozen features (Mouadden et al.):
the head of :mod:`dinov2_hier.heads.constrained` is trained on cached backbone features
under seeded k-fold cross-validation (or a fixed split with ``--test-data``) and reported
in ``metrics.json``, ``predictions.csv`` and a self-contained ``report.html``. Options:
``python -m eval.multilabel --help``; the guide is docs/multilabel.md.

The package: :mod:`~eval.multilabel.data` (manifests, folds, pooled features),
:mod:`~eval.multilabel.metrics`, :mod:`~eval.multilabel.runner` (variants, the evaluation),
:mod:`~eval.multilabel.report` (report.html) and :mod:`~eval.multilabel.cli` (this face);
``python -m eval.multilabel`` runs :func:`main`. Every name below is importable from
``eval.multilabel`` as before.

* **Labels**: the manifest's label column holds several class names separated by ``|``
  (class ids or display names of the constraint file); an empty cell is "no class
  positive" unless ``--empty-label CLASS`` names the class it stands for (e.g. ``normal``).
* **Features**: the mean of the backbone's patch tokens (``x_norm_patchtokens``, registers
  excluded), as the paper pools; ``--pool cls`` uses the CLS token instead. Extraction and
  its cache are :func:`eval.features.extract_features`'s (the cache key differs per pool).
* **Folds**: label-powerset stratification: :func:`eval.crossval.stratified_folds` on the
  label *set* of each image, with label sets rarer than the number of folds pooled into one
  group (and that group into the most frequent set when it is itself too small), so every
  image is tested exactly once and frequent label combinations are spread evenly.
* **Variants**: ``--variants soft_uncertainty`` (default; ``<constraints>_<thresholds>``
  with constraints off|fixed|binary|soft and thresholds static|class|uncertainty);
  ``--ablation`` adds the paper's ablation table (off_static, soft_static,
  fixed_static, binary_static, soft_class, soft_uncertainty). All variants share the folds.
"""
from __future__ import annotations

from .cli import build_parser, main
from .data import (  # noqa: F401  (also re-exported)
    LABEL_SEP,
    MultiLabelData,
    MultiLabelDataError,
    extract_pooled_features,
    label_strings,
    load_multilabel_data,
    multilabel_folds,
)
from .metrics import multilabel_metrics
from .report import (  # noqa: F401  (also re-exported)
    MAX_SCATTER_POINTS,
    render_multilabel_report,
    svg_matrix_heatmap,
    svg_threshold_bars,
    svg_uncertainty_scatter,
)
from .runner import ABLATION_VARIANTS, HEAD_FILE, evaluate_multilabel, parse_variant  # noqa: F401

__all__ = [
    "ABLATION_VARIANTS",
    "MultiLabelData",
    "MultiLabelDataError",
    "build_parser",
    "evaluate_multilabel",
    "extract_pooled_features",
    "load_multilabel_data",
    "main",
    "multilabel_folds",
    "multilabel_metrics",
    "parse_variant",
    "render_multilabel_report",
    "svg_matrix_heatmap",
    "svg_threshold_bars",
    "svg_uncertainty_scatter",
]
