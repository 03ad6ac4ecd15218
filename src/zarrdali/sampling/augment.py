"""Augmentation draws: which flips and quarter turns each sample of a batch gets.

Drawn from ``(seed, epoch, batch)`` alone, so both paths and a resumed run apply
the same transforms; :func:`apply_augmentations` is the numpy reference.
"""

from __future__ import annotations

import numpy as np

AUGMENTATIONS = ("flip", "rot90")


# rot90 by k quarter turns over (H, W), as (transpose, flip rows, flip columns)
# applied in that order: np.rot90(x, k, axes=(-2, -1)).
_ROT90 = np.array([[0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=np.int32)


def draw_augmentations(
    augment: tuple[str, ...], n: int, seed: int, epoch: int, batch: int
) -> np.ndarray:
    """Per-sample ``(transpose, flip_rows, flip_cols)`` flags, int32 ``[n, 3]``.

    Drawn from ``(seed, epoch, batch)`` alone, not from DALI's generator, so a
    resumed run and the CPU and GPU paths apply exactly the same transforms.
    """
    rng = np.random.default_rng([seed, epoch, batch, 3])
    flags = np.zeros((n, 3), dtype=np.int32)
    if "rot90" in augment:
        flags = _ROT90[rng.integers(0, 4, size=n)]
    if "flip" in augment:
        flags = flags.copy()
        flags[:, 1:] ^= rng.integers(0, 2, size=(n, 2), dtype=np.int32)
    return flags


def apply_augmentations(x: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """numpy reference of what the pipeline does to one sample ``[T, C, H, W]``."""
    transpose, flip_rows, flip_cols = (int(f) for f in flags)
    if transpose:
        x = x.swapaxes(-1, -2)
    if flip_rows:
        x = x[..., ::-1, :]
    if flip_cols:
        x = x[..., ::-1]
    return x
