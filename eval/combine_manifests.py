"""``python -m eval.combine_manifests --input NAME=CSV[:LABEL_COLUMN] ... --output OUT.csv``

Pool labelled manifests (or ImageFolders) of several datasets into one manifest
``path,label,dataset`` for a domain-aware evaluation (``eval.run --split leave-one-group-out``,
docs/domain-generalisation.md). Each ``--input`` names its group (the ``dataset`` column, which
also picks the label map under hierarchies/label_maps with ``--hierarchy``), its source and,
after a colon, the column holding its labels (default ``label``). Paths are written absolute,
so the output may live anywhere (never inside the repository for real images).

Example (PBC's fine codes are in the ``code`` column)::

    python -m eval.combine_manifests --input pbc=/data/pbc_dev/labels.csv:code \\
        --input bccd=/data/bccd/labels.csv --output /tmp/pbc_bccd.csv
"""
from __future__ import annotations

import argparse
import csv
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dinov2_hier.cli import run_cli
from dinov2_hier.data.records import read_manifest, records_from_source
from dinov2_hier.errors import UserError
from dinov2_hier.io import atomic_write_text

__all__ = ["combine", "main"]


class CombineUsageError(UserError, ValueError):
    """A bad ``--input`` value."""


def _parse_input(spec: str) -> tuple[str, str, str]:
    name, eq, rest = spec.partition("=")
    if not eq or not name.strip() or not rest.strip():
        raise CombineUsageError(f"--input {spec!r}: expected NAME=CSV[:LABEL_COLUMN]")
    source, column = rest.strip(), "label"
    head, colon, tail = source.rpartition(":")
    if colon and head.lower().endswith(".csv") and tail and "/" not in tail:
        source, column = head, tail
    return name.strip(), source, column


def combine(inputs: Sequence[str], output: str | Path) -> Counter:
    """Write the pooled manifest; return ``Counter({dataset: rows})``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "dataset"])
    counts: Counter = Counter()
    names = set()
    for spec in inputs:
        name, source, column = _parse_input(spec)
        if name in names:
            raise CombineUsageError(f"--input {spec!r}: the name {name!r} is given twice")
        names.add(name)
        src = Path(source).expanduser()
        records = (read_manifest(src, label_column=column) if src.suffix.lower() == ".csv"
                   else records_from_source(src))
        labelled = [r for r in records if r.label is not None]
        if not labelled:
            raise CombineUsageError(f"--input {spec!r}: no labelled rows (label column {column!r})")
        for r in labelled:
            writer.writerow([r.path, r.label, name])
        counts[name] = len(labelled)
    atomic_write_text(Path(output), buffer.getvalue())
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.combine_manifests", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, metavar="NAME=CSV[:LABEL_COLUMN]",
                        help="a group (dataset) name, its manifest CSV or ImageFolder and optionally the label "
                             "column (default label); repeat for every dataset")
    parser.add_argument("--output", required=True, help="the pooled manifest to write (path,label,dataset)")
    args = parser.parse_args(argv)

    def job() -> None:
        counts = combine(args.input, args.output)
        print(f"{args.output}: " + ", ".join(f"{n} {name}" for name, n in counts.items()))

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
