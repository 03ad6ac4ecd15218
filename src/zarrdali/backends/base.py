"""The roles every backend fills: read, decode, assemble.

A backend is an object passed down (like zarr-python's buffer prototypes), not a
flag tested throughout the code. The CPU backend (numpy, numcodecs) and the GPU
backend (CuPy, kvikIO, nvCOMP) implement the same three roles; the staged
``load_batch`` below drives them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..chunkplan import BatchReadPlan, ChunkRef
from ..store import ArrayLayout


class ChunkReader(Protocol):
    def read(self, layouts: Sequence[ArrayLayout], chunks: Sequence[ChunkRef]) -> list[Any | None]:
        """Encoded bytes of each chunk, or None for a chunk that does not exist."""


class ChunkDecoder(Protocol):
    def decode(
        self,
        layouts: Sequence[ArrayLayout],
        chunks: Sequence[ChunkRef],
        encoded: Sequence[Any | None],
    ) -> list[Any]:
        """Decoded chunk arrays (full chunk shape; missing chunks as fill value)."""


class Assembler(Protocol):
    def assemble(self, plan: BatchReadPlan, decoded: Sequence[Any], dtype: np.dtype) -> Any:
        """Gather every sample's tile into one ``[B, T, C, H, W]`` array."""


class Backend(Protocol):
    device: str

    def load_batch(self, layouts: Sequence[ArrayLayout], plan: BatchReadPlan) -> Any:
        """Read, decode and assemble one batch."""

    def close(self) -> None: ...


def batch_dtype(layouts: Sequence[ArrayLayout]) -> np.dtype:
    """One dtype all variables fit in (the pipeline casts to float32 later)."""
    return np.result_type(*(layout.dtype for layout in layouts))
