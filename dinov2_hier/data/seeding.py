"""Derive well-mixed integer seeds from tuples such as ``(seed, draw_id)``.

Python's ``hash`` is salted per process for strings and trivially linear for
ints, so it is unsuitable for seeds that must agree across worker processes
and runs. NumPy's ``SeedSequence`` hashes an integer tuple into independent,
well-mixed entropy; we keep 63 bits so the result fits ``torch.Generator``.
"""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(*values: int) -> int:
    """Return a 63-bit seed that is a pure function of the non-negative ints ``values``."""
    if any(int(v) < 0 for v in values):
        raise ValueError(f"seed components must be non-negative integers, got {values}")
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def torch_generator(*values: int) -> torch.Generator:
    """A private CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``values``.

    Drawing from it never touches the global torch RNG.
    """
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*values))
    return generator
