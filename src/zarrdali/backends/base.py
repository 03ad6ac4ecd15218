"""The roles every backend fills: read, decode, assemble.

A backend is an object passed down (like zarr-python's buffer prototypes), not a
flag tested throughout the code. Both satisfy :class:`Backend`. The CPU backend
(numpy, numcodecs) fills the per-chunk roles below and runs them fused, chunk
by chunk, in its threads; the GPU backend (CuPy, kvikIO, nvCOMP) reuses the CPU
reader's shard indexes and coalescing, then decodes a whole batch in one nvCOMP
call and gathers it with one kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..chunkplan import BatchReadPlan, ChunkRef, TileCopy
from ..store import ArrayLayout


class ChunkReader(Protocol):
    def read(self, layouts: Sequence[ArrayLayout], chunks: Sequence[ChunkRef]) -> list[Any | None]:
        """Encoded bytes of each chunk, or None for a chunk that does not exist."""


class ChunkDecoder(Protocol):
    def decode(
        self, layout: ArrayLayout, chunk: ChunkRef, data: Any | None, out: Any | None = None
    ) -> Any:
        """One decoded chunk (full chunk shape; a missing chunk as the fill value)."""


class Assembler(Protocol):
    def scatter(self, outputs: Sequence[Any], decoded: Any, copies: Sequence[TileCopy]) -> None:
        """Copy one decoded chunk's tile pieces into the batch's output arrays."""


class Backend(Protocol):
    device: str

    def load_batch(self, layouts: Sequence[ArrayLayout], plan: BatchReadPlan) -> Any:
        """Read, decode and assemble one batch: the window, or one array per output."""

    def close(self) -> None: ...


def batch_dtype(layouts: Sequence[ArrayLayout]) -> np.dtype:
    """One dtype all variables fit in (the pipeline casts to float32 later)."""
    return np.result_type(*(layout.dtype for layout in layouts))
