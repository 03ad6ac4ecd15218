"""Static (time-invariant) fields: read once, served as ``batch["static"]``.

A static field is an array of the store with dimensions ``(y, x)`` or
``(level, y, x)`` on the variables' grid (land-sea mask, orography, soil
type). The loader reads each one whole, once, when it is built, normalizes it
(the same ``(x - mean) / std`` in float32 as the variables, with given or
``"store"`` statistics) and keeps the result, ``[S, ny, nx]`` float32, in host
memory (on the GPU path also in device memory). Per batch, every sample's tile
is cut out of it with the sample's flips and quarter turns: one strided view,
one fancy index, and at most one copy per distinct transform, so the host
work per batch does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from zarrdali.batch.shared import SharedArray
from zarrdali.errors import ConfigError
from zarrdali.store.cf import decoded_values
from zarrdali.store.dims import dimension_axes
from zarrdali.store.normalize import NormalizeArg, channel_stats
from zarrdali.store.open import ArrayLayout, find_arrays


@dataclass(frozen=True)
class StaticVariable:
    """What :func:`~zarrdali.store.normalize.channel_stats` and CF decoding need of a
    static array; ``axes`` are its stored axes of (level,) y and x."""

    name: str
    shape: tuple[int, ...]
    dims: tuple[str, ...]
    attrs: dict
    dtype: np.dtype
    fill_value: object
    axes: tuple[int, ...]

    @property
    def n_levels(self) -> int:
        return self.shape[self.axes[0]] if len(self.shape) == 3 else 1

    @property
    def levels(self) -> None:  # a static field serves all its levels
        return None

    @property
    def level_size(self) -> int:
        return self.n_levels


def _check_static(
    array: zarr.Array,
    name: str,
    store_name: str,
    layouts: Sequence[ArrayLayout],
    dims_override: Mapping[str, str],
) -> StaticVariable:
    first = layouts[0]
    time_dim = first.time_dim
    shape = tuple(int(s) for s in array.shape)
    names = array.metadata.dimension_names
    dims = tuple(names or (f"dim_{i}" for i in range(len(shape))))
    if time_dim in dims or len(shape) not in (2, 3):
        has_time = f"has a time axis ({time_dim!r}) " if time_dim in dims else ""
        raise ConfigError(
            f"static variable {name!r} of {store_name!r} {has_time}with dims {dims} "
            f"(shape {shape}); a static field is (y, x) or (level, y, x). Serve variables "
            f"with a time axis through `variables`, or store one time step of it."
        )
    axes = dimension_axes(
        names, len(shape), array=name, store=store_name, overrides=dims_override, static=True
    )
    grid = (shape[axes[-2]], shape[axes[-1]])
    if grid != first.grid_shape:
        raise ConfigError(
            f"static variable {name!r} of {store_name!r} is {grid} but the variables' "
            f"grid is {first.grid_shape} ({first.name!r}); regrid it to that grid."
        )
    fill = array.metadata.fill_value
    return StaticVariable(
        name,
        shape,
        dims,
        dict(array.attrs),
        np.dtype(array.dtype),
        None if fill is None else np.asarray(fill).item(),
        axes,
    )


def read_static_fields(
    group: zarr.Group,
    store_name: str,
    names: Sequence[str],
    layouts: Sequence[ArrayLayout],
    normalize: NormalizeArg,
    *,
    decode_cf: bool = True,
    dims: Mapping[str, str] | None = None,
) -> StaticFields:
    """Check, read (whole, once), CF-decode (with ``decode_cf``) and normalize the
    static variables ``names``, their axes found by name (``dims``: see
    :mod:`zarrdali.store.dims`)."""
    names = [names] if isinstance(names, str) else list(names)
    variables = {layout.name for layout in layouts}
    duplicated = sorted({n for n in names if names.count(n) > 1} | (set(names) & variables))
    if duplicated:
        raise ConfigError(
            f"static variable(s) {duplicated} listed twice (or also in `variables`); "
            f"name each array once."
        )
    arrays = find_arrays(group, store_name, names, "static variable(s)")
    described = [_check_static(arrays[n], n, store_name, layouts, dims or {}) for n in names]
    stats = channel_stats(normalize, described, store_name, decode_cf)  # type: ignore[arg-type]
    planes = []
    for static in described:
        values = np.asarray(arrays[static.name][...]).transpose(static.axes)
        if decode_cf:
            values = decoded_values(values, static, store_name)  # type: ignore[arg-type]
        ny, nx = values.shape[-2:]
        planes.append(values.reshape(-1, ny, nx))
    field = np.concatenate(planes).astype(np.float32)
    if stats is not None:  # float32 arithmetic, as the pipeline normalizes the variables
        mean, std = (s.reshape(-1, 1, 1) for s in stats)
        field = (field - mean) / std
    return StaticFields(tuple(names), np.ascontiguousarray(field, dtype=np.float32))


def cut_tiles(
    xp: Any,
    field: Any,
    samples: np.ndarray,
    flags: np.ndarray | None,
    tile_hw: tuple[int, int],
) -> Any:
    """``[B, S, H, W]``: the tile of every sample, transformed by its flags.

    ``xp`` is numpy or CuPy (``field`` lives there); ``samples`` ``[B, 3]`` and
    ``flags`` ``[B, 3]`` (transpose, flip rows, flip columns; see
    :func:`zarrdali.sampling.augment.draw_augmentations`) are host arrays. Values are
    copied, never computed, so both array modules give the same bits.
    """
    n_channels, ny, nx = field.shape
    h, w = tile_hw
    s_c, s_y, s_x = field.strides
    # Every tile origin (y0, x0) as one strided view: [Y0, X0, S, H, W].
    windows = xp.lib.stride_tricks.as_strided(
        field, shape=(ny - h + 1, nx - w + 1, n_channels, h, w), strides=(s_y, s_x, s_c, s_y, s_x)
    )
    y0 = xp.asarray(np.ascontiguousarray(samples[:, 1]))
    x0 = xp.asarray(np.ascontiguousarray(samples[:, 2]))
    out = windows[y0, x0]  # a copy: [B, S, H, W]
    if flags is None:
        return out
    codes = np.asarray(flags, dtype=np.int64) @ np.array([4, 2, 1])
    for code in np.unique(codes):  # at most 8 transforms, whatever the batch size
        if code == 0:
            continue
        which = xp.asarray(np.flatnonzero(codes == code))
        x = out[which]
        if code & 4:
            x = x.swapaxes(-1, -2)
        if code & 2:
            x = x[..., ::-1, :]
        if code & 1:
            x = x[..., ::-1]
        out[which] = x
    return out


@dataclass(frozen=True)
class StaticFields:
    """The normalized static fields ``[S, ny, nx]`` float32, held in host memory."""

    names: tuple[str, ...]
    field: np.ndarray

    @property
    def n_channels(self) -> int:
        return self.field.shape[0]

    def tiles(self, samples: np.ndarray, flags: np.ndarray | None, tile_hw) -> np.ndarray:
        return cut_tiles(np, self.field, samples, flags, tile_hw)


@dataclass(frozen=True)
class StaticTiles:
    """A batch output (see :class:`~zarrdali.gpu.pipeline.BatchSource`): the static
    tiles of a batch's samples, cut on the host (a DALI pipeline on the CPU; the
    CPU path cuts them into its ring: :class:`RingStaticTiles`)."""

    static: StaticFields
    tile_hw: tuple[int, int]

    def __call__(self, samples: np.ndarray, flags: np.ndarray | None) -> np.ndarray:
        return self.static.tiles(samples, flags, self.tile_hw)


@dataclass(frozen=True)
class RingStaticTiles:
    """The CPU path's static tiles: written into each batch's slot of the ring
    by whoever loads the batch's samples (a worker process, or a thread of the
    training process), so the cut is spread over the workers as the frames are.
    ``field`` is the normalized ``[S, ny, nx]`` field: shared memory that the
    worker processes map (one copy, not one per worker), or a host array."""

    field: SharedArray | np.ndarray
    tile_hw: tuple[int, int]

    def write(
        self,
        out: np.ndarray,
        samples: np.ndarray,
        flags: np.ndarray | None,
        rows: np.ndarray | None = None,
    ) -> None:
        """``out`` ``[B, S, H, W]`` (the batch's): rows ``rows`` (default: the
        first ``len(samples)``) get the tiles of ``samples`` with ``flags``."""
        field = self.field.array if isinstance(self.field, SharedArray) else self.field
        tiles = cut_tiles(np, field, samples, flags, self.tile_hw)
        if rows is None:
            out[: len(samples)] = tiles
        else:
            out[rows] = tiles

    def close(self) -> None:
        """Unmap the field where this is a worker process's copy (the training
        process's shared field is its loader's to close)."""
        if isinstance(self.field, SharedArray) and self.field.attached:
            self.field.close()
