"""The optional probes of the command line: ``--extra-probes svm wknn`` (issue 22).

The evaluation faces (``eval.run``, ``eval.linear``, ``eval.knn``) run their own probe
families (kNN with ``--k``, logistic regression) as before; ``--extra-probes`` adds, on the
same features and folds,

* ``svm``: :class:`~eval.probes.svm.LinearSVMProbe` (C from ``--svm-C-grid`` by inner CV),
* ``wknn``: :class:`~eval.probes.knn.WeightedKNNProbe` (distance-weighted, k from
  ``--wknn-k-grid`` by inner CV; the face's ``--metric`` when it has one, else cosine);
* ``dg_erm``, ``dg_coral``, ``dg_dann``, ``dg_boda``, ``dg_boda+`` (Umer et al., issue 21):
  :class:`~eval.probes.dg.DGProbe` with that method, which trains on the rows' groups
  (``--group-column``; meant for ``--split leave-one-group-out`` / ``holdout=GROUP``).

Without ``--extra-probes`` nothing changes: no probe, no ``settings`` entry. Every function
here reads its arguments with ``getattr`` defaults, so a Namespace built without them works.
"""
from __future__ import annotations

import argparse
from typing import Any

from .dg import DG_METHODS, DGProbe
from .knn import DEFAULT_K_GRID, WeightedKNNProbe
from .svm import DEFAULT_SVM_C_GRID, LinearSVMProbe

__all__ = ["EXTRA_PROBES", "add_extra_probe_args", "build_extra_probes", "check_extra_probe_args",
           "extra_probe_settings"]

#: Names accepted by ``--extra-probes``, in the order their probes are run.
EXTRA_PROBES = ("svm", "wknn") + tuple(f"dg_{method}" for method in DG_METHODS)


def add_extra_probe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("extra probes (Gräbel et al.; domain generalisation: Umer et al.)")
    g.add_argument("--extra-probes", dest="extra_probes", nargs="+", choices=EXTRA_PROBES, default=None,
                   help="also run a linear SVM (svm: LinearSVC, C chosen by inner 3-fold CV) and/or a "
                        "distance-weighted kNN (wknn: k chosen by inner 3-fold CV) on the same folds; "
                        "dg_erm dg_coral dg_dann dg_boda dg_boda+: an MLP head trained on the training "
                        "rows' domains (--group-column) with that method (docs/domain-generalisation.md)")
    g.add_argument("--svm-C-grid", dest="svm_C_grid", type=float, nargs="+", default=None,
                   help=f"candidate C of the SVM (default {' '.join(f'{c:g}' for c in DEFAULT_SVM_C_GRID)})")
    g.add_argument("--wknn-k-grid", dest="wknn_k_grid", type=int, nargs="+", default=None,
                   help=f"candidate k of the weighted kNN (default {' '.join(str(k) for k in DEFAULT_K_GRID)})")


def _selected(args: argparse.Namespace) -> list[str]:
    chosen = getattr(args, "extra_probes", None) or []
    return [name for name in EXTRA_PROBES if name in chosen]


def check_extra_probe_args(args: argparse.Namespace, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` (the face's usage error) naming the first bad extra-probe value."""
    extra = getattr(args, "extra_probes", None) or []
    if len(set(extra)) != len(extra):
        raise error(f"--extra-probes names a probe twice: {extra}")
    grid = getattr(args, "svm_C_grid", None)
    if grid is not None and min(grid) <= 0:
        raise error(f"--svm-C-grid values must be > 0, got {grid}")
    k_grid = getattr(args, "wknn_k_grid", None)
    if k_grid is not None and min(k_grid) < 1:
        raise error(f"--wknn-k-grid values must be >= 1, got {k_grid}")
    dg = [name for name in extra if name.startswith("dg_")]
    if dg and str(getattr(args, "split", "kfold")) == "kfold":
        raise error(f"--extra-probes {dg[0]} trains on domains: use it with --split leave-one-group-out or "
                    "--split holdout=GROUP (and --group-column)")


def build_extra_probes(args: argparse.Namespace) -> list[Any]:
    """The probes ``--extra-probes`` asks for (none by default)."""
    probes: list[Any] = []
    seed = int(getattr(args, "seed", 0))
    for name in _selected(args):
        if name == "svm":
            probes.append(LinearSVMProbe(C_grid=getattr(args, "svm_C_grid", None), seed=seed))
        elif name.startswith("dg_"):
            probes.append(DGProbe(name[len("dg_"):], seed=seed))
        else:
            probes.append(WeightedKNNProbe(k_grid=getattr(args, "wknn_k_grid", None),
                                           metric=getattr(args, "knn_metric", "cosine"), seed=seed))
    return probes


def extra_probe_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``settings`` entries of metrics.json for the extra probes (empty by default)."""
    out: dict[str, Any] = {}
    for name in _selected(args):
        if name == "svm":
            out["svm"] = {"C_grid": sorted(float(c) for c in (getattr(args, "svm_C_grid", None) or DEFAULT_SVM_C_GRID))}
        elif name.startswith("dg_"):
            probe = DGProbe(name[len("dg_"):], seed=int(getattr(args, "seed", 0)))
            out[probe.name] = probe.settings()
        else:
            out["wknn"] = {"k_grid": sorted({int(k) for k in (getattr(args, "wknn_k_grid", None) or DEFAULT_K_GRID)}),
                           "metric": getattr(args, "knn_metric", "cosine"), "weights": "distance"}
    return out
