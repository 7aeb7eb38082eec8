"""The metrics of multi-label predictions (:func:`multilabel_metrics`) and the count of
impossible label sets (those holding an exclusive pair of the constraint matrix)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["impossible_counts", "multilabel_metrics"]


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, classes: Sequence[str],
                       exclusive: np.ndarray, y_raw: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of bool ``[n, K]`` predictions against bool ``[n, K]`` truth.

    Per class (``per_class[c]``): ``f1``, ``precision``, ``sensitivity`` (recall),
    ``specificity``, ``balanced_accuracy`` (their mean; None unless both are defined),
    ``auc_roc`` (of ``scores``; None when the class is all-positive or all-negative here),
    ``support`` (positives) and ``n_predicted``. Overall: ``weighted_f1`` (per-class F1
    weighted by support), ``macro_f1`` (mean over classes with support), ``micro_f1``,
    ``balanced_accuracy``, ``sensitivity``, ``specificity``, ``auc_roc`` (means over the
    classes where defined), ``subset_accuracy`` (exact label set), ``hamming_accuracy``,
    ``impossible_rate_before`` (share of rows of ``y_raw``, the predictions before decoding,
    holding an exclusive pair; ``y_pred`` when not given) and ``impossible_rate`` (of
    ``y_pred``).
    """
    from sklearn.metrics import roc_auc_score

    from dinov2_hier.heads.constrained import impossible_mask

    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    raw = p if y_raw is None else np.asarray(y_raw, dtype=bool)
    per_class: dict[str, dict[str, Any]] = {}
    f1s, supports = [], []
    for k, name in enumerate(classes):
        tp = int(np.sum(t[:, k] & p[:, k]))
        fp = int(np.sum(~t[:, k] & p[:, k]))
        fn = int(np.sum(t[:, k] & ~p[:, k]))
        tn = int(np.sum(~t[:, k] & ~p[:, k]))
        sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn > 0 else None
        auc = float(roc_auc_score(t[:, k], s[:, k])) if 0 < tp + fn < len(t) else None
        per_class[name] = {
            "f1": f1, "precision": _ratio(tp, tp + fp) if tp + fp > 0 else (0.0 if tp + fn > 0 else None),
            "sensitivity": sens, "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None,
            "auc_roc": auc, "support": tp + fn, "n_predicted": tp + fp,
        }
        if f1 is not None:
            f1s.append(f1)
            supports.append(tp + fn)
    tp_all = int(np.sum(t & p))
    fp_all, fn_all = int(np.sum(~t & p)), int(np.sum(t & ~p))
    rows = [per_class[c] for c in classes]
    return {
        "weighted_f1": float(np.average(f1s, weights=supports)) if f1s else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "micro_f1": _ratio(2 * tp_all, 2 * tp_all + fp_all + fn_all),
        "balanced_accuracy": _mean_defined([r["balanced_accuracy"] for r in rows]),
        "sensitivity": _mean_defined([r["sensitivity"] for r in rows]),
        "specificity": _mean_defined([r["specificity"] for r in rows]),
        "auc_roc": _mean_defined([r["auc_roc"] for r in rows]),
        "subset_accuracy": float(np.mean(np.all(t == p, axis=1))) if len(t) else None,
        "hamming_accuracy": float(np.mean(t == p)) if t.size else None,
        "impossible_rate_before": float(np.mean(impossible_mask(raw, exclusive))) if len(t) else None,
        "impossible_rate": float(np.mean(impossible_mask(p, exclusive))) if len(t) else None,
        "per_class": per_class,
    }



def impossible_counts(pred: np.ndarray, exclusive: np.ndarray) -> tuple[int, float | None]:
    """``(number, share)`` of the rows of bool ``pred [n, K]`` that hold an exclusive pair."""
    from dinov2_hier.heads.constrained import impossible_mask

    bad = impossible_mask(pred, exclusive)
    return int(bad.sum()), float(bad.mean()) if len(bad) else None
