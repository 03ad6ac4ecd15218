"""The destination layout ``prepare`` writes: inner chunks, shards and codec.

Time is chunked for the loader's access (one step by default), inner chunks are
the training tile, and a shard covers the whole (padded) field for as many time
steps as fit in ``shard_mb``: few files, each read by byte ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zarrdali.errors import ConfigError

DEFAULT_TILE = (128, 128)


@dataclass(frozen=True)
class Layout:
    time_chunk: int  # time steps per inner chunk
    inner: tuple[int, int]  # (y, x) of an inner chunk
    shard_steps: int  # time steps per shard (a multiple of time_chunk)
    shard_yx: tuple[int, int]  # (y, x) of a shard (multiples of inner)
    codec: str  # "zstd" or "lz4"
    level: int

    def chunks(self, n_levels: int | None) -> tuple[int, ...]:
        lev = () if n_levels is None else (n_levels,)
        return (self.time_chunk, *lev, *self.inner)

    def shards(self, n_levels: int | None) -> tuple[int, ...]:
        lev = () if n_levels is None else (n_levels,)
        return (self.shard_steps, *lev, *self.shard_yx)

    def compressors(self) -> list:
        if self.codec == "zstd":
            from zarr.codecs import ZstdCodec

            return [ZstdCodec(level=self.level)]
        from zarr.codecs.numcodecs import LZ4

        return [LZ4(acceleration=1)]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_layout(
    n_time: int,
    field: tuple[int, int],
    step_bytes: int,
    *,
    tile: tuple[int, int] | None = None,
    time_chunk: int = 1,
    shard_steps: int | None = None,
    shard_yx: tuple[int, int] | None = None,
    shard_mb: float = 64.0,
    codec: str = "zstd",
    level: int = 3,
) -> Layout:
    """Check the requested sizes and fill in the rest; ``step_bytes``: one time step,
    all variables and levels, uncompressed (the largest variable's, for shards)."""
    ny, nx = field
    if codec not in ("zstd", "lz4"):
        raise ConfigError(f"codec must be 'zstd' or 'lz4' (GPU-decodable), got {codec!r}.")
    if tile is None:
        inner = (min(DEFAULT_TILE[0], ny), min(DEFAULT_TILE[1], nx))
    else:
        if len(tile) != 2 or min(tile) < 1:
            raise ConfigError(f"tile must be (height, width) >= 1, got {tile}.")
        if tile[0] > ny or tile[1] > nx:
            raise ConfigError(f"tile {tuple(tile)} is larger than the field {ny}x{nx}.")
        inner = (int(tile[0]), int(tile[1]))
    if time_chunk < 1 or time_chunk > n_time:
        raise ConfigError(f"time_chunk must be in [1, {n_time}], got {time_chunk}.")
    if shard_yx is None:
        shard_yx = (_round_up(ny, inner[0]), _round_up(nx, inner[1]))
    elif shard_yx[0] % inner[0] or shard_yx[1] % inner[1]:
        raise ConfigError(
            f"shard {tuple(shard_yx)} is not a multiple of the inner chunk {inner} in y and x."
        )
    if shard_steps is None:
        padded = step_bytes * (shard_yx[0] * shard_yx[1]) / (ny * nx)
        fit = int(shard_mb * 2**20 // max(padded, 1))
        shard_steps = max(time_chunk, fit // time_chunk * time_chunk)
        shard_steps = min(shard_steps, _round_up(n_time, time_chunk))
    elif shard_steps < 1 or shard_steps % time_chunk:
        raise ConfigError(
            f"shard_steps={shard_steps} is not a multiple of time_chunk={time_chunk}: "
            f"a shard must hold whole inner chunks."
        )
    return Layout(time_chunk, inner, int(shard_steps), tuple(shard_yx), codec, level)


def field_step_bytes(shapes: list[tuple[int, ...]], dtypes: list[np.dtype]) -> int:
    """Bytes of one time step of the largest variable (shards are per variable)."""
    return max(
        int(np.prod(s[1:])) * np.dtype(d).itemsize for s, d in zip(shapes, dtypes, strict=True)
    )
