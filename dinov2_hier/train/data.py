"""Config -> training dataset and loader (the wiring; the parts live in ``dinov2_hier.data``)."""
from __future__ import annotations

import signal

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..cpu import loader_workers
from ..data import (
    PHOTOMETRIC_MODES,
    GlobalCropsAugmentation,
    GlobalCropsCollator,
    ImageRecordDataset,
    InfiniteSampler,
    LabelledShareSampler,
    ManifestError,
    labelled_per_batch_from_fraction,
    SyntheticCellDataset,
    SyntheticCellGenerator,
    records_from_source,
)
from ..hierarchy import Hierarchy
from ..paths import resolve_resource

SYNTHETIC = "synthetic"


@dataclass
class TrainData:
    dataset: Dataset
    collator: GlobalCropsCollator
    description: str
    augmentation: GlobalCropsAugmentation  # the dataset's; finishes device-side photometric ops


def build_augmentation(cfg: DictConfig) -> GlobalCropsAugmentation:
    c = cfg.crops
    if c.photometric not in PHOTOMETRIC_MODES:
        raise ConfigError(
            f"crops.photometric must be one of {', '.join(PHOTOMETRIC_MODES)} (where colour jitter, grey, "
            f"blur, solarize and normalisation run), got '{c.photometric}'"
        )
    if not isinstance(c.reduced_decode, bool):
        raise ConfigError(f"crops.reduced_decode must be true or false, got {c.reduced_decode!r}")
    return GlobalCropsAugmentation(
        crop_size=c.global_crops_size,
        scale=tuple(c.global_crops_scale),
        hflip_p=c.hflip_p,
        vflip_p=c.vflip_p,
        rot90_p=c.rot90_p,
        color_jitter_p=c.color_jitter_p,
        brightness=c.brightness,
        contrast=c.contrast,
        saturation=c.saturation,
        hue=c.hue,
        grayscale_p=c.grayscale_p,
        blur_p=tuple(c.blur_p),
        blur_sigma=tuple(c.blur_sigma),
        solarize_p=tuple(c.solarize_p),
        mean=tuple(c.mean),
        std=tuple(c.std),
        seed=cfg.seed,
        photometric=c.photometric,
        reduced_decode=c.reduced_decode,
        **local_crops_settings(cfg),
    )


def local_crops_settings(cfg: DictConfig) -> dict:
    """The local-crop arguments of :class:`GlobalCropsAugmentation`: none (``{}``, no local
    crops) when ``crops.local_crops_number`` is 0 or absent (a config saved before the key
    existed), else number, size (checked to be a multiple of ``student.patch_size``) and scale."""
    number = OmegaConf.select(cfg, "crops.local_crops_number", default=0)
    if not number:
        return {}
    size, patch = cfg.crops.local_crops_size, cfg.student.patch_size
    if size % patch:
        raise ConfigError(f"crops.local_crops_size={size} is not a multiple of student.patch_size={patch}")
    scale = tuple(cfg.crops.local_crops_scale)
    return {"local_crops_number": number, "local_crops_size": size, "local_crops_scale": scale}


def patch_grid(cfg: DictConfig) -> tuple[int, int]:
    size, patch = cfg.crops.global_crops_size, cfg.student.patch_size
    if size % patch:
        raise ConfigError(f"crops.global_crops_size={size} is not a multiple of student.patch_size={patch}")
    return size // patch, size // patch


def _training_records(source: str) -> list:
    """The records of one training source; a manifest with a header but no rows is an error
    naming it (an image folder without images already is): training on it would stop later
    with an empty-sampler message that names no file."""
    path = resolve_resource(source, "training source")
    records = records_from_source(str(path))
    if not records:
        raise ManifestError(f"{path}: no rows (a header only): a training manifest needs at least one image")
    return records


def build_train_data(cfg: DictConfig) -> TrainData:
    """The training dataset named by ``data.train`` (a list of sources, or one source as a
    plain string: ``data.train=cells.csv``) and its collator."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    sources = [cfg.data.train] if isinstance(cfg.data.train, str) else list(cfg.data.train)
    if not sources:
        raise ConfigError("data.train is empty: name manifests, image folders or 'synthetic'")
    transform = build_augmentation(cfg)
    if SYNTHETIC in sources:
        if len(sources) > 1:
            raise ConfigError("data.train: 'synthetic' cannot be combined with file sources")
        syn = cfg.data.synthetic
        hierarchy = Hierarchy.from_json(resolve_resource(syn.hierarchy, "synthetic hierarchy"))
        generator = SyntheticCellGenerator(hierarchy, image_size=syn.image_size, seed=cfg.seed)
        dataset = SyntheticCellDataset(
            generator,
            syn.num_images,
            transform,
            label_fraction=syn.label_fraction,
            coarse_fraction=syn.coarse_fraction,
        )
        description = f"synthetic cells: {syn.num_images} images of {syn.image_size} px, {hierarchy.num_leaves} classes"
    else:
        records = [r for s in sources for r in _training_records(s)]
        dataset = ImageRecordDataset(records, transform)
        n_labelled = sum(r.label is not None for r in records)
        description = f"{len(records)} images from {len(sources)} source(s), {n_labelled} labelled"
    collator = GlobalCropsCollator(
        patch_grid(cfg),
        mask_ratio=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability if cfg.ibot.loss_weight > 0 else 0.0,
        seed=cfg.seed,
        crop_size=cfg.crops.global_crops_size,
        local_crops_number=transform.local_crops_number,
        local_crops_size=transform.local_crops_size,
    )
    return TrainData(dataset=dataset, collator=collator, description=description, augmentation=transform)


def build_sampler(cfg: DictConfig, size: int, consumed: int, rank: int, world_size: int, supervision=None):
    """Plain endless shuffling, or a fixed labelled share per batch (``supervision.labelled_fraction``)."""
    sup = cfg.supervision
    if sup.labelled_fraction is None:
        if sup.balance != "none":
            raise ConfigError("supervision.balance needs supervision.labelled_fraction (the labelled share of a batch)")
        try:
            return InfiniteSampler(size, seed=cfg.seed, rank=rank, world_size=world_size, start=consumed)
        except ValueError as exc:  # SamplerConfigError: the seed or an empty dataset
            raise ConfigError(f"training sampler (seed={cfg.seed}, {size} images): {exc}") from None
    if sup.balance not in ("none", "class", "branch"):
        raise ConfigError(f"supervision.balance must be none, class or branch, got '{sup.balance}'")
    if not 0.0 <= sup.labelled_fraction <= 1.0:
        raise ConfigError(f"supervision.labelled_fraction must be in [0, 1], got {sup.labelled_fraction}")
    batch = cfg.train.batch_size_per_gpu
    try:
        return LabelledShareSampler(
            supervision.targets,
            batch_size=batch,
            labelled_per_batch=labelled_per_batch_from_fraction(batch, sup.labelled_fraction),
            seed=cfg.seed, rank=rank, world_size=world_size, start=consumed,
            balance=sup.balance,
            groups=supervision.groups() if sup.balance == "branch" else None,
        )
    except ValueError as exc:
        raise ConfigError(f"supervision.labelled_fraction={sup.labelled_fraction}: {exc}") from None


#: Signals the training CLI turns into "checkpoint and exit 0" (dinov2_hier.run.signals, whose
#: DEFAULT_STOP_SIGNALS must stay a subset: a test checks it). SLURM, ``scancel`` and GNU
#: ``timeout`` send them to the whole process group, a terminal's Ctrl-C sends SIGINT to it.
LOADER_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 (worker_init_fn signature)
    """DataLoader ``worker_init_fn``: the workers ignore the signals the trainer handles.

    PyTorch's workers die on SIGTERM (its own handler) and on SIGINT (KeyboardInterrupt);
    a signal to the whole process group would then end the trainer with "DataLoader worker
    ... is killed by signal" before it can checkpoint. The workers stop with the trainer.
    """
    for signum in LOADER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def build_train_loader(
    data: TrainData, cfg: DictConfig, consumed: int, rank: int, world_size: int, device: torch.device,
    supervision=None,
) -> DataLoader:
    """An endless loader; ``consumed`` images of this rank are skipped (resume).
    ``data.num_workers`` is capped at the CPU cores (:func:`dinov2_hier.cpu.loader_workers`)."""
    sampler = build_sampler(cfg, len(data.dataset), consumed, rank, world_size, supervision)
    workers = loader_workers(cfg.data.num_workers, "data.num_workers", reserve=0)
    return DataLoader(
        data.dataset,
        batch_size=cfg.train.batch_size_per_gpu,
        sampler=sampler,
        num_workers=workers,
        collate_fn=data.collator,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        drop_last=True,
        worker_init_fn=ignore_stop_signals,
    )
