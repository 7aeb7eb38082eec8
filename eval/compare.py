"""``python -m eval.compare DIR_A DIR_B [DIR_C ...] [--n-resamples 1000] [--seed 0] [--output-dir OUT]``

Paired significance between models evaluated on the same data: reads each directory's
``predictions.csv`` (an ``eval.run`` / ``eval.linear`` / ``eval.knn`` output directory; for
a directory holding a ``summary.json`` of several checkpoints, its best checkpoint), and for
every classifier present in both and every scalar metric runs the stratified paired
bootstrap of :func:`eval.bootstrap.compare_prediction_tables`. The first directory is the
reference: each other directory is compared with it, and the difference is
``metric(other) - metric(reference)`` (the paper's "model B - HierCE model").

Prints one table per pair (observed values, difference, 95% percentile interval, whether
it excludes 0) and, with ``--output-dir``, writes ``comparison.json`` and ``comparison.csv``.
The hierarchical metrics are compared when the reference's metrics.json names its
hierarchy (or ``--hierarchy`` is given).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinov2_hier.cli import prepare_output_dir, run_cli, setup_logging
from dinov2_hier.io import atomic_write_text

from .cli_common import SUMMARY_FILE, EvalUsageError
from .report import METRICS_FILE, PREDICTIONS_FILE, PredictionTable, json_safe, read_predictions_csv

__all__ = ["COMPARISON_COLUMNS", "compare_dirs", "format_comparison", "main", "resolve_eval_dir"]

log = logging.getLogger("dinov2_hier.eval.compare")

COMPARISON_COLUMNS = ("reference", "model", "classifier", "metric", "reference_value", "model_value",
                      "difference", "ci_low", "ci_high", "excludes_zero", "n_resamples", "n_valid")


def resolve_eval_dir(path: str | Path) -> Path:
    """The directory whose predictions.csv to use: ``path`` itself, or the best checkpoint's
    subdirectory named by ``path/summary.json``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise EvalUsageError(f"evaluation directory not found: '{path}'")
    if (p / PREDICTIONS_FILE).is_file():
        return p
    summary = p / SUMMARY_FILE
    if summary.is_file():
        doc = json.loads(summary.read_text(encoding="utf-8"))
        best = doc.get("best")
        if best and (p / best / PREDICTIONS_FILE).is_file():
            log.info("%s: using the best checkpoint %s (from %s)", p, best, SUMMARY_FILE)
            return p / best
    raise EvalUsageError(f"'{path}' holds no {PREDICTIONS_FILE} (nor a {SUMMARY_FILE} naming a checkpoint that has one)")


def _metrics_doc(directory: Path) -> dict[str, Any]:
    path = directory / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalUsageError(f"{path}: not valid JSON: {exc}") from None


def _hierarchy_for(spec: str | None, docs: Sequence[dict[str, Any]]) -> Any:
    """The hierarchy of the comparison: ``--hierarchy``, else the one the reference recorded."""
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.paths import resolve_resource

    recorded = [d.get("hierarchy") for d in docs]
    prints = {r.get("fingerprint") for r in recorded if isinstance(r, dict) and r.get("fingerprint")}
    if len(prints) > 1:
        raise EvalUsageError("the directories were evaluated with different hierarchies; their labels are not comparable")
    if spec is None:
        ref = recorded[0] if recorded else None
        if not isinstance(ref, dict) or not ref.get("path"):
            return None
        spec = ref["path"]
    return Hierarchy.from_json(resolve_resource(spec, "hierarchy"))


def _paired_columns(a: dict[str, Any], b: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> tuple[dict, dict]:
    """Columns ``model=reference`` of ``pairs`` under one name ``"model vs reference"`` in both
    tables (e.g. a fine-tuned ``finetune`` column against a frozen probe's ``logreg``)."""
    a, b = dict(a), dict(b)
    for model, reference in pairs:
        for table, column, side in ((a, model, "model"), (b, reference, "reference")):
            if column not in table:
                raise EvalUsageError(f"--pair {model}={reference}: the {side} has no column {column!r}")
        label = f"{model} vs {reference}"
        a[label], b[label] = a[model], b[reference]
    return a, b


def compare_dirs(dirs: Sequence[str | Path], n_resamples: int = 1000, seed: int = 0,
                 hierarchy: str | None = None, pairs: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """Rows of :data:`COMPARISON_COLUMNS`: every directory after the first against the first.

    ``pairs``: ``(model column, reference column)`` compared under the classifier name
    ``"model vs reference"``, besides the columns both tables share."""
    from .bootstrap import compare_prediction_tables

    if len(dirs) < 2:
        raise EvalUsageError("name at least two evaluation directories to compare")
    if n_resamples < 1:
        raise EvalUsageError(f"--n-resamples must be >= 1, got {n_resamples}")
    resolved = [resolve_eval_dir(d) for d in dirs]
    tables: list[PredictionTable] = [read_predictions_csv(d).sorted_by_sample() for d in resolved]
    tree = _hierarchy_for(hierarchy, [_metrics_doc(d) for d in resolved])
    reference, ref_table = resolved[0], tables[0]
    rows: list[dict[str, Any]] = []
    for other, table in zip(resolved[1:], tables[1:]):
        if len(table) != len(ref_table) or (table.sample != ref_table.sample).any():
            raise EvalUsageError(
                f"'{other}' and '{reference}' hold different samples ({len(table)} vs {len(ref_table)} rows); "
                "a paired comparison needs the same data, folds or split"
            )
        if (table.fold != ref_table.fold).any():
            log.warning("'%s' and '%s' were evaluated on different folds or splits (same samples): the "
                        "comparison is still paired by sample, but use the same --folds/--seed or --test-data "
                        "for a like-for-like test", other, reference)
        # A - B with A = the other model and B = the reference: difference = model - reference.
        columns_a, columns_b = _paired_columns(table.columns(), ref_table.columns(), pairs)
        result = compare_prediction_tables(columns_a, columns_b, hierarchy=tree,
                                           n_resamples=n_resamples, seed=seed)
        for classifier, metrics in result.items():
            for metric, r in metrics.items():
                rows.append({
                    "reference": str(reference), "model": str(other), "classifier": classifier, "metric": metric,
                    "reference_value": r["b"], "model_value": r["a"], "difference": r["observed"],
                    "ci_low": r["ci_low"], "ci_high": r["ci_high"], "excludes_zero": r["excludes_zero"],
                    "n_resamples": r["n_resamples"], "n_valid": r.get("n_valid", r["n_resamples"]),
                })
    return rows


def _num(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_comparison(rows: Sequence[dict[str, Any]], n_resamples: int, seed: int) -> str:
    """Plain-text tables, one per (reference, model) pair."""
    from dinov2_hier.metrics import metric_label

    out: list[str] = []
    pairs: list[tuple[str, str]] = []
    for r in rows:
        if (r["reference"], r["model"]) not in pairs:
            pairs.append((r["reference"], r["model"]))
    for ref, model in pairs:
        out.append(f"B = {model}")
        out.append(f"  vs A = {ref}")
        out.append(f"  stratified paired bootstrap, {n_resamples} resamples, seed {seed}; difference = B - A")
        header = f"  {'classifier':<10} {'metric':<32} {'A':>8} {'B':>8} {'B - A':>8}  {'95% CI':<19} excludes 0"
        out.append(header)
        for r in rows:
            if (r["reference"], r["model"]) != (ref, model):
                continue
            ci = f"[{_num(r['ci_low'], True)}, {_num(r['ci_high'], True)}]"
            name = metric_label(r["metric"])
            out.append(f"  {r['classifier']:<10} {name:<32} {_num(r['reference_value']):>8} "
                       f"{_num(r['model_value']):>8} {_num(r['difference'], True):>8}  {ci:<19} "
                       f"{'yes' if r['excludes_zero'] else 'no'}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _write_outputs(out_dir: Path, rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    doc = {"n_resamples": args.n_resamples, "seed": args.seed, "difference": "model - reference",
           "interval": "95% percentile interval of the stratified paired bootstrap", "rows": list(rows)}
    atomic_write_text(out_dir / "comparison.json", json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COMPARISON_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in json_safe(list(rows)):
        writer.writerow(r)
    atomic_write_text(out_dir / "comparison.csv", buffer.getvalue())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.compare",
        description="Paired stratified bootstrap between models evaluated on the same data (each directory "
                    "against the first).",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="evaluation output directories (the first is the reference)")
    parser.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--hierarchy", default=None,
                        help="hierarchy JSON for the hierarchical metrics (default: the one recorded in the "
                             "reference's metrics.json)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="also write comparison.json and comparison.csv here")
    parser.add_argument("--pair", action="append", default=[], metavar="MODEL_COLUMN=REFERENCE_COLUMN",
                        help="also compare two differently named classifier columns, e.g. finetune=logreg "
                             "(a fine-tuned model against a frozen probe); repeatable")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def job() -> None:
        if args.output_dir is not None:
            prepare_output_dir(args.output_dir)
        setup_logging(args.output_dir / "log.txt" if args.output_dir else None)
        pairs = []
        for spec in args.pair:
            model, sep, reference = spec.partition("=")
            if not sep or not model or not reference:
                raise EvalUsageError(f"--pair takes MODEL_COLUMN=REFERENCE_COLUMN, got {spec!r}")
            pairs.append((model, reference))
        rows = compare_dirs(args.dirs, n_resamples=args.n_resamples, seed=args.seed, hierarchy=args.hierarchy,
                            pairs=pairs)
        if args.output_dir is not None:
            _write_outputs(args.output_dir, rows, args)
        print(format_comparison(rows, args.n_resamples, args.seed), end="")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
