"""Image records: where an image lives, its (optional) label and source dataset.

Two sources are supported:

* a CSV manifest with a header naming at least a ``path`` column, optionally
  ``label`` and ``dataset`` columns (other columns are ignored);
* an ImageFolder tree ``root/<class>/<image>``, the class folder name being the label.

Records hold resolved absolute paths so that they stay valid whatever the
working directory of the training process. Whether a file can be decoded is
not checked here (that would read every image); unreadable files are skipped
and counted at load time (see :mod:`dinov2_hier.data.datasets`).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import UserError

#: Lower-case file extensions recognised as images when scanning folders.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


class DataSourceError(UserError, ValueError):
    """A data source is missing or malformed: a CSV manifest (the message names the file
    and line), an ImageFolder root that is missing or holds no images (names the folder),
    or a source spec that is neither."""


#: One class under three names: a manifest's and a folder's errors were subclasses that
#: nothing caught apart from the others; the names stay for the code that imports them.
ManifestError = ImageFolderError = DataSourceError


@dataclass(frozen=True)
class Record:
    """One image.

    ``path`` is an absolute, normalised path; ``label`` is a hierarchy node id (leaf or
    internal node) or None for an unlabelled image; ``dataset`` names the source.
    """

    path: str
    label: str | None = None
    dataset: str | None = None


def _blank_to_none(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def read_manifest(
    csv_path: str | Path, dataset: str | None = None, label_column: str = "label"
) -> list[Record]:
    """Read a CSV manifest into records.

    Args:
        csv_path: CSV file with a header row. Required column ``path``; optional
            ``label_column`` (default ``label``; empty cell -> unlabelled) and
            ``dataset`` (empty cell or missing column -> the ``dataset`` argument).
            Relative paths resolve against the (symlink-resolved) folder holding the
            CSV; all paths are made absolute and normalised (``..`` removed).
        dataset: dataset name used where the CSV gives none.
        label_column: name of the label column (e.g. ``code`` for a manifest that
            stores its labels under another name).

    Raises:
        ManifestError: file missing or unreadable, no header, no ``path`` column,
            a row with a different number of fields than the header, or an empty path.
            The message names the file and the (1-based) line number.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise ManifestError(f"manifest not found: '{csv_path}'")
    base = csv_path.resolve().parent
    records: list[Record] = []
    try:
        # utf-8-sig drops a byte-order mark written by spreadsheet programs.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ManifestError(f"{csv_path}: empty file, expected a header row with a 'path' column")
            columns = [name.strip() for name in header]
            if "path" not in columns:
                raise ManifestError(
                    f"{csv_path}:{reader.line_num}: header {columns} has no 'path' column"
                )
            path_at = columns.index("path")
            label_at = columns.index(label_column) if label_column in columns else None
            dataset_at = columns.index("dataset") if "dataset" in columns else None
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue  # blank lines (often a trailing newline) carry no record
                line = reader.line_num
                if len(row) != len(columns):
                    raise ManifestError(
                        f"{csv_path}:{line}: expected {len(columns)} fields ({','.join(columns)}), "
                        f"got {len(row)}: {row}"
                    )
                raw_path = row[path_at].strip()
                if not raw_path:
                    raise ManifestError(f"{csv_path}:{line}: empty 'path' field")
                # The base folder is resolved once; per row only string normalisation, so
                # a million-row manifest costs no file-system calls.
                path = os.path.normpath(os.path.join(base, os.path.expanduser(raw_path)))
                label = _blank_to_none(row[label_at]) if label_at is not None else None
                row_dataset = _blank_to_none(row[dataset_at]) if dataset_at is not None else None
                records.append(Record(path, label, row_dataset or dataset))
    except csv.Error as e:
        raise ManifestError(f"{csv_path}: malformed CSV: {e}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{csv_path}: not UTF-8 text: {e}") from e
    return records


def read_manifests(paths: Iterable[str | Path], dataset: str | None = None) -> list[Record]:
    """Concatenate :func:`read_manifest` over ``paths``, in order."""
    records: list[Record] = []
    for path in paths:
        records.extend(read_manifest(path, dataset=dataset))
    return records


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def scan_image_folder(root: str | Path, dataset: str | None = None) -> list[Record]:
    """Records of an ImageFolder tree ``root/<class>/<...>/<image>``.

    The label is the class folder name. Images may sit in sub-folders of a class
    folder; hidden files and folders are ignored; files directly under ``root``
    are ignored (they have no class). The result is sorted by (class, path) so
    it is identical on every machine.

    Raises:
        ImageFolderError: ``root`` is not a directory or holds no images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ImageFolderError(f"image folder not found: '{root}'")
    root = root.resolve()
    records: list[Record] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(
            p for p in class_dir.rglob("*")
            if _is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
        )
        records.extend(Record(str(p), class_dir.name, dataset) for p in images)
    if not records:
        raise ImageFolderError(
            f"{root}: no images found in class sub-folders (expected root/<class>/<image> with "
            f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return records


def records_from_source(spec: str | Path, dataset: str | None = None) -> list[Record]:
    """Records from a ``.csv`` manifest file or an ImageFolder directory.

    Raises:
        DataSourceError: ``spec`` is neither an existing ``.csv`` file nor a directory.
    """
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".csv":
        return read_manifest(path, dataset=dataset)
    if path.is_dir():
        return scan_image_folder(path, dataset=dataset)
    raise DataSourceError(
        f"data source '{spec}' is neither a .csv manifest nor an existing directory"
    )
