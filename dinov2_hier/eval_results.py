"""The result files of an evaluation directory (``python -m eval.run`` and its faces):
their names, the keys readers rely on, one writer and one reader.

- ``DIR/metrics.json``: one evaluated checkpoint: ``checkpoint`` (``name, path,
  fingerprint, arch, iteration, ...``), ``data``, ``split``, ``n_samples``, ``probes``
  (probe -> metric -> ``{"mean", "std", "folds", ...}``) and more;
- ``DIR/summary.json``: a training run's checkpoints evaluated in ``DIR/<name>/``:
  ``best`` names the best one's subdirectory.

Why here and not in ``eval/``: the evaluation package (``eval/``, the top floor) writes these
files and the export (:mod:`dinov2_hier.export`, a lower floor) reads them for the model
card. A lower floor never imports a higher one (docs/architecture.md), so the schema lives in
the library, beside :mod:`dinov2_hier.io`, and both sides import it: ``eval.report`` and
``eval.cli_common`` write through :func:`write_results_json` under :data:`METRICS_FILE` /
:data:`SUMMARY_FILE`; the export reads with :func:`read_metrics`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import atomic_write_text
from .io import read_json_object as _read_json_object

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"
#: metrics.json: probe -> metric -> statistics.
PROBES_KEY = "probes"
#: metrics.json: what was evaluated (``path``, ``fingerprint``: sha256 of the weights file, ``iteration``, ...).
CHECKPOINT_KEY = "checkpoint"
#: metrics.json: the data (``path``, ``test_path``, ...) and the split (``kind``:
#: ``cross_validation`` with ``folds``, or ``fixed`` with ``n_test``).
DATA_KEY, SPLIT_KEY, N_SAMPLES_KEY = "data", "split", "n_samples"
#: summary.json: the subdirectory of the best checkpoint.
BEST_KEY = "best"


class EvalResultsError(UserError, ValueError):
    """An evaluation directory without results, or a result file that is not what eval writes."""


def write_results_json(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` (JSON-safe: no NaN, no infinity) to ``path`` atomically, indented; return the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A result file's top-level JSON object; :class:`EvalResultsError` naming the file
    (and line and column for invalid JSON) otherwise."""
    return _read_json_object(path, EvalResultsError)


def metrics_path(directory: str | Path) -> Path:
    """``DIR/metrics.json``, or for an evaluated training run the best checkpoint's
    ``DIR/<best>/metrics.json`` named by ``DIR/summary.json``."""
    directory = Path(directory)
    path = directory / METRICS_FILE
    if not path.is_file() and (directory / SUMMARY_FILE).is_file():
        best = read_json_object(directory / SUMMARY_FILE).get(BEST_KEY)
        if not isinstance(best, str):
            raise EvalResultsError(f"{directory / SUMMARY_FILE}: no '{BEST_KEY}' checkpoint")
        path = directory / best / METRICS_FILE
    if not path.is_file():
        raise EvalResultsError(f"{directory}: no {METRICS_FILE} (an output directory of python -m eval.run)")
    return path


def read_metrics(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(path, document)`` of the metrics of an evaluation directory (:func:`metrics_path`),
    its ``probes`` checked to be a non-empty object of metric objects."""
    path = metrics_path(directory)
    doc = read_json_object(path)
    probes = doc.get(PROBES_KEY)
    if not isinstance(probes, Mapping) or not probes:
        raise EvalResultsError(f"{path}: '{PROBES_KEY}' must be a non-empty object")
    for probe, metrics in probes.items():
        if not isinstance(metrics, Mapping):
            raise EvalResultsError(f"{path}: '{PROBES_KEY}.{probe}' must be an object of metrics")
    return path, doc


def section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``doc[key]`` when it is an object, else an empty one (sections a reader can do without)."""
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}
