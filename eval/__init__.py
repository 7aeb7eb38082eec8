"""Frozen-feature evaluation of pretrained backbones (issue 4).

Modules: ``features`` (backbone loading, feature extraction and caching), ``probes`` (kNN and
logistic-regression probes; the batched L-BFGS of the latter), ``crossval`` (stratified
folds), ``bootstrap`` (paired stratified bootstrap of metric differences), ``pipeline`` (the
evaluation of ``run``/``linear``/``knn``), ``report`` (metrics.json, predictions.csv) and
``report_html`` (report.html) through ``render`` (the HTML/SVG toolkit of both reports),
``values`` (how numbers are written), ``multilabel`` (constrained multi-label heads), and
the command-line faces ``linear``, ``knn``, ``run``, ``compare`` and ``multilabel``
(``python -m eval.<face>``; their shared arguments are ``cli_common``'s). The metrics
themselves live in ``dinov2_hier.metrics``. Importing this package has no side effects.
"""
