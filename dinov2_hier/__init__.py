"""dinov2_hier: DINOv2 pretraining with hierarchical supervision for blood-cell images.

Importing the package has no side effects; the training entry point is
``python -m dinov2_hier.train``; ``dinov2_hier.load_backbone(path)`` loads an exported
backbone (``python -m dinov2_hier.export``, see docs/export.md).
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy re-exports: ``dinov2_hier.load_backbone`` imports torch only when first used."""
    if name == "load_backbone":
        from dinov2_hier.hub import load_backbone

        return load_backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
