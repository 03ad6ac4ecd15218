"""What the CPU path does to a batch while it assembles it: cast, normalize, augment.

The DALI pipeline casts, normalizes and augments a batch in passes of its own
over the whole batch in the training process. The CPU path does it instead
while each decoded chunk is still in the core's cache: every piece is copied
into its place in the batch already cast to float32, normalized per channel
and flipped or transposed as its sample's flags say; a chunk decoded straight
into the batch is normalized in place right after its decode. So the batch is
written once, by the worker that decoded it, and the training process gets it
as it is.

The arithmetic is the pipeline's: float32 ``(x - mean) / std`` per channel;
the transforms those of :func:`zarrdali.pipeline.apply_augmentations`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Finish:
    """The per-channel statistics (float32 ``[C]``, or None) and the per-sample
    ``(transpose, flip_rows, flip_cols)`` flags (``[B, 3]``, or None) of one batch."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    flags: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")

    @property
    def normalizes(self) -> bool:
        return self.mean is not None

    @property
    def moves(self) -> bool:
        """Whether pieces move (flips, quarter turns): no chunk decodes in place then."""
        return self.flags is not None and bool(self.flags.any())

    def channel_stats(self, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of channels ``c:c+n``, shaped to broadcast over ``[n, H, W]``."""
        return self.mean[c : c + n, None, None], self.std[c : c + n, None, None]

    def normalize_in_place(self, region: np.ndarray, c: int) -> None:
        """``region`` (``[n, H, W]`` float32, channels ``c:c+n``) normalized in place."""
        mean, std = self.channel_stats(c, region.shape[0])
        np.subtract(region, mean, out=region)
        np.divide(region, std, out=region)

    def place(
        self,
        out: np.ndarray,
        b: int,
        f: int,
        c: int,
        dy: int,
        dx: int,
        src: np.ndarray,
    ) -> None:
        """Copy piece ``src`` (``[n, ny, nx]``, channels ``c:``) of sample ``b`` frame
        ``f`` into ``out`` (``[B, T, C, H, W]``) at rows ``dy``, columns ``dx`` of
        the tile, transformed as the sample's flags say, normalized."""
        if self.flags is not None:
            transpose, flip_rows, flip_cols = self.flags[b]
            h, w = out.shape[-2:]
            if transpose:  # a quarter turn needs a square tile: h == w
                src = src.swapaxes(-1, -2)
                dy, dx = dx, dy
            ny, nx = src.shape[-2:]
            if flip_rows:
                src = src[..., ::-1, :]
                dy = h - dy - ny
            if flip_cols:
                src = src[..., ::-1]
                dx = w - dx - nx
        n, ny, nx = src.shape
        dst = out[b, f, c : c + n, dy : dy + ny, dx : dx + nx]
        if self.mean is None:
            dst[...] = src
            return
        mean, std = self.channel_stats(c, n)
        np.subtract(src, mean, out=dst)
        np.divide(dst, std, out=dst)
