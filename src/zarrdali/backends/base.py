"""The roles every backend fills: locate, read, decode, assemble.

A backend is an object passed down (like zarr-python's buffer prototypes), not a
flag tested throughout the code. Both satisfy :class:`Backend` and consume the
same :class:`~zarrdali.batchplan.BatchPlan` (arrays, one per batch) and the
same :class:`~zarrdali.backends.locate.ChunkLocations` (where each chunk's
bytes are, also arrays). The CPU backend (numpy, numcodecs) reads, decodes and
copies chunk by chunk in its threads; the GPU backend (CuPy, kvikIO, nvCOMP)
reads a batch into one device buffer, decodes it in batched nvCOMP calls and
gathers it with one kernel launch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..batchplan import BatchPlan
from ..store import ArrayLayout
from .locate import ChunkLocations


class Locator(Protocol):
    def locate(self, plan: BatchPlan) -> ChunkLocations:
        """File, offset and size of every chunk of ``plan`` (missing ones flagged)."""


class ChunkDecoder(Protocol):
    def decode(
        self,
        layout: ArrayLayout,
        coords: Sequence[int],
        data: Any | None,
        out: Any | None = None,
        needed: int | None = None,
    ) -> Any:
        """One decoded chunk (full chunk shape; a missing chunk as the fill value)."""


class Backend(Protocol):
    device: str

    def load_batch(self, layouts: Sequence[ArrayLayout], plan: BatchPlan) -> Any:
        """Read, decode and assemble one batch: the window, or one array per output."""

    def close(self) -> None: ...


def batch_dtype(layouts: Sequence[ArrayLayout]) -> np.dtype:
    """One dtype all variables fit in (the pipeline casts to float32 later)."""
    return np.result_type(*(layout.dtype for layout in layouts))
