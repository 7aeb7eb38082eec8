"""Frozen-feature evaluation of pretrained backbones (issue 4).

Modules: ``features`` (backbone loading, feature extraction and caching), ``probes`` (kNN and
logistic-regression probes), ``crossval`` (stratified folds), ``bootstrap`` (paired stratified
bootstrap of metric differences), ``report`` (metrics.json, predictions.csv, report.html), and
the command-line faces ``linear``, ``knn``, ``run`` and ``compare`` (``python -m eval.<face>``).
The metrics themselves live in ``dinov2_hier.metrics``. Importing this package has no side
effects.
"""
