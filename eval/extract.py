"""``python -m eval.extract --ckpt CKPT --data MANIFEST|FOLDER --output FILE [--patch-tokens]``

Frozen features of every image of a manifest (labels optional: unlabelled rows are kept) or
an ImageFolder, written to one ``.npz`` or Parquet file (by the suffix of ``--output``):
the CLS token, the mean of the patch tokens and, with ``--patch-tokens``, the patch tokens,
with the image paths, labels and an ``ok`` flag (False: missing or unreadable image, zero
features). The images go through :func:`eval.extraction.iter_feature_blocks`, the loop of
the evaluation's feature cache (same preprocessing, same batches, bf16 autocast on CUDA),
so the CLS features equal what ``eval.run`` caches for the same checkpoint and settings.

Resume: finished chunks of ``--chunk-size`` images are kept in ``FILE.parts/``; a killed
job run again with the same command starts after the last complete chunk and writes the
same file as an uninterrupted run (the chunks are cut at batch boundaries, so every image
is computed in the same batch). The layout of the output: eval/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.cli import run_cli, setup_logging
from dinov2_hier.io import atomic_write_file

from .cli_common import EvalUsageError, add_backbone_args, add_extraction_args, resolve_device
from .extract_output import ChunkStore, output_format, require_pyarrow, write_npz, write_parquet

__all__ = ["DEFAULT_CHUNK_SIZE", "build_parser", "extract_to_file", "main"]

logger = logging.getLogger("dinov2_hier.eval")

#: Images per resumable chunk (rounded up to a multiple of the batch size).
DEFAULT_CHUNK_SIZE = 1024
_JOB_FORMAT = "dinov2_hier.eval.extract/1"
MAX_LISTED_UNREADABLE = 5


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line (``error: argument --device: invalid choice: 'gpu' ...``), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m eval.extract",
                     description="CLS, mean-pooled patch and (optionally) patch-token features of every image, "
                                 "with paths and labels, as .npz or Parquet; resumable.")
    g = parser.add_argument_group("model and data")
    add_backbone_args(g, directory="its newest checkpoint")
    g.add_argument("--data", required=True,
                   help="manifest CSV (column path; label optional, unlabelled rows kept), ImageFolder (labels: the "
                        "class folders) or a folder of images (unlabelled)")
    g.add_argument("--label-column", default="label", help="manifest column holding the labels (default: label)")
    g = parser.add_argument_group("feature extraction")
    add_extraction_args(g)
    g.add_argument("--seed", type=int, default=0, help="seed of the untrained --ckpt none backbone (default 0)")
    g = parser.add_argument_group("output")
    g.add_argument("--output", type=Path, required=True,
                   help="FILE.npz (default format) or FILE.parquet (needs pyarrow); partial work in FILE.parts/")
    g.add_argument("--patch-tokens", action="store_true",
                   help="also store the patch tokens [n, N, D] (N = (crop / patch)^2; large)")
    g.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"images per resumable chunk (default {DEFAULT_CHUNK_SIZE}, rounded up to a multiple "
                        "of --batch-size)")
    return parser


def _check(name: str, value: int | None, least: int) -> None:
    if value is not None and value < least:
        raise EvalUsageError(f"{name} must be at least {least}, got {value}")


def _records(data: str, label_column: str) -> list[Any]:
    """A manifest's rows (labels optional), an ImageFolder's images (labels: the class
    folders) or, for a folder of images without class folders, its images unlabelled."""
    from dinov2_hier.data import IMAGE_EXTENSIONS, ImageFolderError, Record, read_manifest, records_from_source

    from .crossval import EvalDataError

    src = Path(data).expanduser()
    if src.suffix.lower() == ".csv":
        records = read_manifest(src, label_column=label_column)
    else:
        try:
            records = records_from_source(src)
        except ImageFolderError:
            loose = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_EXTENSIONS) if src.is_dir() else []
            if not loose:
                raise
            records = [Record(str(p.resolve())) for p in loose]
    if not records:
        raise EvalDataError(f"{src}: no images listed")
    return records


def _job_key(backbone: Any, paths: Sequence[str], crop: int, resize_mode: str, precision: str,
             outputs: Sequence[str], batch_size: int, chunk_size: int) -> str:
    """What the chunks depend on: the cache key (weights, files with sizes and mtimes,
    preprocessing, precision), the order of the paths, the outputs and the batching."""
    from .extraction import feature_cache_key

    meta = backbone.meta
    payload = {
        "format": _JOB_FORMAT,
        "features": feature_cache_key(backbone.fingerprint, paths, crop, resize_mode, meta["mean"], meta["std"],
                                      precision),
        "order": hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest(),
        "outputs": list(outputs), "batch_size": int(batch_size), "chunk_size": int(chunk_size),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def extract_to_file(
    ckpt: str,
    data: str,
    output: str | os.PathLike,
    *,
    arch: str | None = None,
    select: str | None = None,
    label_column: str = "label",
    patch_tokens: bool = False,
    crop_size: int | None = None,
    resize_mode: str = "pad",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    threads: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    seed: int = 0,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the features of ``data`` to ``output`` (the module's docstring); returns the
    file's ``meta`` record. ``on_chunk(i, n_chunks)`` runs after chunk ``i`` is stored (an
    exception there stops the job as a kill would: the stored chunks stay for a rerun)."""
    import torch

    from .extraction import Progress, extraction_crop, iter_feature_blocks, precision_tag
    from .features import load_eval_backbone, resolve_checkpoints

    output = Path(output).expanduser()
    fmt = output_format(output)
    if fmt == "parquet":
        require_pyarrow()
    _check("--batch-size", batch_size, 1)
    _check("--chunk-size", chunk_size, 1)
    _check("--num-workers", num_workers, 0)
    _check("--threads", threads, 1)
    if output.is_dir():
        raise EvalUsageError(f"--output {output} is a directory; name a .npz or .parquet file")
    dev = torch.device(resolve_device(device))
    records = _records(data, label_column)
    chosen = resolve_checkpoints(ckpt, select)
    if len(chosen) > 1:
        logger.info("%s holds %d checkpoints; extracting with the newest, %s", ckpt, len(chosen), chosen[-1][0])
    backbone = load_eval_backbone(chosen[-1][1], arch, dev, seed=seed)
    crop = extraction_crop(backbone, crop_size, resize_mode)
    outputs = ("cls", "pooled", "patch_tokens") if patch_tokens else ("cls", "pooled")
    chunk = -(-chunk_size // batch_size) * batch_size
    if chunk != chunk_size:
        logger.info("--chunk-size %d rounded up to %d, a multiple of --batch-size %d", chunk_size, chunk, batch_size)

    paths = [r.path for r in records]
    precision = precision_tag(dev)
    key = _job_key(backbone, paths, crop, resize_mode, precision, outputs, batch_size, chunk)
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.*.tmp"):  # a final file killed while being written
        stale.unlink()
    store = ChunkStore(Path(f"{output}.parts"), key, len(paths), chunk, outputs)
    done = store.open()
    first = store.rows(done)[0] if done < store.n_chunks else len(paths)
    if done:
        logger.info("resuming %s: %d of %d chunks (%d of %d images) already extracted in %s", output, done,
                    store.n_chunks, first, len(paths), store.folder)
    start = time.perf_counter()
    if first < len(paths):
        bar = Progress(len(paths), progress, initial=first)
        blocks = iter_feature_blocks(backbone, paths[first:], outputs=outputs, crop_size=crop,
                                     resize_mode=resize_mode, batch_size=batch_size, num_workers=num_workers,
                                     device=dev, progress=bar, threads=threads)
        try:
            with closing(blocks):
                _store_chunks(blocks, store, done, first, outputs, on_chunk)
        finally:
            bar.close()
    elapsed = time.perf_counter() - start

    ok = np.concatenate([store.read(i, "ok") for i in range(store.n_chunks)]) if paths else np.zeros(0, bool)
    n_patches = (crop // int(backbone.meta["patch_size"])) ** 2
    meta = {
        "format": _JOB_FORMAT, "source": backbone.source, "fingerprint": backbone.fingerprint,
        "arch": backbone.meta.get("arch"), "iteration": backbone.meta.get("iteration"),
        "embed_dim": backbone.embed_dim, "patch_size": int(backbone.meta["patch_size"]), "crop_size": crop,
        "num_patches": n_patches, "resize_mode": resize_mode, "mean": list(backbone.meta["mean"]),
        "std": list(backbone.meta["std"]), "precision": precision, "outputs": list(outputs),
        "n_images": len(paths), "n_unreadable": int((~ok).sum()), "data": str(data),
    }
    labels = [r.label for r in records]
    _write_output(output, fmt, meta, paths, labels, ok, store, outputs, backbone.embed_dim, n_patches)
    store.clear()
    computed = len(paths) - first
    logger.info("wrote %s: %d images (%d extracted now in %.1f s, %.1f img/s, %s on %s)", output, len(paths),
                computed, elapsed, computed / max(elapsed, 1e-9), precision, dev)
    bad = [p for p, good in zip(paths, ok) if not good]
    if bad:
        shown = ", ".join(bad[:MAX_LISTED_UNREADABLE]) + (", ..." if len(bad) > MAX_LISTED_UNREADABLE else "")
        logger.warning("%d of %d images missing or unreadable, stored with ok=False and zero features: %s",
                       len(bad), len(paths), shown)
    return meta


def _store_chunks(blocks: Iterator[Any], store: ChunkStore, done: int, first: int, outputs: Sequence[str],
                  on_chunk: Callable[[int, int], None] | None) -> None:
    """Cut the blocks (rows ``first ...`` of the job) into the store's chunks ``done ...``."""
    pending: list[Any] = []
    have = first  # rows up to here arrived
    i = done

    def flush(upto: int) -> None:
        nonlocal pending, i
        start, stop = store.rows(i)
        assert stop == upto
        arrays = {name: np.concatenate([getattr(b, name) for b in pending]) for name in ("ok", *outputs)}
        lo = start - (pending[0].start + first)
        store.write(i, {name: a[lo:lo + stop - start] for name, a in arrays.items()})
        # keep what belongs to the next chunk
        rest = pending[-1]
        cut = stop - (rest.start + first)
        pending = [] if cut >= len(rest.ok) else [_slice(rest, cut)]
        if on_chunk is not None:
            on_chunk(i, store.n_chunks)
        i += 1

    for block in blocks:
        pending.append(block)
        have = first + block.stop
        while i < store.n_chunks and have >= store.rows(i)[1]:
            flush(store.rows(i)[1])
    if i != store.n_chunks:
        raise RuntimeError(f"extraction ended after chunk {i} of {store.n_chunks}")


def _slice(block: Any, cut: int) -> Any:
    from .extraction import FeatureBlock

    return FeatureBlock(block.start + cut, block.ok[cut:],
                        *(None if a is None else a[cut:] for a in (block.cls, block.pooled, block.patch_tokens)))


def _chunks_of(store: ChunkStore, name: str) -> Iterator[np.ndarray]:
    for i in range(store.n_chunks):
        yield store.read(i, name)


def _write_output(output: Path, fmt: str, meta: dict, paths: Sequence[str], labels: Sequence[str | None],
                  ok: np.ndarray, store: ChunkStore, outputs: Sequence[str], dim: int, n_patches: int) -> None:
    """The final file, written next to ``output`` and moved into place."""

    def write(tmp: str) -> None:
        if fmt == "npz":
            shapes = {"cls": (len(paths), dim), "pooled": (len(paths), dim),
                      "patch_tokens": (len(paths), n_patches, dim)}
            arrays = {"paths": np.array(list(paths), dtype=str),
                      "labels": np.array(["" if x is None else x for x in labels], dtype=str), "ok": ok,
                      "meta": np.array(json.dumps(meta, sort_keys=True))}
            streamed = {name: (shapes[name], _chunks_of(store, name)) for name in outputs}
            write_npz(Path(tmp), arrays, streamed)
        else:
            dims = {"cls": dim, "pooled": dim, "patch_tokens": n_patches * dim}
            write_parquet(Path(tmp), meta, paths, labels, ok, store, {name: dims[name] for name in outputs})

    atomic_write_file(output, write)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> None:
        setup_logging(None)
        meta = extract_to_file(
            args.ckpt, args.data, args.output, arch=args.arch, select=args.select, label_column=args.label_column,
            patch_tokens=args.patch_tokens, crop_size=args.crop_size, resize_mode=args.resize_mode,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, threads=args.threads,
            chunk_size=args.chunk_size, progress=args.progress, seed=args.seed)
        print(f"{args.output}: {meta['n_images']} images ({meta['n_unreadable']} unreadable), "
              f"{', '.join(meta['outputs'])}, D={meta['embed_dim']}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
