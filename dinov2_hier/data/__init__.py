"""Data floor: records -> datasets -> augmentations -> collation with masks, and the sampler.

See docs/architecture.md ("data") for the item and batch formats.
"""
from __future__ import annotations

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTOMETRIC_MODES,
    AugmentationConfigError,
    EvalTransform,
    GlobalCropsAugmentation,
)
from .collate import CollateError, GlobalCropsCollator
from .datasets import (
    ImageRecordDataset,
    MissingImageError,
    SkipCounter,
    SyntheticCellDataset,
    SubsetDataset,
    TooManyUnreadableImages,
    UnreadableImageError,
    is_missing_image_message,
    load_image,
    load_image_reduced,
)
from .masking import BlockMaskGenerator, MaskingConfigError, masked_patch_budget, sample_masks
from .photometric import ColorJitterParams, CropParams, apply_photometric, photometric_params, stack_photometric
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
    "PHOTOMETRIC_MODES",
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
    "MissingImageError",
    "Record",
    "SamplerConfigError",
    "SkipCounter",
    "SyntheticCellDataset",
    "SubsetDataset",
    "SyntheticCellGenerator",
    "SyntheticSpecError",
    "TooManyUnreadableImages",
    "UnreadableImageError",
    "apply_photometric",
    "derive_seed",
    "epoch_permutation",
    "is_missing_image_message",
    "labelled_per_batch_from_fraction",
    "load_image",
    "load_image_reduced",
    "photometric_params",
    "read_manifest",
    "read_manifests",
    "records_from_source",
    "masked_patch_budget",
    "sample_masks",
    "scan_image_folder",
    "stack_photometric",
    "torch_generator",
    "write_synthetic_dataset",
]
