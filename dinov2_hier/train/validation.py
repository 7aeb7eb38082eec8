"""Held-out validation: the split, the loss pass on it, and checkpoint selection by it.

As in the paper, a share of the training data (``data.val_fraction``) or a separate
manifest (``data.val``) is held out; every ``train.val_every`` iterations and at every
regular checkpoint the *training losses* (DINO, iBOT, KoLeo, supervised terms and their
weighted total) are computed on it, without gradient, and logged to ``metrics.jsonl`` as
a record with ``"split": "val"``. :func:`best_checkpoint` then names the checkpoint with
the lowest validation loss, which ``eval.run --select val_loss`` and
``python -m dinov2_hier.export --select val_loss`` use.

* **The split** (:func:`held_out_indices`) is a pure function of ``seed`` and the images'
  paths (and labels): an image is held out when its seeded hash ranks among the lowest
  ``round(fraction * n)`` of its label's images (all images form one stratum when none
  is labelled). Nothing is stored: a resumed run recomputes the same split, and the
  order of the manifest's rows does not matter.
* **The pass** (:class:`ValidationPass`) runs the model as training does (train mode, so
  the student's stochastic depth too; the current teacher temperature; the training
  augmentations and masks, and the local crops with ``crops.local_crops_number`` > 0, so
  that ``val_dino`` is the training DINO loss) under ``torch.no_grad``. Its randomness is
  fixed: image ``i`` of the held-out set always gets the augmentation and masks of draw
  ``i``, the batches are the same every pass (one fixed shuffle of the held-out set, so a
  batch mixes labels as a training batch does: Sinkhorn-Knopp normalises over the batch),
  and the global RNG is re-seeded for the pass and restored after it. The model's buffers (the softmax
  centres) are restored too, so training with validation on is bitwise the run without.
  On several ranks each rank takes its shard of the held-out set (the last images
  repeated to give every rank as many) and the per-image sums are all-reduced.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..config import ConfigError
from ..data import ImageRecordDataset, SubsetDataset, SyntheticCellDataset, derive_seed, torch_generator
from ..io import read_jsonl
from .checkpoint import METRICS_FILE, CheckpointError, list_checkpoints
from .data import SYNTHETIC, TrainData, _training_records, ignore_stop_signals
from .parallel import unwrap
from .step import Precision
from .supervision import item_labels

logger = logging.getLogger("dinov2_hier.train")

#: ``metrics.jsonl`` records of the validation pass carry ``"split": VAL_SPLIT``; training
#: records carry no ``split`` key.
SPLIT_KEY, VAL_SPLIT = "split", "val"
#: Prefix of the validation losses in a record: ``val_dino``, ..., ``val_total``.
VAL_PREFIX = "val_"
#: The selection criterion of ``--select val_loss``.
DEFAULT_CRITERION = "val_total"
#: Stream numbers of :func:`~dinov2_hier.data.derive_seed` for the pass's randomness.
_ORDER_STREAM, _RNG_STREAM = 7_010_001, 7_010_002


def is_val_record(record: dict) -> bool:
    """Whether a ``metrics.jsonl`` record is a validation record (not a training step's)."""
    return record.get(SPLIT_KEY) == VAL_SPLIT


# --------------------------------------------------------------------------- the split


def _hash_rank(seed: int, path: str) -> int:
    digest = hashlib.blake2b(f"{seed}\n{path}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def held_out_indices(paths: Sequence[str], labels: Sequence[str | None], fraction: float, seed: int) -> list[int]:
    """Indices (ascending) of the items held out for validation.

    Stratified by label when any item is labelled (unlabelled items form a stratum of their
    own): of each stratum of ``n`` items, the ``floor(fraction * n + 0.5)`` whose hash of
    ``(seed, path)`` is lowest are held out. Depends on the paths, labels and seed only,
    not on the items' order.
    """
    strata: dict[str | None, list[int]] = {}
    labelled = any(label is not None for label in labels)
    for i, label in enumerate(labels):
        strata.setdefault(label if labelled else None, []).append(i)
    chosen: list[int] = []
    for members in strata.values():
        n_val = math.floor(fraction * len(members) + 0.5)
        ranked = sorted(members, key=lambda i: (_hash_rank(seed, paths[i]), paths[i], i))
        chosen.extend(ranked[:n_val])
    return sorted(chosen)


def _item_paths(dataset: Dataset) -> list[str]:
    if isinstance(dataset, ImageRecordDataset):
        return [r.path for r in dataset.records]
    if isinstance(dataset, SyntheticCellDataset):
        return [f"synthetic:{dataset.generator.seed}:{i}" for i in range(len(dataset))]
    raise TypeError(f"cannot list the paths of {type(dataset).__name__}")


def _subset(dataset: Dataset, indices: Sequence[int]) -> Dataset:
    if isinstance(dataset, ImageRecordDataset):
        return ImageRecordDataset([dataset.records[i] for i in indices], dataset.transform)
    return SubsetDataset(dataset, indices)


def _sources(value) -> list[str]:  # noqa: ANN001 (str or ListConfig)
    return [value] if isinstance(value, str) else list(value)


def hold_out(cfg: DictConfig, data: TrainData) -> tuple[TrainData, Dataset | None]:
    """``(training data, validation dataset or None)`` from ``data.val_fraction`` (the
    training images minus the held-out ones) or ``data.val`` (its own sources, read with
    the training augmentation). ConfigError when both are set, when the split leaves
    either side empty, or when ``train.val_every`` asks for a pass without held-out data."""
    fraction, sources = float(cfg.data.val_fraction), cfg.data.val
    every = int(cfg.train.val_every)
    if fraction > 0 and sources is not None:
        raise ConfigError(
            f"data.val={sources!r} and data.val_fraction={fraction:g} are both set: hold out a share of the "
            "training images (data.val_fraction) or name validation sources (data.val), not both"
        )
    if fraction == 0 and sources is None:
        if every > 0:
            raise ConfigError(
                f"train.val_every={every} but there is no validation data: set data.val_fraction (a held-out "
                "share of the training images) or data.val (validation manifests)"
            )
        return data, None
    if sources is not None:
        names = _sources(sources)
        if not names:
            raise ConfigError("data.val is empty: name validation manifests or image folders (or null)")
        if SYNTHETIC in names:
            raise ConfigError("data.val: 'synthetic' is not a validation source; use data.val_fraction")
        records = [r for s in names for r in _training_records(s)]
        val = ImageRecordDataset(records, data.augmentation)
        train_paths = set(_item_paths(data.dataset))
        shared = sum(r.path in train_paths for r in records)
        if shared:
            logger.warning("data.val: %d of its %d images are also training images", shared, len(records))
        note = f"validation: {len(records)} images from {len(names)} source(s) (data.val)"
    else:
        labels = [label for label, _ in item_labels(data.dataset)]
        paths = _item_paths(data.dataset)
        val_idx = held_out_indices(paths, labels, fraction, int(cfg.seed))
        n = len(paths)
        if not val_idx or len(val_idx) == n:
            raise ConfigError(
                f"data.val_fraction={fraction:g} of {n} training images holds out {len(val_idx)}: "
                "both the training and the validation part need at least one image"
            )
        kept = set(val_idx)
        train_idx = [i for i in range(n) if i not in kept]
        val = _subset(data.dataset, val_idx)
        how = "stratified by label" if any(label is not None for label in labels) else "unlabelled"
        data = dataclasses.replace(
            data, dataset=_subset(data.dataset, train_idx),
            description=f"{data.description}; {len(val_idx)} of them held out for validation",
        )
        note = f"validation: {len(val_idx)} of {n} training images held out (data.val_fraction={fraction:g}, {how})"
    if every == 0:
        logger.warning("%s, but train.val_every=0: no validation pass runs", note)
    else:
        logger.info("%s; losses on them every %d iterations and at each checkpoint", note, every)
    return data, val


# --------------------------------------------------------------------------- the pass


class ValidationPass:
    """The training losses on the held-out images, averaged over them (see the module doc).

    Args:
        dataset: the held-out images (``dataset[(i, draw_id)]`` items, augmented).
        collator: the training collator (masks as in training).
        to_device: the trainer's batch -> device function (supervision targets, photometric ops).
        max_batches: at most this many batches per rank (``train.val_max_batches``).
    """

    def __init__(
        self, dataset: Dataset, collator: Callable, cfg: DictConfig, rank: int, world_size: int,
        device: torch.device, precision: Precision, to_device: Callable[[dict], dict], max_batches: int,
        host_group=None,  # noqa: ANN001 (a gloo group or None)
    ):
        self.dataset, self.collator, self.cfg = dataset, collator, cfg
        self.device, self.precision, self.to_device = device, precision, to_device
        self.rank, self.host_group = rank, host_group
        self.seed = derive_seed(int(cfg.seed), _RNG_STREAM, rank)
        n = len(dataset)
        order = torch.randperm(n, generator=torch_generator(int(cfg.seed), _ORDER_STREAM)).tolist()
        per_rank = math.ceil(n / world_size)
        shard = [order[(rank + world_size * k) % n] for k in range(per_rank)]
        self.batch_size = int(cfg.train.batch_size_per_gpu)
        n_batches = min(math.ceil(per_rank / self.batch_size), int(max_batches))
        # draw_id = the image's index in the held-out set: the same crops and masks every pass.
        self.keys = [(i, i) for i in shard[: n_batches * self.batch_size]]

    def _loader(self) -> DataLoader:
        workers = int(self.cfg.data.num_workers)
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.keys, num_workers=workers,
            collate_fn=self.collator, pin_memory=bool(self.cfg.data.pin_memory) and self.device.type == "cuda",
            prefetch_factor=int(self.cfg.data.prefetch_factor) if workers > 0 else None,
            drop_last=False, worker_init_fn=ignore_stop_signals,
        )

    def run(self, engine: nn.Module, teacher_temp: float) -> dict | None:
        """One pass; ``{"val_<loss>": mean over the held-out images, ..., "val_images",
        "val_skipped", "val_s"}`` (the same on every rank), or None when no image was
        readable. Collective: every rank calls it at the same iteration."""
        start = time.perf_counter()
        model = unwrap(engine)
        buffers = [b.detach().clone() for b in model.buffers()]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.default_generator.manual_seed(self.seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(self.seed)
            names, sums, images, skipped = self._accumulate(engine, teacher_temp)
        for saved, live in zip(buffers, model.buffers()):
            live.copy_(saved)
        if names is None:
            return None
        counts = torch.tensor([images, skipped], dtype=torch.float64, device=sums.device)
        totals = distributed.all_reduce_sum(torch.cat([sums.double(), counts])).tolist()
        images, skipped = int(totals[-2]), int(totals[-1])
        record = {f"{VAL_PREFIX}{name}": value / images for name, value in zip(names, totals[:-2])}
        record.update({"val_images": images, "val_skipped": skipped, "val_s": time.perf_counter() - start})
        return record

    def _accumulate(self, engine: nn.Module, teacher_temp: float):  # noqa: ANN202
        names: list[str] | None = None
        sums: torch.Tensor | None = None
        images = skipped = 0
        for batch in self._loader():
            # Local crops, when the (training) collator made them, are not left out: they
            # enter the DINO loss as in training, at the cost of their student forward.
            n = batch["global_crops"].shape[0] // 2
            skipped += len(batch["skipped"])
            # A rank without a readable image cannot take part in the forward's collectives.
            if distributed.any_rank(n == 0, "cpu", self.host_group):
                continue
            # The batch moves (and, with crops.photometric=device, is augmented) outside
            # autocast, as in the training step: the augmentation writes float32 rows.
            batch = self.to_device(batch)
            with self.precision.autocast():
                out = engine(batch, teacher_temp, False)
            losses = out[0] if isinstance(out, tuple) else out
            if names is None:
                names = list(losses)
            weighted = torch.stack([losses[k].detach().float().reshape(()) for k in names]) * n
            sums = weighted if sums is None else sums + weighted
            images += n
        return names, sums, images, skipped


# --------------------------------------------------------------------------- selection


class NoValidationRecords(CheckpointError):
    """``--select val_loss`` on a run whose checkpoints have no validation record."""


@dataclass(frozen=True)
class Selected:
    """The checkpoint :func:`best_checkpoint` picked."""

    iteration: int
    path: Path
    value: float
    criterion: str

    def describe(self) -> str:
        return f"{self.path} (iteration {self.iteration}, lowest {self.criterion}={self.value:.6g})"


def val_losses(records: Sequence[dict], criterion: str = DEFAULT_CRITERION) -> dict[int, float]:
    """``{iteration: value}`` of the validation records with a finite ``criterion``
    (a later record of the same iteration wins)."""
    out = {}
    for record in records:
        value = record.get(criterion)
        if is_val_record(record) and isinstance(value, (int, float)) and math.isfinite(value):
            out[int(record["iteration"])] = float(value)
    return out


def best_of(losses: dict[int, float], checkpoints: Sequence[tuple[int, Path]]) -> tuple[int, Path, float] | None:
    """The checkpoint with the lowest loss among those that have one (the earlier on a tie)."""
    scored = [(losses[it], it, path) for it, path in checkpoints if it in losses]
    if not scored:
        return None
    value, it, path = min(scored, key=lambda t: (t[0], t[1]))
    return it, path, value


def best_checkpoint(run_dir: str | Path, by: str = DEFAULT_CRITERION) -> Selected:
    """The checkpoint of a training output directory with the lowest validation loss
    ``by`` (default ``val_total``) among the checkpoints with a validation record at their
    iteration. :class:`NoValidationRecords` (exit 2 in the CLIs) when there is none."""
    run = Path(run_dir)
    path = run / METRICS_FILE
    records = read_jsonl(path)[0] if path.is_file() else []
    checkpoints = list_checkpoints(run)
    found = best_of(val_losses(records, by), checkpoints)
    if found is None:
        raise NoValidationRecords(
            f"{run}: none of its {len(checkpoints)} checkpoint(s) has a validation loss ({by}) in {METRICS_FILE}; "
            "train with data.val_fraction (or data.val) and train.val_every > 0 to select by validation loss"
        )
    it, ckpt, value = found
    return Selected(iteration=it, path=ckpt, value=value, criterion=by)


#: ``--select`` values of ``eval`` and ``export`` -> the record key they minimise.
SELECTIONS = {"val_loss": DEFAULT_CRITERION}


def select_checkpoint(ckpt: str | Path, select: str) -> Selected:
    """The checkpoint ``--select SELECT`` picks in the training output directory ``ckpt``
    (CheckpointError, exit 2, for another kind of ``ckpt`` or an unknown ``select``)."""
    if select not in SELECTIONS:
        raise CheckpointError(f"--select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    run = Path(ckpt).expanduser()
    if not run.is_dir():
        raise CheckpointError(f"--select {select} picks a checkpoint of a training output directory; {ckpt} is not one")
    chosen = best_checkpoint(run, SELECTIONS[select])
    logger.info("--select %s: %s", select, chosen.describe())
    return chosen
