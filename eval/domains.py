"""Domain-aware evaluation: group columns, leave-one-group-out / holdout splits, shared classes.

A *group* (domain) is the value of one manifest column per image (``--group-column``,
default ``dataset``: the source dataset, hospital or scanner). ``--split`` picks the protocol:

* ``kfold`` (default): stratified k-fold over all rows, as without this module.
* ``group-kfold``: stratified k-fold (``--folds``) in which every group's rows are on one side
  of each fold (scikit-learn's ``StratifiedGroupKFold``): patients, slides or regions never in
  both training and test (Gräbel et al.'s region-grouped protocol). The usual metrics, no
  per-group report.
* ``leave-one-group-out``: each group is held out in turn (one "fold" per group, in sorted
  group order); the probes are trained on every other group's rows and tested on the held-out
  group's rows, so every row is tested exactly once and predictions.csv keeps one row per image.
* ``holdout=GROUP``: one fold: trained on the other groups, tested on GROUP only.

``--classes shared`` compares at the label precision all groups share: each label maps to its
topmost ancestor-or-self that is a label of some group and that every group has (itself or a
finer descendant); rows whose label has no such ancestor exist in fewer than all groups and
are dropped (counted in metrics.json and the log). Without a hierarchy: the labels present in
every group are kept, the rest dropped.

Per held-out group, :meth:`DomainPlan.report` gives metrics.json's ``domains`` entry: the
out-of-domain metrics of each probe, the classes absent from the training groups (name and
count; they stay in the metrics as errors the probe could not avoid), the in-domain score
(stratified k-fold over the training groups' rows only) and the gap in - out for the headline
metrics (balanced accuracy, macro F1, micro F1 = accuracy), and each probe's ``per_class`` precision,
recall, F1 and support on the held-out rows. See docs/domain-generalisation.md.
"""
from __future__ import annotations

import argparse
import csv
import logging
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.errors import UserError

__all__ = [
    "HEADLINE_METRICS",
    "DomainPlan",
    "DomainUsageError",
    "group_splits",
    "in_domain_folds",
    "parse_split",
    "prepare_domains",
    "read_groups",
    "shared_class_map",
]

log = logging.getLogger("dinov2_hier.eval.domains")

#: The metrics of the in- vs out-of-domain gap (``micro_f1`` = accuracy for single-label data).
HEADLINE_METRICS = ("balanced_accuracy", "macro_f1", "micro_f1")
SPLITS = ("kfold", "group-kfold", "leave-one-group-out", "holdout=GROUP")


class DomainUsageError(UserError, ValueError):
    """A ``--split`` / ``--group-column`` / ``--classes`` value that cannot work with the data."""


def parse_split(value: str) -> tuple[str, str | None]:
    """``"kfold"`` / ``"leave-one-group-out"`` / ``"holdout=GROUP"`` -> ``(kind, group)``."""
    text = str(value).strip()
    if text in ("kfold", "group-kfold", "leave-one-group-out"):
        return text, None
    if text.startswith("holdout="):
        group = text[len("holdout="):].strip()
        if group:
            return "holdout", group
    raise DomainUsageError(f"--split {value!r} is not one of {', '.join(SPLITS)}")


def _manifest_column(path: Path, column: str, n_rows: int) -> list[str | None]:
    """The ``column`` of a manifest CSV, one value per record (blank lines skipped as
    :func:`dinov2_hier.data.records.read_manifest` skips them)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if column not in header:
            raise DomainUsageError(f"--group-column {column!r}: {path} has no such column (columns: "
                                   f"{', '.join(header)})")
        at = header.index(column)
        values = [(row[at].strip() or None) for row in reader if row and any(cell.strip() for cell in row)]
    if len(values) != n_rows:  # read_manifest rejects such files first; a guard, not a user path
        raise DomainUsageError(f"--group-column {column!r}: {path} has {len(values)} rows, expected {n_rows}")
    return values


def read_groups(data: Any, source: str | Path, column: str) -> np.ndarray:
    """The group of every row of ``data`` (an :class:`eval.features.EvalData` read from ``source``):
    the records' ``dataset`` for ``column == "dataset"``, else that manifest column."""
    src = Path(source)
    if src.suffix.lower() != ".csv":
        raise DomainUsageError(f"--group-column {column!r} needs a manifest CSV, got the folder {source}")
    if column == "dataset":
        has = any(r.dataset is not None for r in data.records)
        values = ([r.dataset for r in data.records] if has
                  else _manifest_column(src, column, len(data.records)))
    else:
        values = _manifest_column(src, column, len(data.records))
    blank = [p for p, v in zip(data.paths, values) if v is None]
    if blank:
        raise DomainUsageError(f"--group-column {column!r}: {len(blank)} row(s) of {source} have no value "
                               f"(first: {blank[0]})")
    return np.asarray(values, dtype=object).astype(str)


def shared_class_map(labels: Sequence[str], groups: Sequence[str], hierarchy: Any = None) -> dict[str, str | None]:
    """``{label: shared class or None (dropped)}`` for every label of ``labels`` (see the module doc)."""
    by_group: dict[str, set[str]] = {}
    for label, group in zip(labels, groups):
        by_group.setdefault(str(group), set()).add(str(label))
    present = set().union(*by_group.values()) if by_group else set()
    if hierarchy is None:
        common = set.intersection(*by_group.values()) if by_group else set()
        return {label: (label if label in common else None) for label in sorted(present)}
    covers = {g: {a for label in ls for a in hierarchy.ancestors(label)} for g, ls in by_group.items()}
    shared = {c for c in present if all(c in cov for cov in covers.values())}
    out: dict[str, str | None] = {}
    for label in sorted(present):
        on_path = [a for a in hierarchy.ancestors(label) if a in shared]
        out[label] = on_path[-1] if on_path else None  # topmost: the classes form an antichain
    return out


def group_kfold(labels: Sequence[str], groups: Sequence[str], n_folds: int, seed: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified ``n_folds``-fold CV with every group on one side of each fold
    (``StratifiedGroupKFold(shuffle=True, random_state=seed)``); sorted int64 indices."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray([str(v) for v in labels])
    g = np.asarray(groups, dtype=object).astype(str)
    n_groups = len(set(g.tolist()))
    if n_groups < n_folds:
        raise DomainUsageError(f"--split group-kfold: {n_groups} groups cannot fill {n_folds} folds (--folds)")
    with warnings.catch_warnings():  # a class in fewer groups than folds: some folds lack it (reported by metrics)
        warnings.simplefilter("ignore")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)) for tr, te in splitter.split(y, y, g)]


def group_splits(groups: Sequence[str], kind: str, holdout: str | None = None
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """``([(train_idx, test_idx)], [held-out group of each fold])`` of a domain protocol."""
    g = np.asarray(groups, dtype=object).astype(str)
    names = sorted(set(g.tolist())) if kind == "leave-one-group-out" else [str(holdout)]
    folds = [(np.flatnonzero(g != name).astype(np.int64), np.flatnonzero(g == name).astype(np.int64))
             for name in names]
    return folds, names


def in_domain_folds(labels: Sequence[str], n_folds: int, seed: int) -> tuple[list, dict[str, int]]:
    """Stratified folds of the training groups' rows for the in-domain score, tolerant of
    classes smaller than ``n_folds`` (returned as ``{class: count}``; some folds lack them)."""
    from sklearn.model_selection import StratifiedKFold

    from .crossval import stratified_folds

    y = np.asarray([str(v) for v in labels])
    small = {c: n for c, n in sorted(Counter(y.tolist()).items()) if n < n_folds}
    if not small:
        return stratified_folds(y, n_folds, seed), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        folds = [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)) for tr, te in splitter.split(y, y)]
    return folds, small


def _scalars(fold_metrics: dict[str, Any]) -> dict[str, Any]:
    from .report import scalar_metric_names

    out = {name: fold_metrics.get(name) for name in scalar_metric_names([fold_metrics])}
    out["micro_f1"] = fold_metrics.get("accuracy")  # single-label: micro F1 = accuracy
    return out


def _held_out_per_class(fold_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support per class on the held-out group's rows (the fold's
    own ``per_class``), for the classes that group holds (support > 0) or that the probe
    predicted there (support 0, precision 0: a class absent from the group but predicted)."""
    per_class = fold_metrics.get("per_class") or {}
    labels = fold_metrics.get("labels") or list(per_class)
    matrix = fold_metrics.get("confusion_matrix")
    predicted = np.asarray(matrix).sum(axis=0).tolist() if matrix else [0] * len(labels)
    return {c: dict(per_class[c]) for c, n_pred in zip(labels, predicted)
            if c in per_class and (per_class[c].get("support", 0) > 0 or n_pred > 0)}


@dataclass
class DomainPlan:
    """The domain protocol of one evaluation: ``groups[i]`` is the group of data row ``i``."""

    column: str
    kind: str  # kfold | group-kfold | leave-one-group-out | holdout
    holdout: str | None
    groups: np.ndarray
    class_filter: dict[str, Any] | None = None
    folds: int = 5
    seed: int = 0
    names: list[str] = field(default_factory=list)

    @property
    def kfold(self) -> bool:
        return self.kind == "kfold"

    def split(self, keep: np.ndarray, labels: Sequence[str] | None = None
              ) -> tuple[list, np.ndarray, np.ndarray, dict[str, Any]]:
        """For the readable rows ``keep`` (``labels``: theirs, for ``group-kfold``):
        ``(folds, test_rows, fold_of_test_rows, split_info)``."""
        if self.kind == "group-kfold":
            folds = group_kfold(labels, self.groups[keep], self.folds, self.seed)
            self.names = [f"fold {i}" for i in range(len(folds))]
        else:
            folds, self.names = group_splits(self.groups[keep], self.kind, self.holdout)
        empty = [n for n, (tr, te) in zip(self.names, folds) if tr.size == 0 or te.size == 0]
        if empty:
            raise DomainUsageError(f"--split {self.kind}: group {empty[0]!r} has no readable test or training rows")
        test_rows = np.sort(np.concatenate([te for _, te in folds]))
        fold_of = np.empty(len(keep), dtype=np.int64)
        for i, (_, te) in enumerate(folds):
            fold_of[te] = i
        named = sorted(set(self.groups[keep].tolist())) if self.kind == "group-kfold" else list(self.names)
        info = {"kind": self.kind.replace("-", "_"), "group_column": self.column, "groups": named,
                "in_domain_folds": self.folds, "seed": self.seed}
        return folds, test_rows, fold_of[test_rows], info

    def report(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: list, classes: Sequence[str],
               probes: Sequence[Any], per_fold: dict[str, list[dict]], hierarchy: Any = None) -> dict[str, Any]:
        """metrics.json's ``domains``: per held-out group its metrics, missing classes and gaps
        (``group-kfold``: the groups each fold tests)."""
        from .crossval import run_probes
        from .report import summarize

        sizes = {g: int(n) for g, n in sorted(Counter(groups.tolist()).items())}
        if self.kind == "group-kfold":
            return {"group_column": self.column, "split": self.kind, "group_sizes": sizes,
                    "class_filter": self.class_filter,
                    "test_groups": [sorted(set(groups[test].tolist())) for _, test in folds]}
        t0 = time.perf_counter()
        held: dict[str, Any] = {}
        for i, (name, (train, test)) in enumerate(zip(self.names, folds)):
            test_counts, train_set = Counter(y[test].tolist()), set(y[train].tolist())
            absent = {c: int(test_counts[c]) for c in classes if test_counts.get(c) and c not in train_set}
            if absent:
                log.warning("held-out %s: classes absent from the training groups (counted as errors): %s", name,
                            ", ".join(f"{c} ({n})" for c, n in absent.items()))
            inner, small = in_domain_folds(y[train], self.folds, self.seed)
            result = run_probes(X[train], y[train], classes, probes, inner, hierarchy=hierarchy, groups=groups[train])
            inside = summarize({p: [_scalars(f) for f in fs] for p, fs in result.per_fold.items()})
            entry: dict[str, Any] = {
                "fold": i, "n_train": int(train.size), "n_test": int(test.size),
                "train_groups": sorted(set(groups[train].tolist())),
                "class_counts": {c: int(test_counts[c]) for c in classes if test_counts.get(c)},
                "classes_absent_from_training": absent, "n_absent_from_training": int(sum(absent.values())),
                "in_domain": {"folds": self.folds, "seed": self.seed, "small_classes": small}, "probes": {},
            }
            for probe in probes:
                out = _scalars(per_fold[probe.name][i])
                ind = {m: v["mean"] for m, v in inside[probe.name].items()}
                gap = {m: (ind[m] - out[m] if ind.get(m) is not None and out.get(m) is not None else None)
                       for m in HEADLINE_METRICS}
                entry["probes"][probe.name] = {"out_of_domain": out, "in_domain": ind, "gap": gap,
                                               "per_class": _held_out_per_class(per_fold[probe.name][i])}
            held[name] = entry
        return {"group_column": self.column, "split": self.kind, "headline_metrics": list(HEADLINE_METRICS),
                "group_sizes": sizes, "class_filter": self.class_filter, "held_out": held, "in_domain_s": time.perf_counter() - t0}


def prepare_domains(args: argparse.Namespace, data: Any, source: str | Path, hierarchy: Any = None,
                    has_test: bool = False) -> tuple[Any, DomainPlan | None]:
    """Check ``--split`` / ``--group-column`` / ``--classes``; return ``(data, plan)``: the data
    reduced to the shared classes with ``--classes shared``, and None for plain k-fold."""
    kind, holdout = parse_split(getattr(args, "split", "kfold"))
    column = getattr(args, "group_column", "dataset")
    mode = getattr(args, "classes", "all")
    if kind == "kfold" and mode == "all":
        return data, None
    if has_test:
        what = f"--split {args.split}" if kind != "kfold" else f"--classes {mode}"
        raise DomainUsageError(f"{what} cannot be combined with --test-data (the groups of --data are the split)")
    groups = read_groups(data, source, column)
    names = sorted(set(groups.tolist()))
    if len(names) < 2:
        raise DomainUsageError(f"--split {args.split} / --classes {mode}: column {column!r} of {source} has a single "
                               f"group {names[0]!r}; domain evaluation needs at least two (--group-column)")
    if holdout is not None and holdout not in names:
        raise DomainUsageError(f"--split holdout={holdout}: no group {holdout!r} in column {column!r} "
                               f"(groups: {', '.join(names)})")
    class_filter = None
    if mode == "shared":
        mapping = shared_class_map(data.labels, groups, hierarchy)
        rows = [i for i, label in enumerate(data.labels) if mapping[label] is not None]
        dropped = Counter(data.labels[i] for i in range(len(data.labels)) if mapping[data.labels[i]] is None)
        by_group = Counter(groups[i] for i in range(len(data.labels)) if mapping[data.labels[i]] is None)
        class_filter = {"mode": "shared", "classes": sorted({c for c in mapping.values() if c is not None}),
                        "mapping": mapping, "n_dropped": int(sum(dropped.values())),
                        "dropped_by_class": dict(sorted(dropped.items())), "dropped_by_group": dict(sorted(by_group.items()))}
        log.info("--classes shared: %d classes shared by %s; %d row(s) dropped (classes in fewer than all groups: %s)",
                 len(class_filter["classes"]), ", ".join(names), class_filter["n_dropped"],
                 ", ".join(f"{c} ({n})" for c, n in sorted(dropped.items())) or "none")
        if not rows:
            raise DomainUsageError(f"--classes shared: the groups of column {column!r} share no class")
        data = replace(data, paths=[data.paths[i] for i in rows], labels=[mapping[data.labels[i]] for i in rows],
                       records=[data.records[i] for i in rows], classes=class_filter["classes"])
        groups = groups[rows]
        if hierarchy is not None:
            data.classes = sorted(data.classes, key=hierarchy.index)
    return data, DomainPlan(column, kind, holdout, groups, class_filter, folds=args.folds, seed=args.seed)
