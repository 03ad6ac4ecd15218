"""What the CPU path does to a batch while it assembles it: cast, normalize,
augment, and check for missing values (masks, ``nan_fill``).

A DALI pipeline would cast, normalize and augment a batch in passes of its own
over the whole batch in the training process. The CPU path does it instead
while each decoded chunk is still in the core's cache: every piece is copied
into its place in the batch already cast to float32, normalized per channel
and flipped or transposed as its sample's flags say; a chunk decoded straight
into the batch is normalized in place right after its decode. Missing values
(:mod:`zarrdali.missing`) are found in the piece's stored values in the same
step: its mask written beside it, ``nan_fill`` put in their place. So the
batch is written once, by the worker that decoded it, and the training
process gets it as it is.

The arithmetic is the GPU gather kernel's (``zarrdali_gather_finish``):
float32 ``(float(x) - mean) / std`` per channel, whatever the stored dtype;
the transforms those of :func:`zarrdali.pipeline.apply_augmentations`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Finish:
    """The per-channel statistics (float32 ``[C]``, or None) and the per-sample
    ``(transpose, flip_rows, flip_cols)`` flags (``[B, 3]``, or None) of one batch.

    ``missing`` (per channel: the stored values besides NaN that are not data;
    None: nothing checked) turns on the missing-value rule of
    :mod:`zarrdali.missing`: invalid values are replaced by ``nan_fill``
    (after normalization) where it is given, and ``masks`` (one bool array per
    frame output, shaped like it) get False there and True elsewhere.
    """

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    flags: np.ndarray | None = None
    nan_fill: float | None = None
    missing: tuple[np.ndarray, ...] | None = None
    masks: tuple[np.ndarray, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if (self.nan_fill is not None or self.masks is not None) and self.missing is None:
            raise ValueError("nan_fill and masks need the channels' missing values")

    @property
    def normalizes(self) -> bool:
        return self.mean is not None

    @property
    def checks(self) -> bool:
        """Whether values are checked for being missing (masks or nan_fill)."""
        return self.missing is not None

    @property
    def changes_values(self) -> bool:
        """Whether anything besides the cast happens to a value where it lands."""
        return self.normalizes or self.checks

    @property
    def moves(self) -> bool:
        """Whether pieces move (flips, quarter turns): no chunk decodes in place then."""
        return self.flags is not None and bool(self.flags.any())

    def channel_stats(self, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of channels ``c:c+n``, shaped to broadcast over ``[n, H, W]``."""
        return self.mean[c : c + n, None, None], self.std[c : c + n, None, None]

    def invalid(self, src: np.ndarray, c: int) -> np.ndarray | None:
        """Where the stored values ``src`` (channels ``c:``, one variable) are not
        data: NaN, or one of the channel's missing values (compared in the stored
        dtype). None: every value is valid."""
        bad = np.isnan(src) if src.dtype.kind == "f" else None
        for value in self.missing[c]:
            if bad is None:
                bad = src == value
            else:
                bad |= src == value
        return bad

    def finish_in_place(self, o: int, b: int, f: int, c: int, dy: int, dx: int, region) -> None:
        """``region`` (``[n, H, W]`` float32, channels ``c:c+n`` of sample ``b``
        frame ``f`` of output ``o``, at rows ``dy``, columns ``dx``), decoded
        there as stored: checked for missing values, normalized in place."""
        bad = self.invalid(region, c) if self.checks else None
        if self.normalizes:
            mean, std = self.channel_stats(c, region.shape[0])
            np.subtract(region, mean, out=region)
            np.divide(region, std, out=region)
        if self.checks:
            self._check_with(bad, o, b, f, c, dy, dx, region)

    def _check_with(self, bad, o: int, b: int, f: int, c: int, dy: int, dx: int, dst) -> None:
        """Mask (``bad``: :meth:`invalid` of the piece's stored values) and fill
        the finished piece ``dst`` at its place."""
        if self.masks is not None:
            n, ny, nx = dst.shape
            mask = self.masks[o][b, f, c : c + n, dy : dy + ny, dx : dx + nx]
            if bad is None:
                mask[...] = True
            else:
                np.logical_not(bad, out=mask)
        if self.nan_fill is not None and bad is not None:
            np.copyto(dst, np.float32(self.nan_fill), where=bad)

    def place(
        self,
        out: np.ndarray,
        b: int,
        f: int,
        c: int,
        dy: int,
        dx: int,
        src: np.ndarray,
        o: int = 0,
    ) -> None:
        """Copy piece ``src`` (``[n, ny, nx]``, channels ``c:``, stored values) of
        sample ``b`` frame ``f`` into ``out`` (``[B, T, C, H, W]``, output ``o``)
        at rows ``dy``, columns ``dx`` of the tile, transformed as the sample's
        flags say, cast to float32 and normalized in float32, checked for
        missing values."""
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
        else:
            # float32 arithmetic whatever the stored dtype (float64 and int32 would
            # promote to float64): the GPU kernel's ((float)x - mean) / std
            mean, std = self.channel_stats(c, n)
            np.subtract(src, mean, out=dst, dtype=np.float32)
            np.divide(dst, std, out=dst)
        if self.checks:
            self._check_with(self.invalid(src, c), o, b, f, c, dy, dx, dst)
