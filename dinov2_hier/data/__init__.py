"""Data floor: records -> datasets -> augmentations -> collation with masks, and the sampler.

See docs/architecture.md ("data") for the item and batch formats.
"""
from __future__ import annotations

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentationConfigError,
    ColorJitterParams,
    CropParams,
    EvalTransform,
    GlobalCropsAugmentation,
)
from .collate import CollateError, GlobalCropsCollator
from .datasets import (
    ImageRecordDataset,
    SkipCounter,
    SyntheticCellDataset,
    TooManyUnreadableImages,
    UnreadableImageError,
    load_image,
)
from .masking import BlockMaskGenerator, MaskingConfigError, sample_masks
from .records import (
    IMAGE_EXTENSIONS,
    DataSourceError,
    ImageFolderError,
    ManifestError,
    Record,
    read_manifest,
    read_manifests,
    records_from_source,
    scan_image_folder,
)
from .samplers import (
    InfiniteSampler,
    LabelledShareSampler,
    SamplerConfigError,
    epoch_permutation,
    labelled_per_batch_from_fraction,
)
from .seeding import derive_seed, torch_generator
from .synthetic import (
    CellAttributes,
    SyntheticCellGenerator,
    SyntheticSpecError,
    write_synthetic_dataset,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "AugmentationConfigError",
    "BlockMaskGenerator",
    "CellAttributes",
    "CollateError",
    "ColorJitterParams",
    "CropParams",
    "DataSourceError",
    "EvalTransform",
    "GlobalCropsAugmentation",
    "GlobalCropsCollator",
    "ImageFolderError",
    "ImageRecordDataset",
    "InfiniteSampler",
    "LabelledShareSampler",
    "ManifestError",
    "MaskingConfigError",
    "Record",
    "SamplerConfigError",
    "SkipCounter",
    "SyntheticCellDataset",
    "SyntheticCellGenerator",
    "SyntheticSpecError",
    "TooManyUnreadableImages",
    "UnreadableImageError",
    "derive_seed",
    "epoch_permutation",
    "labelled_per_batch_from_fraction",
    "load_image",
    "read_manifest",
    "read_manifests",
    "records_from_source",
    "sample_masks",
    "scan_image_folder",
    "torch_generator",
    "write_synthetic_dataset",
]
