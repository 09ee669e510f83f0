"""Seeded augmentation of the training split: the seeds of the views (each modality's spec makes its own).

Each view is seeded from (augment.seed, sample id, view index), so the same params give
the same bytes, whatever the order or number of workers.
"""

from __future__ import annotations

import hashlib


def view_seed(seed: int, sample_id: str, view: int) -> int:
    """A stable 63-bit seed for one view of one sample."""
    digest = hashlib.sha256(f"{seed}:{sample_id}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
