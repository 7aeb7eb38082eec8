"""Per-class weights for the flat cross-entropy (class-weighted CE, issue 22).

:class:`~dinov2_hier.losses.FlatCELoss` and the ``ce`` supervised term take an optional
``class_weights``: one weight per *leaf* of the hierarchy, given as

* a list of ``num_leaves`` numbers in leaf order (``Hierarchy.leaves``, which is also the
  order of the leaf logits), or
* a mapping ``{leaf node id: weight}`` naming every leaf.

Weights are finite and ``>= 0`` with at least one ``> 0``. The weighted loss is the weighted
mean of ``torch.nn.functional.cross_entropy(weight=...)``: ``sum_i w[y_i] l_i / sum_i w[y_i]``
over the leaf-labelled samples.

The string ``"balanced"`` is *not* accepted there: during pretraining a term never sees
the dataset, so it cannot count the classes. Compute the weights once from the training
labels with :func:`balanced_class_weights` (scikit-learn's ``compute_class_weight("balanced")``:
``n_samples / (n_classes * count_c)``) and put the list (or mapping) in the config.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dinov2_hier.hierarchy import Hierarchy

__all__ = ["balanced_class_weights", "resolve_class_weights"]


def balanced_class_weights(labels: Sequence[Any], classes: Sequence[Any]) -> list[float]:
    """``n_samples / (n_classes * count_c)`` for each entry of ``classes`` (sklearn's "balanced").

    ``labels`` are the training labels (any hashables); every class of ``classes`` must occur
    in them and every label must be one of ``classes`` (else ValueError, as sklearn raises).
    """
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError("classes must be a non-empty list without repeats")
    counts = Counter(labels)
    unknown = [label for label in counts if label not in set(classes)]
    if unknown:
        raise ValueError(f"labels {unknown[:5]!r} are not in classes")
    missing = [c for c in classes if counts[c] == 0]
    if missing:
        raise ValueError(f"classes {missing[:5]!r} do not occur in labels; a balanced weight needs a count")
    n = sum(counts.values())
    return [n / (len(classes) * counts[c]) for c in classes]


def resolve_class_weights(hierarchy: Hierarchy, class_weights: Any) -> torch.Tensor | None:
    """``class_weights`` (None, a list in leaf order, or ``{leaf: weight}``) -> float32 ``[num_leaves]``.

    None stays None (unweighted). Raises ValueError naming the problem.
    """
    if class_weights is None:
        return None
    leaves = hierarchy.leaves
    if isinstance(class_weights, str):
        raise ValueError(
            f"class_weights={class_weights!r}: give one number per leaf (a list in leaf order or a mapping "
            "leaf -> weight); for 'balanced' weights compute them from the training labels with "
            "dinov2_hier.losses.class_weights.balanced_class_weights"
        )
    if isinstance(class_weights, Mapping):
        unknown = [k for k in class_weights if k not in set(leaves)]
        if unknown:
            raise ValueError(f"class_weights names {unknown[:5]!r}, which are not leaves of {hierarchy.name!r}")
        missing = [leaf for leaf in leaves if leaf not in class_weights]
        if missing:
            raise ValueError(f"class_weights has no weight for the leaves {missing[:5]!r}")
        values = [class_weights[leaf] for leaf in leaves]
    elif isinstance(class_weights, (Sequence, torch.Tensor)):
        values = list(class_weights.tolist() if isinstance(class_weights, torch.Tensor) else class_weights)
        if len(values) != len(leaves):
            raise ValueError(f"class_weights has {len(values)} entries; the hierarchy has {len(leaves)} leaves")
    else:
        raise ValueError(f"class_weights must be a list or a mapping, got {type(class_weights).__name__}")
    for leaf, value in zip(leaves, values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"class_weights[{leaf!r}] must be a finite number >= 0, got {value!r}")
    if not any(v > 0 for v in values):
        raise ValueError("class_weights are all 0")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)
