"""The object plan zarrdali used before its array plan: the reference the array
plan is tested against (one Python object per chunk and per tile copy).

Each chunk is listed once however many samples of the batch touch it; a list of
copies says which slice of which decoded chunk lands where in the
``[B, T, C, H, W]`` batch buffer, or, split along T, in the input-frames and
target-frames buffers (so nothing downstream has to slice and copy them apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zarrdali.store.open import ArrayLayout


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of one variable (an inner chunk for sharded arrays)."""

    var: int
    coords: tuple[int, ...]


@dataclass(frozen=True)
class TileCopy:
    """``outputs[out][dst] = decoded_chunks[chunk][src]``."""

    chunk: int
    src: tuple[int | slice, ...]
    dst: tuple[int | slice, ...]
    out: int = 0


@dataclass(frozen=True)
class BatchReadPlan:
    samples: np.ndarray  # [B, 3] (t0, y0, x0)
    out_shape: tuple[int, int, int, int, int]  # the whole window [B, T, C, H, W]
    chunks: list[ChunkRef]
    copies: list[TileCopy]
    frame_split: int | None = None  # frames [0, k) go to output 0, [k, T) to output 1

    @property
    def out_shapes(self) -> list[tuple[int, ...]]:
        """Shape of each output: the window, or its first ``frame_split`` frames and the rest."""
        if self.frame_split is None:
            return [self.out_shape]
        b, t, *rest = self.out_shape
        return [(b, self.frame_split, *rest), (b, t - self.frame_split, *rest)]

    def decoded_nbytes(self, layouts: Sequence[ArrayLayout]) -> int:
        return sum(layouts[c.var].chunk_nbytes for c in self.chunks)

    def needed_nbytes(self, layouts: Sequence[ArrayLayout]) -> list[int]:
        """Per chunk, the length of the decoded prefix (C order) its copies read.

        A chunk's bytes past its last copied element are never looked at, so a
        streaming decoder may stop there: with field-sized chunks and small
        tiles that skips a large part of the decoding.
        """
        needed = [0] * len(self.chunks)
        for copy in self.copies:
            layout = layouts[self.chunks[copy.chunk].var]
            last = tuple(s.stop - 1 if isinstance(s, slice) else s for s in copy.src)
            end = 0
            for i, n in zip(last, layout.chunk_shape, strict=True):  # C-order flat index
                end = end * n + i
            end += 1
            needed[copy.chunk] = max(needed[copy.chunk], end * layout.dtype.itemsize)
        return needed

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
    frame_split: int | None = None,
) -> BatchReadPlan:
    """Plan the reads and copies that assemble ``samples`` into one batch.

    With ``frame_split=k`` the batch is two outputs: frames ``[0, k)`` (the
    input) and ``[k, n_frames)`` (the target).
    """
    if frame_split is not None and not 0 < frame_split < n_frames:
        raise ValueError(f"frame_split must be in 1..{n_frames - 1}, got {frame_split}")
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
                out, f_out = (1, f - frame_split) if frame_split and f >= frame_split else (0, f)
                for coords, src, dst in pieces:
                    ref = ChunkRef(v, (ct, *coords))
                    i = chunk_index.setdefault(ref, len(chunk_index))
                    copies.append(TileCopy(i, (tt, *src), (b, f_out, *dst), out))
    return BatchReadPlan(
        samples=np.ascontiguousarray(samples, dtype=np.int64),
        out_shape=(len(samples), n_frames, n_channels, h, w),
        chunks=list(chunk_index),
        copies=copies,
        frame_split=frame_split,
    )
