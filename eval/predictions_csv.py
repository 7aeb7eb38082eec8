"""The column form of a ``predictions.csv`` (``{column: [value per row]}``, all strings).

:func:`read_predictions_csv` reads one; :func:`prediction_columns` names its classifier
columns (every column but :data:`RESERVED_COLUMNS`); ``_check_same_samples`` checks that two
tables hold the same samples in the same order, as the paired bootstrap of
:func:`eval.bootstrap.compare_prediction_tables` needs. Errors are
:class:`PredictionTableError`, naming the file and line or the first mismatching row.
"""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dinov2_hier.errors import UserError
from dinov2_hier.metrics import MetricInputError

__all__ = [
    "RESERVED_COLUMNS",
    "PredictionTableError",
    "prediction_columns",
    "read_predictions_csv",
]

# Columns of predictions.csv that are not classifiers.
RESERVED_COLUMNS: tuple[str, ...] = ("sample", "path", "fold", "y_true")


class PredictionTableError(UserError, MetricInputError):
    """Two prediction tables that cannot be compared, or an unreadable predictions CSV."""


def prediction_columns(table: Mapping[str, Sequence[str]]) -> list[str]:
    """The classifier columns of a predictions table: every column but ``RESERVED_COLUMNS``."""
    return [c for c in table if c not in RESERVED_COLUMNS]


def _table_rows(table: Any, name: str) -> int:
    if not isinstance(table, Mapping):
        raise PredictionTableError(f"{name} must be a dict of column -> list, got {type(table).__name__}")
    if "y_true" not in table:
        raise PredictionTableError(f"{name} has no 'y_true' column (columns: {', '.join(map(str, table)) or 'none'})")
    n_rows = len(table["y_true"])
    for column, values in table.items():
        if len(values) != n_rows:
            raise PredictionTableError(
                f"{name}: column {column!r} has {len(values)} rows but 'y_true' has {n_rows}"
            )
    if n_rows == 0:
        raise PredictionTableError(f"{name} has no rows")
    return n_rows


def _row_name(table: Mapping[str, Sequence[str]], i: int) -> str:
    text = f"row {i + 1}"
    if "sample" in table:
        text += f" (sample {table['sample'][i]!r})"
    return text


def _check_same_samples(table_a: Mapping[str, Sequence[str]], table_b: Mapping[str, Sequence[str]]) -> None:
    n_a, n_b = _table_rows(table_a, "table A"), _table_rows(table_b, "table B")
    if n_a != n_b:
        raise PredictionTableError(
            f"the tables have different numbers of rows ({n_a} in A, {n_b} in B); a paired comparison "
            "needs the same samples in the same order"
        )
    for column in ("sample", "path", "y_true"):
        if column not in table_a or column not in table_b:
            continue
        for i, (x, y) in enumerate(zip(table_a[column], table_b[column])):
            if str(x) != str(y):
                raise PredictionTableError(
                    f"the tables differ at {_row_name(table_a, i)} (1-based, after the header): "
                    f"{column} is {x!r} in A but {y!r} in B; a paired comparison needs the same samples "
                    "in the same order with the same y_true"
                )


def read_predictions_csv(path: str | Path) -> dict[str, list[str]]:
    """Read a ``predictions.csv`` into ``{column: [value per row]}`` (all values as strings).

    Errors (unreadable file, no header, a repeated column, a row with the wrong number of
    fields, no ``y_true`` column) raise :class:`PredictionTableError` naming the file and line.
    """
    source = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise PredictionTableError(f"{source}: empty file, expected a header line")
            seen: set[str] = set()
            for column in header:
                if not column:
                    raise PredictionTableError(f"{source}:1: empty column name in the header")
                if column in seen:
                    raise PredictionTableError(f"{source}:1: column {column!r} appears twice in the header")
                seen.add(column)
            if "y_true" not in seen:
                raise PredictionTableError(f"{source}:1: no 'y_true' column (columns: {', '.join(header)})")
            table: dict[str, list[str]] = {column: [] for column in header}
            columns = list(table.values())
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise PredictionTableError(
                        f"{source}:{reader.line_num}: expected {len(header)} fields, got {len(row)}"
                    )
                for values, value in zip(columns, row):
                    values.append(value)
    except OSError as exc:
        raise PredictionTableError(f"{source}: cannot read predictions: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PredictionTableError(f"{source}: file is not valid UTF-8 ({exc.reason})") from None
    except csv.Error as exc:
        raise PredictionTableError(f"{source}: malformed CSV: {exc}") from None
    return table
