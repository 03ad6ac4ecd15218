"""Which chunks a batch needs and where each piece of them goes. Pure: no I/O.

Each chunk is listed once however many samples of the batch touch it; a list of
copies says which slice of which decoded chunk lands where in the
``[B, T, C, H, W]`` batch buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .store import ArrayLayout


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of one variable (an inner chunk for sharded arrays)."""

    var: int
    coords: tuple[int, ...]


@dataclass(frozen=True)
class TileCopy:
    """``out[dst] = decoded_chunks[chunk][src]``."""

    chunk: int
    src: tuple[int | slice, ...]
    dst: tuple[int | slice, ...]


@dataclass(frozen=True)
class BatchReadPlan:
    samples: np.ndarray  # [B, 3] (t0, y0, x0)
    out_shape: tuple[int, int, int, int, int]  # [B, T, C, H, W]
    chunks: list[ChunkRef]
    copies: list[TileCopy]

    def decoded_nbytes(self, layouts: Sequence[ArrayLayout]) -> int:
        return sum(layouts[c.var].chunk_nbytes for c in self.chunks)

    def copies_by_chunk(self) -> list[list[TileCopy]]:
        """The copies grouped by the chunk they read from (index: position in ``chunks``)."""
        groups: list[list[TileCopy]] = [[] for _ in self.chunks]
        for copy in self.copies:
            groups[copy.chunk].append(copy)
        return groups


def _spans(start: int, length: int, chunk: int) -> list[tuple[int, slice, slice]]:
    """Chunk indices covering ``[start, start+length)``, with in-chunk and output slices."""
    out = []
    for c in range(start // chunk, (start + length - 1) // chunk + 1):
        lo = max(start, c * chunk)
        hi = min(start + length, (c + 1) * chunk)
        out.append((c, slice(lo - c * chunk, hi - c * chunk), slice(lo - start, hi - start)))
    return out


def channel_offsets(layouts: Sequence[ArrayLayout]) -> list[int]:
    """First channel of each variable; levels add one channel each."""
    offsets, c = [], 0
    for layout in layouts:
        offsets.append(c)
        c += layout.n_levels
    return offsets


def plan_batch(
    layouts: Sequence[ArrayLayout],
    samples: np.ndarray,
    *,
    n_frames: int,
    frame_step: int,
    tile_hw: tuple[int, int],
) -> BatchReadPlan:
    """Plan the reads and copies that assemble ``samples`` into one batch."""
    h, w = tile_hw
    offsets = channel_offsets(layouts)
    n_channels = offsets[-1] + layouts[-1].n_levels
    chunk_index: dict[ChunkRef, int] = {}
    copies: list[TileCopy] = []
    # Spatial and level pieces depend only on (variable, y0, x0): reuse them.
    pieces_cache: dict[tuple[int, int, int], list] = {}
    for b, (t0, y0, x0) in enumerate(samples.tolist()):
        for v, layout in enumerate(layouts):
            key = (v, y0, x0)
            pieces = pieces_cache.get(key)
            if pieces is None:
                cs = layout.chunk_shape
                ys, xs = _spans(y0, h, cs[-2]), _spans(x0, w, cs[-1])
                if len(layout.shape) == 4:
                    levels = _spans(0, layout.shape[1], cs[1])
                    pieces = [
                        (
                            (cl, cy, cx),
                            (sl, sy, sx),
                            (slice(dl.start + offsets[v], dl.stop + offsets[v]), dy, dx),
                        )
                        for cl, sl, dl in levels
                        for cy, sy, dy in ys
                        for cx, sx, dx in xs
                    ]
                else:
                    pieces = [
                        ((cy, cx), (sy, sx), (offsets[v], dy, dx))
                        for cy, sy, dy in ys
                        for cx, sx, dx in xs
                    ]
                pieces_cache[key] = pieces
            ct_size = layout.chunk_shape[0]
            for f in range(n_frames):
                t = t0 + f * frame_step
                ct, tt = divmod(t, ct_size)
                for coords, src, dst in pieces:
                    ref = ChunkRef(v, (ct, *coords))
                    i = chunk_index.setdefault(ref, len(chunk_index))
                    copies.append(TileCopy(i, (tt, *src), (b, f, *dst)))
    return BatchReadPlan(
        samples=np.ascontiguousarray(samples, dtype=np.int64),
        out_shape=(len(samples), n_frames, n_channels, h, w),
        chunks=list(chunk_index),
        copies=copies,
    )
