"""The tiling index: every candidate ``(t0, y0, x0)`` with its valid-data fraction
and an aggregate of one variable, computed with dask.

dask reduces each time block to per-step, per-tile numbers (valid count, sum,
count and max of the aggregated variable), a small array; windows are then
summed over their frames in numpy. So the data is read once, whatever the
window length, and memory stays at one time block per worker.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import dask
import dask.array as da
import numpy as np
import pandas as pd

from zarrdali.errors import ConfigError
from zarrdali.prep._dask import progress
from zarrdali.sampling.epochs import tile_origins

AGGREGATES = ("mean", "sum", "max")
_TARGET_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TilingSpec:
    """The windows and tiles an index enumerates (as ``SampleSpec`` and the loader)."""

    n_frames: int
    tile: tuple[int, int]
    frame_step: int = 1
    time_stride: int = 1
    tile_stride: tuple[int, int] | None = None  # None: the tile
    cover_edges: bool = True

    def __post_init__(self) -> None:
        if self.n_frames < 1 or self.frame_step < 1 or self.time_stride < 1:
            raise ConfigError("n_frames, frame_step and time_stride must be >= 1.")
        if len(self.tile) != 2 or min(self.tile) < 1:
            raise ConfigError(f"tile must be (height, width) >= 1, got {self.tile}.")

    @property
    def span(self) -> int:
        return (self.n_frames - 1) * self.frame_step + 1

    @property
    def stride(self) -> tuple[int, int]:
        return tuple(self.tile_stride or self.tile)

    def origins(self, n_time: int, ny: int, nx: int) -> tuple[np.ndarray, ...]:
        h, w = self.tile
        if h > ny or w > nx:
            raise ConfigError(f"tile {self.tile} is larger than the field {ny}x{nx}.")
        if self.span > n_time:
            raise ConfigError(
                f"A window of {self.n_frames} frames every {self.frame_step} step(s) spans "
                f"{self.span} steps but the store has {n_time}."
            )
        t0 = np.arange(0, n_time - self.span + 1, self.time_stride)
        ys = tile_origins(ny, h, self.stride[0], self.cover_edges)
        xs = tile_origins(nx, w, self.stride[1], self.cover_edges)
        return t0, ys, xs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile"] = list(self.tile)
        d["tile_stride"] = list(self.stride)
        return d


def _per_step(
    blocks: list[np.ndarray], agg_block: np.ndarray, ys, xs, tile: tuple[int, int]
) -> np.ndarray:
    """[steps, ny_tiles, nx_tiles, 4]: valid count, agg sum, agg count, agg max."""
    h, w = tile
    out = np.zeros((agg_block.shape[0], len(ys), len(xs), 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN tiles: max is NaN
        for i, y0 in enumerate(ys):
            for j, x0 in enumerate(xs):
                cut = (slice(None), Ellipsis, slice(y0, y0 + h), slice(x0, x0 + w))
                for b in blocks:
                    valid = ~np.isnan(b[cut])
                    out[:, i, j, 0] += valid.reshape(len(valid), -1).sum(axis=1)
                a = agg_block[cut].astype(np.float64).reshape(len(agg_block), -1)
                out[:, i, j, 1] = np.nansum(a, axis=1)
                out[:, i, j, 2] = (~np.isnan(a)).sum(axis=1)
                out[:, i, j, 3] = np.nanmax(a, axis=1)
    return out


def _time_blocks(arr: da.Array) -> da.Array:
    """The array in blocks of whole fields (all levels), several steps each."""
    step_bytes = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
    steps = max(1, min(arr.shape[0], _TARGET_BLOCK_BYTES // max(step_bytes, 1)))
    return arr.rechunk((steps, *arr.shape[1:]))


def tiling_table(
    arrays: list[da.Array],
    aggregate_array: da.Array,
    how: str,
    spec: TilingSpec,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Columns t0, y0, x0, valid_fraction, aggregate (NaN where no valid value).

    ``arrays`` (the variables) and ``aggregate_array`` are the values as served:
    CF-decoded (missing values NaN), ``(time, [level,] y, x)``."""
    if how not in AGGREGATES:
        raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {how!r}.")
    first = arrays[0]
    n_time, ny, nx = first.shape[0], first.shape[-2], first.shape[-1]
    t0, ys, xs = spec.origins(n_time, ny, nx)
    arrays = [_time_blocks(a) for a in arrays]
    # one block size for all so block k covers the same steps in every array
    steps = min(a.chunks[0][0] for a in arrays)
    arrays = [a.rechunk((steps, *a.shape[1:])) for a in arrays]
    agg = _time_blocks(aggregate_array).rechunk((steps, *aggregate_array.shape[1:]))
    parts = []
    for k in range(len(arrays[0].chunks[0])):
        blocks = [a.blocks[k] for a in arrays]
        parts.append(dask.delayed(_per_step)(blocks, agg.blocks[k], ys, xs, spec.tile))
    with progress(show_progress):
        per_step = np.concatenate(dask.compute(*parts), axis=0)  # [n_time, nty, ntx, 4]

    frames = t0[:, None] + spec.frame_step * np.arange(spec.n_frames)[None, :]
    windows = per_step[frames]  # [n_t0, n_frames, nty, ntx, 4]
    valid = windows[..., 0].sum(axis=1)
    agg_sum = windows[..., 1].sum(axis=1)
    agg_count = windows[..., 2].sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        agg_max = np.nanmax(windows[..., 3], axis=1)
        value = {
            "mean": agg_sum / agg_count,
            "sum": np.where(agg_count > 0, agg_sum, np.nan),
            "max": agg_max,
        }[how]
    channels = sum(a.shape[1] if a.ndim == 4 else 1 for a in arrays)
    per_window = spec.n_frames * spec.tile[0] * spec.tile[1] * channels
    tt, yy, xx = np.meshgrid(t0, ys, xs, indexing="ij")
    return pd.DataFrame(
        {
            "t0": tt.ravel().astype(np.int64),
            "y0": yy.ravel().astype(np.int64),
            "x0": xx.ravel().astype(np.int64),
            "valid_fraction": (valid / per_window).ravel(),
            "aggregate": value.ravel(),
        }
    )
