"""How the evaluation outputs write their numbers, shared by the bookkeeping
(:mod:`eval.report`), the reports and the printed tables.

* :func:`as_float`: a finite float, or None for None / NaN / infinity; JSON never holds NaN
  or infinity (not valid JSON), :func:`json_safe` writes them as ``null``.
* :func:`format_mean_std`: a summary entry ``{"mean", "std", ...}`` as ``"0.812 ± 0.034"``.
* :data:`PER_CLASS_FIELDS`: the per-class metrics that are summarised and shown.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PER_CLASS_FIELDS", "as_float", "format_mean_std", "format_number", "is_number", "json_safe"]

PER_CLASS_FIELDS = ("precision", "recall", "f1")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def as_float(value: Any) -> float | None:
    """``float(value)``, or None for None / NaN / infinity."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(allow_nan=False)`` accepts (NaN/inf -> None)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return as_float(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def format_mean_std(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``"0.812 ± 0.034"``; ``"n/a"`` when the mean is undefined."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    std = entry.get("std")
    std_text = f"{std:.{digits}f}" if std is not None else "n/a"
    return f"{entry['mean']:.{digits}f} ± {std_text}"


def format_number(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``"n/a"`` for None, NaN, infinity and non-numbers."""
    f = as_float(value) if is_number(value) or value is None else None
    return "n/a" if f is None else f"{f:.{digits}f}"
