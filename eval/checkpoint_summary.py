"""What ``eval`` records about the checkpoints of a training run: ``summary.json`` (every
checkpoint's scores and the best one, :func:`write_summary`) and whether the run had collapsed
by a checkpoint's iteration (:func:`training_status`). Split out of :mod:`eval.pipeline`.
"""
from __future__ import annotations

import logging

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinov2_hier.eval_results import SUMMARY_FILE, write_results_json

from .baselines import is_baseline
from .report import json_safe

__all__ = ["SELECTION_METRIC", "SELECTION_PROBE", "selection_probe", "training_status", "write_summary"]

log = logging.getLogger("dinov2_hier.eval.cli")

#: The metric and statistic that pick the best checkpoint of a training run.
SELECTION_METRIC = "balanced_accuracy"
#: Probe preferred for checkpoint selection (the first evaluated probe when it is not run).
SELECTION_PROBE = "logreg"


def training_status(ckpt: str, iteration: Any) -> dict | None:
    """Whether the training run of ``ckpt`` had collapsed by the checkpoint's iteration
    (:func:`dinov2_hier.train.collapse.run_collapse_status`); None for files outside a
    training run directory and for baselines. A collapse is also logged as a warning."""
    from dinov2_hier.train.collapse import run_collapse_status, run_dir_of

    if is_baseline(ckpt) or str(ckpt).strip().lower() == "none":
        return None
    run = run_dir_of(ckpt)
    if run is None:
        return None
    status = run_collapse_status(run, int(iteration) if iteration is not None else None)
    if status is not None:
        status["run_dir"] = str(run)
        if status["collapsed"]:
            log.warning("%s: its training run had collapsed (detected at iteration %s): DINO/iBOT taught it "
                        "nothing; see docs/training-dynamics.md", ckpt, status["detected_at_iteration"])
    return status


def selection_probe(probe_names: Sequence[str]) -> str:
    return SELECTION_PROBE if SELECTION_PROBE in probe_names else probe_names[0]


def write_summary(out_dir: Path, evaluations: list[dict[str, Any]], probe_names: Sequence[str],
                   selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json of a training run: every checkpoint's scores and the best one.

    Best = highest mean balanced accuracy of the logistic regression (of the first probe when
    logreg did not run); on a tie the earlier iteration wins. ``selection``: how ``--select``
    chose the one checkpoint evaluated (recorded as ``"selected_by"``).
    """
    probe = selection_probe(probe_names)
    rows = []
    best_i, best_score = None, None
    for i, ev in enumerate(evaluations):
        probes = ev["metrics"]["probes"]
        score = probes[probe][SELECTION_METRIC]["mean"]
        rows.append({
            "name": ev["name"], "checkpoint": ev["checkpoint"], "iteration": ev["metrics"]["checkpoint"]["iteration"],
            "output_dir": ev["output_dir"], "score": score,
            SELECTION_METRIC: {p: probes[p][SELECTION_METRIC]["mean"] for p in probes},
        })
        if score is not None and (best_score is None or score > best_score):
            best_i, best_score = i, score
    summary = {
        "criterion": {"probe": probe, "metric": SELECTION_METRIC, "statistic": "mean over folds"},
        "best": rows[best_i]["name"] if best_i is not None else None,
        "best_checkpoint": rows[best_i]["checkpoint"] if best_i is not None else None,
        "best_score": best_score,
        "checkpoints": rows,
    }
    if selection is not None:
        summary["selected_by"] = selection
    write_results_json(out_dir / SUMMARY_FILE, json_safe(summary))
    return summary
