"""dinov2_hier: DINOv2 pretraining with hierarchical supervision for blood-cell images.

Importing the package has no side effects; the training entry point is
``python -m dinov2_hier.train``.
"""
__version__ = "0.1.0"
