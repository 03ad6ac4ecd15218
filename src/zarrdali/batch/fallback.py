"""Read chunks through zarr-python when the fast path does not apply.

Used for codec chains the fast path does not understand, and on the GPU path
for stores that are not on a local filesystem. Slower (no coalescing, no
batched decode), never wrong.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import zarr

from zarrdali.errors import ChunkError
from zarrdali.store.open import ArrayLayout

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def fallback_reason(layout: ArrayLayout) -> str:
    if layout.codec is None:
        return "its codec chain is not one the fast path decodes"
    return "this backend does not read remote stores itself yet"


def warn_fallback_once(store_name: str, layout: ArrayLayout) -> None:
    """Warn once per (store, array) that reads go through zarr-python."""
    with _warned_lock:
        if (store_name, layout.name) in _warned:
            return
        _warned.add((store_name, layout.name))
    warnings.warn(
        f"zarrdali: array {layout.name!r} of {store_name!r} is read through zarr-python "
        f"because {fallback_reason(layout)}; this is slower. `zarrdali prepare` converts "
        f"a store to a layout the fast path reads.",
        UserWarning,
        stacklevel=3,
    )


class ZarrPythonChunkSource:
    """Decoded chunks of arrays read with zarr-python's own indexing."""

    def __init__(self, group: zarr.Group, store_name: str) -> None:
        self._group = group
        self._store_name = store_name
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def read_decoded(self, layout: ArrayLayout, coords: Sequence[int]) -> np.ndarray:
        """The chunk at grid ``coords`` (the array's own dimensions), full chunk shape."""
        warn_fallback_once(self._store_name, layout)
        cs = layout.chunk_shape
        lo = [c * n for c, n in zip(coords, cs, strict=True)]
        hi = [min(a + n, s) for a, n, s in zip(lo, cs, layout.shape, strict=True)]
        region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        try:
            data = self._array(layout.name)[region]
        except Exception as err:  # zarr-python raises the codec's own errors
            raise ChunkError(
                f"zarr-python cannot read chunk: {type(err).__name__}: {err}",
                store=self._store_name,
                array=layout.name,
                key=layout.describe_chunk(tuple(coords)),
            ) from err
        if data.shape == cs:
            return np.asarray(data, dtype=layout.dtype)
        # Edge chunk: pad to the full chunk shape as stored chunks are.
        full = np.full(cs, layout.fill_value, dtype=layout.dtype)
        full[tuple(slice(0, b - a) for a, b in zip(lo, hi, strict=True))] = data
        return full
