"""The files of ``python -m eval.extract``: resumable chunks, then one ``.npz`` or Parquet file.

* :class:`ChunkStore` keeps finished chunks of ``chunk_size`` rows in ``OUTPUT.parts/``
  (``chunk_000000.npz``, ... written atomically, plus ``job.json`` with the job's key): a
  rerun of the same job (same weights, files, preprocessing, outputs, batch and chunk size)
  starts after the last complete chunk; another job's chunks are discarded.
* :func:`write_npz` streams the chunks into one uncompressed ``.npz`` (no array is held
  whole in memory; fixed zip timestamps, so equal jobs give equal bytes);
  :func:`write_parquet` writes one row group per chunk (pyarrow, an optional extra:
  :func:`require_pyarrow`).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.errors import UserError
from dinov2_hier.io import atomic_savez

__all__ = ["FORMATS", "ChunkStore", "OutputFormatError", "output_format", "require_pyarrow", "write_npz",
           "write_parquet"]

logger = logging.getLogger("dinov2_hier.eval")

#: Output suffix -> format.
FORMATS = {".npz": "npz", ".parquet": "parquet"}
_JOB_FILE = "job.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class OutputFormatError(UserError, ValueError):
    """An output file of an unknown kind, or Parquet without pyarrow."""


def output_format(path: Path) -> str:
    """``"npz"`` or ``"parquet"`` by the suffix of ``path`` (else :class:`OutputFormatError`)."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputFormatError(f"--output {path}: unknown format {path.suffix or '(no suffix)'!r}; "
                                "name a .npz or a .parquet file")
    return fmt


def require_pyarrow() -> None:
    """Parquet needs pyarrow (the ``parquet`` extra); without it one clear error."""
    try:
        importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise OutputFormatError("writing Parquet needs pyarrow, which is not installed: pip install pyarrow "
                                "(or pip install 'dinov2_hier[parquet]'), or write a .npz file") from None


class ChunkStore:
    """Chunks ``0 .. n_chunks - 1`` of a job in ``folder``; chunk ``i`` holds rows
    ``i * chunk_size ...`` (the last one fewer): ``ok`` and the feature arrays."""

    def __init__(self, folder: Path, key: str, n_rows: int, chunk_size: int, outputs: Sequence[str]) -> None:
        self.folder, self.key, self.n_rows, self.chunk_size = folder, key, n_rows, chunk_size
        self.outputs = tuple(outputs)
        self.n_chunks = -(-n_rows // chunk_size)

    def rows(self, i: int) -> tuple[int, int]:
        return i * self.chunk_size, min(self.n_rows, (i + 1) * self.chunk_size)

    def path(self, i: int) -> Path:
        return self.folder / f"chunk_{i:06d}.npz"

    def _owned(self) -> list[Path]:
        """The files this store writes (chunks, the job file, their temporary files)."""
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.iterdir()
                if p.name == _JOB_FILE or (p.name.lstrip(".").startswith("chunk_") and p.suffix in (".npz", ".tmp"))
                or (p.name.startswith(f".{_JOB_FILE}.") and p.suffix == ".tmp")]

    def _valid(self, i: int) -> bool:
        start, stop = self.rows(i)
        try:
            with np.load(self.path(i), allow_pickle=False) as data:
                return all(data[name].shape[0] == stop - start for name in ("ok", *self.outputs))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return False

    def open(self) -> int:
        """Prepare the folder and return how many chunks are done (0 for a new job)."""
        job = self.folder / _JOB_FILE
        if job.is_file():
            try:
                recorded = json.loads(job.read_text(encoding="utf-8")).get("key")
            except (OSError, ValueError, AttributeError):
                recorded = None
            if recorded != self.key:
                logger.warning("%s holds the chunks of another extraction (other weights, files, settings or "
                               "outputs); starting over", self.folder)
                self.clear()
        self.folder.mkdir(parents=True, exist_ok=True)
        if not job.is_file():
            for p in self._owned():  # stray chunks without a job file: not ours to trust
                p.unlink()
            fd, tmp = tempfile.mkstemp(prefix=f".{_JOB_FILE}.", suffix=".tmp", dir=self.folder)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": self.key, "rows": self.n_rows, "chunk_size": self.chunk_size}, f)
            os.replace(tmp, job)
        done = 0
        while done < self.n_chunks and self.path(done).is_file() and self._valid(done):
            done += 1
        for i in range(done, self.n_chunks):  # a broken chunk and anything after it
            if self.path(i).exists():
                self.path(i).unlink()
        return done

    def write(self, i: int, arrays: dict[str, np.ndarray]) -> None:
        atomic_savez(self.path(i), **arrays)

    def read(self, i: int, name: str) -> np.ndarray:
        with np.load(self.path(i), allow_pickle=False) as data:
            return data[name]

    def clear(self) -> None:
        for p in self._owned():
            p.unlink()
        try:
            self.folder.rmdir()
        except OSError:  # something of the user's is in it: left alone
            pass


def _member(zf: zipfile.ZipFile, name: str) -> Any:
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    return zf.open(info, "w", force_zip64=True)


def write_npz(path: Path, arrays: dict[str, np.ndarray], streamed: dict[str, tuple[tuple[int, ...], Iterator]]
              ) -> None:
    """An uncompressed ``.npz`` at ``path`` (``np.load`` reads it) with the in-memory
    ``arrays`` and the ``streamed`` ones: name -> (shape, iterator of float32 row blocks
    that together fill the shape), in insertion order."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with _member(zf, name) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
        for name, (shape, blocks) in streamed.items():
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": tuple(int(s) for s in shape)}
            with _member(zf, name) as f:
                np.lib.format.write_array_header_1_0(f, header)
                rows = 0
                for block in blocks:
                    block = np.ascontiguousarray(block, dtype=np.float32)
                    f.write(block.tobytes())
                    rows += block.shape[0]
                if rows != shape[0]:
                    raise ValueError(f"{name}: {rows} rows streamed, {shape[0]} declared")


def write_parquet(path: Path, meta: dict, paths: Sequence[str], labels: Sequence[str | None],
                  ok: np.ndarray, store: ChunkStore, dims: dict[str, int]) -> None:
    """One row per image: ``path``, ``label`` (null: unlabelled), ``ok`` and a
    ``fixed_size_list<float32>`` column per output of ``dims`` (its list size); one row group
    per chunk; ``meta`` as JSON under the schema metadata key ``dinov2_hier``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field("path", pa.string()), pa.field("label", pa.string()), pa.field("ok", pa.bool_())]
    fields += [pa.field(name, pa.list_(pa.float32(), size)) for name, size in dims.items()]
    schema = pa.schema(fields, metadata={b"dinov2_hier": json.dumps(meta, sort_keys=True).encode("utf-8")})
    writer = pq.ParquetWriter(str(path), schema)
    try:
        for i in range(store.n_chunks):
            start, stop = store.rows(i)
            columns = [pa.array(list(paths[start:stop]), pa.string()), pa.array(list(labels[start:stop]), pa.string()),
                       pa.array(ok[start:stop], pa.bool_())]
            for name, size in dims.items():
                values = np.ascontiguousarray(store.read(i, name), dtype=np.float32).reshape(-1)
                columns.append(pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), size))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    finally:
        writer.close()
