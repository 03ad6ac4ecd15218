"""What the CPU path does to a batch while it assembles it: cast, normalize,
augment, and check for missing values (masks, ``nan_fill``).

A DALI pipeline would cast, normalize and augment a batch in passes of its own
over the whole batch in the training process. The CPU path does it instead
while each decoded chunk is still in the core's cache: every piece is copied
into its place in the batch already cast to float32, normalized per channel
and flipped or transposed as its sample's flags say; a chunk decoded straight
into the batch is normalized in place right after its decode. Missing values
(:mod:`zarrdali.store.missing`) are found in the piece's stored values in the same
step: its mask written beside it, ``nan_fill`` put in their place. So the
batch is written once, by the worker that decoded it, and the training
process gets it as it is.

CF decoding (:mod:`zarrdali.store.cf`, on by default) happens in the same step:
a packed variable's values are unpacked as xarray unpacks them (``x *
scale_factor + add_offset`` in float64), and its missing values become NaN
(or ``nan_fill``).

The arithmetic is the GPU gather kernel's (``zarrdali_gather_finish``):
float32 ``(float(x) - mean) / std`` per channel, whatever the stored dtype,
with ``x`` unpacked in float64 and rounded to float32 once where the
variable is packed; the transforms those of
:func:`zarrdali.sampling.augment.apply_augmentations`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from zarrdali.store.cf import Packing
from zarrdali.store.missing import MissingValues


class _Float64Scratch(threading.local):
    """A buffer per thread for unpacked values, grown on demand."""

    def __init__(self) -> None:
        self.buffer = np.empty(0, dtype=np.float64)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape))
        if self.buffer.size < n:
            self.buffer = np.empty(n, dtype=np.float64)
        return self.buffer[:n].view(np.uint8)[: n * dtype.itemsize].view(dtype).reshape(shape)


_scratch = _Float64Scratch()


@dataclass(frozen=True)
class Finish:
    """The per-channel statistics (float32 ``[C]``, or None) and the per-sample
    ``(transpose, flip_rows, flip_cols)`` flags (``[B, 3]``, or None) of one batch.

    ``missing`` (per channel: the stored values besides NaN that are not data;
    None: nothing checked) turns on the missing-value rule of
    :mod:`zarrdali.store.missing`: invalid values are replaced by ``nan_fill``
    (after normalization) where it is given, else by NaN with
    ``missing_to_nan`` (CF decoding), and ``mask_arrays`` (one bool array per
    frame output, shaped like it) get False there and True elsewhere. ``packing``
    (per channel, None where not packed) unpacks stored values as
    :mod:`zarrdali.store.cf` says.
    """

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    flags: np.ndarray | None = None
    nan_fill: float | None = None
    missing: tuple[np.ndarray, ...] | None = None
    mask_arrays: tuple[np.ndarray, ...] | None = None
    missing_to_nan: bool = False
    packing: tuple[Packing | None, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        needs_missing = (
            self.nan_fill is not None or self.mask_arrays is not None or self.missing_to_nan
        )
        if needs_missing and self.missing is None:
            raise ValueError(
                "nan_fill, mask_arrays and missing_to_nan need the channels' missing values"
            )

    @property
    def normalizes(self) -> bool:
        return self.mean is not None

    @property
    def checks(self) -> bool:
        """Whether values are checked for being missing (masks, nan_fill, CF decoding)."""
        return self.missing is not None

    @property
    def changes_values(self) -> bool:
        """Whether anything besides the cast happens to a value where it lands."""
        return self.normalizes or self.checks or self.packing is not None

    def checks_channel(self, c: int) -> bool:
        """Whether channel ``c``'s values must be checked: always with masks or
        ``nan_fill``; for CF decoding alone only where it has missing values
        besides NaN (a NaN is served as NaN anyway)."""
        if self.missing is None:
            return False
        return self.mask_arrays is not None or self.nan_fill is not None or len(self.missing[c]) > 0

    def unpacked(self, src: np.ndarray, c: int) -> np.ndarray:
        """``src`` (stored values of channels ``c:``, one variable) unpacked as
        xarray unpacks them (in this thread's scratch, in the packing's dtype:
        :mod:`zarrdali.store.cf`); ``src`` itself where the variable is not packed."""
        packing = self.packing[c] if self.packing is not None else None
        if packing is None:
            return src
        dtype = np.dtype(packing.dtype)
        out = _scratch.array(src.shape, dtype)
        if packing.scale is not None:
            np.multiply(src, dtype.type(packing.scale), out=out, dtype=dtype)
            if packing.offset is not None:
                np.add(out, dtype.type(packing.offset), out=out)
        else:
            np.add(src, dtype.type(packing.offset), out=out, dtype=dtype)
        return out

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
        checks = self.checks_channel(c)
        bad = self.invalid(region, c) if checks else None
        values = self.unpacked(region, c)
        if self.normalizes:
            mean, std = self.channel_stats(c, region.shape[0])
            np.subtract(values, mean, out=region, dtype=np.float32)
            np.divide(region, std, out=region)
        elif values is not region:
            region[...] = values
        if checks:
            self._check_with(bad, o, b, f, c, dy, dx, region)

    def _check_with(self, bad, o: int, b: int, f: int, c: int, dy: int, dx: int, dst) -> None:
        """Mask (``bad``: :meth:`invalid` of the piece's stored values) and fill
        the finished piece ``dst`` at its place."""
        if self.mask_arrays is not None:
            n, ny, nx = dst.shape
            mask = self.mask_arrays[o][b, f, c : c + n, dy : dy + ny, dx : dx + nx]
            if bad is None:
                mask[...] = True
            else:
                np.logical_not(bad, out=mask)
        fill = self.nan_fill if self.nan_fill is not None else np.nan
        if bad is not None and (self.nan_fill is not None or self.missing_to_nan):
            np.copyto(dst, np.float32(fill), where=bad)

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
        values = self.unpacked(src, c)
        if self.mean is None:
            dst[...] = values
        else:
            # float32 arithmetic whatever the stored dtype (float64 and int32 would
            # promote to float64): the GPU kernel's ((float)x - mean) / std
            mean, std = self.channel_stats(c, n)
            np.subtract(values, mean, out=dst, dtype=np.float32)
            np.divide(dst, std, out=dst)
        if self.checks_channel(c):
            self._check_with(self.invalid(src, c), o, b, f, c, dy, dx, dst)


def finish_of(
    mean: np.ndarray | None,
    std: np.ndarray | None,
    missing: MissingValues | None,
    packing: tuple[Packing | None, ...] | None,
    flags: np.ndarray | None = None,
) -> Finish:
    """The :class:`Finish` of the loader's statistics, missing values and packing."""
    if missing is None:
        return Finish(mean, std, flags, packing=packing)
    return Finish(
        mean,
        std,
        flags,
        nan_fill=missing.nan_fill,
        missing=missing.per_channel,
        missing_to_nan=missing.to_nan,
        packing=packing,
    )
