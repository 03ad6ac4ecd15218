"""Static (time-invariant) fields in device memory: the GPU path's copy, cut per batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from zarrdali.batch.static import StaticFields, cut_tiles
from zarrdali.errors import ConfigError
from zarrdali.gpu import feed


class DeviceStaticFields:
    """The static fields in device memory (GPU path), owned by the loader.

    Uploaded once, to GPU ``device_id``, when the loader is built; :meth:`close`
    drops the device array (the loader calls it before closing its backend).
    Tiles are cut on the stream DALI copies the batch on (the feed stream, which
    lives as long as the backend), so the copy is ordered after the cut and the
    tiles' memory is reused only in that stream's order; they are handed to DALI
    as the feed hands the frames (:func:`~zarrdali.gpu.feed.hand_over`:
    their CUDA array interface names that stream).
    """

    def __init__(self, static: StaticFields, device_id: int, cupy: Any = None) -> None:
        if cupy is None:
            import cupy
        self._cp = cupy
        self._device_id = device_id
        with cupy.cuda.Device(device_id):
            # On the device's default stream, which lives as long as the process:
            # CuPy's pool keeps a block in the arena of the stream it was made on.
            self._field = cupy.asarray(static.field)
            cupy.cuda.get_current_stream().synchronize()  # before a side stream reads it

    def tiles(self, samples: np.ndarray, flags: np.ndarray | None, tile_hw, stream: Any) -> Any:
        field = self._field
        if field is None:
            raise ConfigError("the loader's static fields were released (loader closed)")
        with self._cp.cuda.Device(self._device_id), stream:
            tiles = cut_tiles(self._cp, field, samples, flags, tile_hw)
            return feed.hand_over(tiles, stream)  # looked up per call (tests replace it)

    def close(self) -> None:
        self._field = None


@dataclass(frozen=True)
class DeviceStaticTiles:
    """A device batch output: the static tiles cut in device memory on the
    stream ``stream_of()`` returns (the epoch feed's, which DALI copies on)."""

    static: DeviceStaticFields
    tile_hw: tuple[int, int]
    stream_of: Callable[[], Any]

    def __call__(self, samples: np.ndarray, flags: np.ndarray | None) -> Any:
        return self.static.tiles(samples, flags, self.tile_hw, self.stream_of())
