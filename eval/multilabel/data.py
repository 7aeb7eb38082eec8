"""The data of ``eval.multilabel``: manifests of ``|``-separated label sets, label-powerset
folds and the pooled backbone features.

* **Labels**: the manifest's label column holds several class names separated by ``|``
  (class ids or display names of the constraint file); an empty cell is "no class
  positive" unless ``empty_label`` names the class it stands for (e.g. ``normal``).
* **Folds**: label-powerset stratification: :func:`eval.crossval.stratified_folds` on the
  label *set* of each image, with label sets rarer than the number of folds pooled into one
  group (and that group into the most frequent set when it is itself too small), so every
  image is tested exactly once and frequent label combinations are spread evenly.
* **Features**: the mean of the backbone's patch tokens (``x_norm_patchtokens``, registers
  excluded), as the paper pools, or the CLS token; extraction and its cache are
  :func:`eval.features.extract_features`'s (the cache key differs per pool).
"""
from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.errors import UserError

__all__ = ["LABEL_SEP", "MultiLabelData", "MultiLabelDataError", "extract_pooled_features", "label_strings",
           "load_multilabel_data", "multilabel_folds"]

LABEL_SEP = "|"


class MultiLabelDataError(UserError, ValueError):
    """A multi-label manifest that cannot be used; the message names the file, the image
    and the label."""


# --------------------------------------------------------------------------- data


@dataclass
class MultiLabelData:
    """``paths[i]`` with targets ``targets[i]`` (bool ``[n, K]`` in ``classes`` order)."""

    paths: list[str]
    targets: np.ndarray
    classes: list[str]

    def label_strings(self, rows: np.ndarray | None = None) -> list[str]:
        return label_strings(self.targets if rows is None else self.targets[rows], self.classes)


def label_strings(targets: np.ndarray, classes: Sequence[str], sep: str = LABEL_SEP) -> list[str]:
    """``"a|c"`` per row of a bool ``[n, K]`` matrix (classes in matrix order; ``""`` for none)."""
    return [sep.join(c for c, on in zip(classes, row) if on) for row in np.asarray(targets, dtype=bool)]


def load_multilabel_data(source: str | Path, constraints: Any, *, label_column: str = "label",
                         sep: str = LABEL_SEP, empty_label: str | None = None) -> MultiLabelData:
    """Read a manifest CSV (``path,<label_column>[,...]``) whose labels are ``sep``-separated
    class names of ``constraints`` (a :class:`~dinov2_hier.constraints.ConstraintMatrix`).

    Raises:
        MultiLabelDataError: not a CSV, no label column, no rows, an unknown label (named
            with its image and the closest class names).
    """
    from dinov2_hier.data import read_manifest
    from dinov2_hier.errors import suggest

    src = Path(source).expanduser()
    if src.suffix.lower() != ".csv":
        raise MultiLabelDataError(f"{src}: multi-label data must be a manifest CSV (path,{label_column}), "
                                  "an ImageFolder cannot hold several labels per image")
    records = read_manifest(src, label_column=label_column)
    with open(src, newline="", encoding="utf-8-sig") as f:
        header = [c.strip() for c in next(csv.reader(f), [])]
    if label_column not in header:
        raise MultiLabelDataError(f"{src}: no column {label_column!r} in the header {header}")
    if not records:
        raise MultiLabelDataError(f"{src}: no images listed")
    classes = list(constraints.classes)
    empty_idx = None
    if empty_label is not None:
        try:
            empty_idx = constraints.index(empty_label)
        except KeyError:
            raise MultiLabelDataError(
                f"--empty-label {empty_label!r} is not a class of constraint matrix '{constraints.name}'"
                f"{suggest(empty_label, classes)}") from None
    targets = np.zeros((len(records), len(classes)), dtype=bool)
    for i, record in enumerate(records):
        names = [s.strip() for s in (record.label or "").split(sep) if s.strip()]
        if not names and empty_idx is not None:
            targets[i, empty_idx] = True
        for name in names:
            try:
                targets[i, constraints.index(name)] = True
            except KeyError:
                raise MultiLabelDataError(
                    f"{src}: label {name!r} of image {record.path} is not a class of constraint matrix "
                    f"'{constraints.name}' ({constraints.source}){suggest(name, classes + list(constraints.display_names))}"
                ) from None
    return MultiLabelData([r.path for r in records], targets, classes)


def multilabel_folds(targets: np.ndarray, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` ``(train_idx, test_idx)`` pairs stratified on the label set of each row.

    Label sets with fewer rows than folds are pooled into one group; if that group is still
    smaller than ``n_folds`` it joins the most frequent label set. Seeded like
    :func:`eval.crossval.stratified_folds` (which does the split).

    Raises:
        EvalDataError: fewer rows than folds, or ``n_folds < 2``.
    """
    from ..crossval import EvalDataError, stratified_folds

    keys = [",".join(str(i) for i in np.flatnonzero(row)) or "-" for row in np.asarray(targets, dtype=bool)]
    if len(keys) < n_folds:
        fix = f": lower --folds to at most {len(keys)}" if len(keys) >= 2 else ""
        raise EvalDataError(f"{len(keys)} images cannot be split into {n_folds} cross-validation folds "
                            f"(--folds {n_folds}){fix}")
    counts = Counter(keys)
    rare = {k for k, n in counts.items() if n < n_folds}
    pooled = "rare label sets"
    groups = [pooled if k in rare else k for k in keys]
    if 0 < sum(counts[k] for k in rare) < n_folds:
        common = max((k for k in counts if k not in rare), key=lambda k: (counts[k], k), default=pooled)
        groups = [common if g == pooled else g for g in groups]
    return stratified_folds(groups, n_folds, seed)


# --------------------------------------------------------------------------- features


def extract_pooled_features(backbone: Any, paths: Sequence[str], pool: str = "mean_patch", **kwargs: Any) -> Any:
    """:func:`eval.features.extract_features` of ``paths`` with ``pool``: ``"cls"`` the CLS
    token, ``"mean_patch"`` the mean over the ``N`` patch tokens ``[n, D]`` (registers and
    CLS excluded). The cache key includes the pool. Returns a ``FeatureSet``."""
    import torch
    from torch import nn

    from ..features import EvalBackbone, extract_features

    if pool == "cls":
        return extract_features(backbone, paths, **kwargs)
    if pool != "mean_patch":
        raise MultiLabelDataError(f"pool must be 'mean_patch' or 'cls', got {pool!r}")

    class PatchMean(nn.Module):
        """Presents the patch-token mean under the key extract_features reads."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.embed_dim = int(model.embed_dim)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x_norm_clstoken": self.model(x)["x_norm_patchtokens"].float().mean(1)}

    pooled = EvalBackbone(PatchMean(backbone.model), backbone.meta, backbone.source,
                          f"{backbone.fingerprint}|x_norm_patchtokens.mean")
    return extract_features(pooled, paths, **kwargs)
