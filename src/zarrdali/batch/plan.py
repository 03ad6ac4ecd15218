"""One batch as arrays: which chunks it needs and where each piece of them goes.

Pure numpy, no I/O, and no Python loop whose length grows with the batch: the
only loop is over variables. A batch of ``B`` samples, ``T`` frames and ``V``
variables is ``B * T * V`` *tiles*; a tile covers the levels, rows and columns
of one variable at one frame, and crosses a few chunks. Each (tile, chunk)
intersection is one *piece*: copy ``extent`` elements from ``src`` of a decoded
chunk to ``dst`` of an output. The chunk set is ``np.unique`` over integer
chunk keys, with its inverse mapping pieces to chunks.

Arrays without a level axis are handled as if they had one level in chunks of
one level, so every chunk is addressed as ``(t, level, y, x)`` and every piece
has a level extent. Both backends consume the same :class:`BatchPlan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from zarrdali.store.open import ArrayLayout


def chunk_shape4(layout: ArrayLayout) -> tuple[int, int, int, int]:
    """The chunk shape as ``(t, level, y, x)``; one level for arrays without levels."""
    return layout.canonical(layout.chunk_shape)


def chunk_grid4(layout: ArrayLayout) -> tuple[int, int, int, int]:
    """Chunks along ``(t, level, y, x)``."""
    shape = layout.canonical(layout.shape)
    return tuple(-(-n // c) for n, c in zip(shape, chunk_shape4(layout), strict=True))


def natural_coords(layout: ArrayLayout, coords4: Sequence[int]) -> tuple[int, ...]:
    """Chunk grid coordinates in the array's own dimensions, from ``(t, level, y, x)``."""
    return layout.stored(coords4)


def level_runs(layout: ArrayLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The served levels as runs that each lie in one chunk along the level axis:
    per run its chunk (along levels), first level inside that chunk, first
    channel (of the variable's) and length. Every level served, in store order,
    is one run per chunk; chosen levels are runs of consecutive ascending
    levels of one chunk, in the order chosen."""
    cl = chunk_shape4(layout)[1]
    if layout.levels is None:
        chunk = np.arange(chunk_grid4(layout)[1], dtype=np.int64)
        first = chunk * cl
        return chunk, np.zeros_like(chunk), first, np.minimum(cl, layout.n_levels - first)
    levels = np.array(layout.levels, dtype=np.int64)
    starts = np.ones(len(levels), dtype=bool)
    starts[1:] = (np.diff(levels) != 1) | (levels[1:] % cl == 0)
    dst = np.flatnonzero(starts)
    length = np.diff(np.append(dst, len(levels)))
    return levels[dst] // cl, levels[dst] % cl, dst.astype(np.int64), length


def channel_offsets(layouts: Sequence[ArrayLayout]) -> list[int]:
    """First channel of each variable; levels add one channel each."""
    offsets, c = [], 0
    for layout in layouts:
        offsets.append(c)
        c += layout.n_levels
    return offsets


@dataclass(frozen=True)
class LayoutTables:
    """What planning needs of the variables, as arrays (computed once per layouts)."""

    chunk_shapes: np.ndarray  # [V, 4] (t, level, y, x)
    chunk_grids: np.ndarray  # [V, 4]
    element_strides: np.ndarray  # [V, 4]: of a decoded chunk, along (t, level, y, x)
    key_bases: np.ndarray  # [V + 1]
    channel_offsets: np.ndarray  # [V]
    groups: tuple  # ((chunk shape, grid, level runs), variables) of each distinct chunking


_TABLES: dict[tuple[int, ...], tuple[Sequence[ArrayLayout], LayoutTables]] = {}


def layout_tables(layouts: Sequence[ArrayLayout]) -> LayoutTables:
    """:class:`LayoutTables` of ``layouts``, cached (a few layouts lists live per process)."""
    key = tuple(id(layout) for layout in layouts)
    hit = _TABLES.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], layouts, strict=True)):
        return hit[1]
    groups: dict[tuple, list[int]] = {}
    runs: dict[tuple, tuple[np.ndarray, ...]] = {}
    for v, layout in enumerate(layouts):
        lr = level_runs(layout)
        runs_key = tuple(tuple(a.tolist()) for a in lr)
        chunking = (chunk_shape4(layout), chunk_grid4(layout), runs_key)
        runs[chunking] = lr
        groups.setdefault(chunking, []).append(v)
    tables = LayoutTables(
        chunk_shapes=np.array([chunk_shape4(lay) for lay in layouts], dtype=np.int64),
        chunk_grids=np.array([chunk_grid4(lay) for lay in layouts], dtype=np.int64),
        element_strides=np.array([lay.element_strides4 for lay in layouts], dtype=np.int64),
        key_bases=key_bases(layouts),
        channel_offsets=np.array(channel_offsets(layouts), dtype=np.int64),
        groups=tuple(
            ((k[0], k[1], runs[k]), np.array(v, dtype=np.int64)) for k, v in groups.items()
        ),
    )
    if len(_TABLES) >= 64:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (list(layouts), tables)  # the layouts kept alive: their ids stay theirs
    return tables


def key_bases(layouts: Sequence[ArrayLayout]) -> np.ndarray:
    """First integer chunk key of each variable (keys of variable ``v`` are
    ``bases[v] .. bases[v + 1] - 1``), and the total as the last entry."""
    sizes = [int(np.prod(chunk_grid4(layout), dtype=np.int64)) for layout in layouts]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


# Columns of BatchPlan.pieces.
PIECE_OUT = 0
PIECE_SRC = slice(1, 5)
PIECE_DST = slice(5, 10)
PIECE_EXTENT = slice(10, 13)


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """The reads and copies that assemble one batch, as arrays.

    Chunks (``N`` rows, sorted by key): ``chunk_var``, ``chunk_coords``
    (``(t, level, y, x)`` chunk indices) and ``chunk_key`` (unique integers).
    Pieces (``P`` rows): ``piece_chunk`` (row of the chunk table),
    ``piece_out`` (0: input or whole window, 1: target frames),
    ``piece_src`` (first ``(t, level, y, x)`` element inside the chunk),
    ``piece_dst`` (first ``(b, frame, channel, y, x)`` element of its output)
    and ``piece_extent`` (``(levels, rows, columns)``).
    Tiles (``J = V * B * T`` rows, variable-major): ``tile_var``, ``tile_b``,
    ``tile_out``, ``tile_frame`` (frame in its output), ``tile_t`` (time
    index in its chunk), and ``tile_chunks`` ``[J, L, Y, X]``: the chunk row
    of each chunk the tile crosses, ``-1`` past its last one. The GPU gather
    derives every element's source from the tiles alone.
    """

    samples: np.ndarray
    out_shape: tuple[int, int, int, int, int]
    frame_split: int | None
    chunk_var: np.ndarray
    chunk_coords: np.ndarray
    chunk_key: np.ndarray
    piece_chunk: np.ndarray
    tile_var: np.ndarray
    tile_b: np.ndarray
    tile_out: np.ndarray
    tile_frame: np.ndarray
    tile_t: np.ndarray
    tile_chunks: np.ndarray
    piece_blocks: list[Callable[[], np.ndarray]] = field(repr=False, default_factory=list)

    @cached_property
    def pieces(self) -> np.ndarray:
        """``[P, 13]``: out, src (4), dst (5), extent (3); the ``piece_*`` views."""
        return np.concatenate([block() for block in self.piece_blocks])

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_key)

    @property
    def n_pieces(self) -> int:
        return len(self.piece_chunk)

    @property
    def piece_out(self) -> np.ndarray:
        return self.pieces[:, PIECE_OUT]

    @property
    def piece_src(self) -> np.ndarray:
        return self.pieces[:, PIECE_SRC]

    @property
    def piece_dst(self) -> np.ndarray:
        return self.pieces[:, PIECE_DST]

    @property
    def piece_extent(self) -> np.ndarray:
        return self.pieces[:, PIECE_EXTENT]

    @property
    def out_shapes(self) -> list[tuple[int, ...]]:
        """Shape of each output: the window, or its first ``frame_split`` frames and the rest."""
        if self.frame_split is None:
            return [self.out_shape]
        b, t, *rest = self.out_shape
        return [(b, self.frame_split, *rest), (b, t - self.frame_split, *rest)]

    def chunk_coords_of(self, layouts: Sequence[ArrayLayout], i: int) -> tuple[int, ...]:
        """Chunk ``i``'s grid coordinates in its array's own dimensions (for keys, messages)."""
        return natural_coords(layouts[self.chunk_var[i]], self.chunk_coords[i])

    def decoded_nbytes(self, layouts: Sequence[ArrayLayout]) -> int:
        nbytes = np.array([layout.chunk_nbytes for layout in layouts], dtype=np.int64)
        return int(nbytes[self.chunk_var].sum())

    @cached_property
    def piece_order(self) -> tuple[np.ndarray, np.ndarray]:
        """``(order, bounds)``: pieces ``order[bounds[i]:bounds[i + 1]]`` read chunk ``i``."""
        order = np.argsort(self.piece_chunk, kind="stable")
        bounds = np.searchsorted(self.piece_chunk[order], np.arange(self.n_chunks + 1))
        return order, bounds

    def needed_nbytes(self, layouts: Sequence[ArrayLayout]) -> np.ndarray:
        """Per chunk, the length of the decoded prefix (stored C order) its pieces read.

        A chunk's bytes past its last copied element are never looked at, so a
        streaming decoder may stop there: with field-sized chunks and small
        tiles that skips a large part of the decoding.
        """
        strides = layout_tables(layouts).element_strides
        items = np.array([layout.dtype.itemsize for layout in layouts], dtype=np.int64)
        var = self.chunk_var[self.piece_chunk]
        last = self.piece_src.copy()
        last[:, 1:] += self.piece_extent - 1
        # strides are positive: the piece's last byte is that of its far corner
        end = (last * strides[var]).sum(axis=1) + 1
        needed = np.zeros(self.n_chunks, dtype=np.int64)
        np.maximum.at(needed, self.piece_chunk, end * items[var])
        return needed


@dataclass(frozen=True)
class _PieceGroup:
    """The pieces of one chunking group: the grid cells they are and the small
    per-axis arrays their fields are looked up in."""

    cells: tuple  # b, f, level, (b, y), (b, x) indices of each piece
    time: tuple  # out_of_frame [T], frame_in_out [T], tt [B, T]
    first_channel: np.ndarray  # per piece
    spans: tuple  # ys, xs, yd, xd ([B, K]), ls, le [L], ye, xe ([B, K])

    def __call__(self) -> np.ndarray:
        b, f, lev, by, bx = self.cells
        out_of_frame, frame_in_out, tt = self.time
        ys, xs, yd, xd, ls, le, ye, xe = self.spans
        columns = [out_of_frame[f], tt[b, f], ls[lev], ys[by], xs[bx]]
        columns += [b, frame_in_out[f], self.first_channel, yd[by], xd[bx]]
        columns += [le[lev], ye[by], xe[bx]]
        block = np.empty((len(b), len(columns)), dtype=np.int64)
        for k, column in enumerate(columns):
            block[:, k] = column
        return block


def _check_samples(
    layouts: Sequence[ArrayLayout], samples: np.ndarray, span: int, tile_hw: tuple[int, int]
) -> None:
    """Every sample's window and tile must lie inside every variable: a chunk key
    past an axis would name another chunk, or another variable's."""
    n_time = min(layout.n_time for layout in layouts)
    ny, nx = layouts[0].grid_shape
    t0, y0, x0 = samples.T
    bad = (t0 < 0) | (t0 + span > n_time) | (y0 < 0) | (y0 + tile_hw[0] > ny)
    bad |= (x0 < 0) | (x0 + tile_hw[1] > nx)
    if bad.any():
        first = tuple(int(v) for v in samples[np.argmax(bad)])
        raise ValueError(
            f"sample (t0, y0, x0) = {first} does not fit: a window of {span} steps and a "
            f"{tile_hw} tile must lie inside (time {n_time}, field {ny}x{nx})"
        )


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` for int64 keys, with a stable sort
    (radix/merge: about twice as fast as unique's default sort on these sizes)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.empty(len(keys), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def plan_batch(
    layouts: Sequence[ArrayLayout],
    samples: np.ndarray,
    *,
    n_frames: int,
    frame_step: int,
    tile_hw: tuple[int, int],
    frame_split: int | None = None,
) -> BatchPlan:
    """Plan the reads and copies that assemble ``samples`` (``[B, 3]`` of
    ``(t0, y0, x0)``) into one batch of ``n_frames`` frames of ``tile_hw``.

    With ``frame_split=k`` the batch is two outputs: frames ``[0, k)`` (the
    input) and ``[k, n_frames)`` (the target).
    """
    if frame_split is not None and not 0 < frame_split < n_frames:
        raise ValueError(f"frame_split must be in 1..{n_frames - 1}, got {frame_split}")
    samples = np.ascontiguousarray(samples, dtype=np.int64).reshape(-1, 3)
    n_b = len(samples)
    h, w = tile_hw
    _check_samples(layouts, samples, (n_frames - 1) * frame_step + 1, tile_hw)
    tables = layout_tables(layouts)
    offsets_arr, bases = tables.channel_offsets, tables.key_bases
    frames = np.arange(n_frames, dtype=np.int64)
    t = samples[:, :1] + frames * frame_step  # [B, T]
    split = n_frames if frame_split is None else frame_split
    out_of_frame = (frames >= split).astype(np.int64)
    frame_in_out = frames - split * out_of_frame

    # Spatial spans depend on the chunk width only: shared by variables alike.
    spans: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def axis_spans(axis: int, length: int, chunk: int) -> tuple[np.ndarray, ...]:
        """Per sample and k-th chunk crossed along ``axis`` (1: y, 2: x): chunk
        index, in-chunk start, output start, extent, valid; each ``[B, K]``."""
        key = (axis, chunk)
        start = samples[:, axis]
        if key not in spans:
            first = start // chunk
            n = (start + length - 1) // chunk - first + 1
            k = np.arange(int(n.max()) if len(n) else 1, dtype=np.int64)
            c = first[:, None] + k
            lo = np.maximum(start[:, None], c * chunk)
            hi = np.minimum(start[:, None] + length, (c + 1) * chunk)
            spans[key] = (c, lo - c * chunk, lo - start[:, None], hi - lo, k < n[:, None])
        return spans[key]

    # Variables with the same chunking are planned together, with a leading
    # variable axis: the loop runs once per chunking, not once per variable.
    keys, tiles_of, pieces = [], [], []
    max_lyx = [1, 1, 1]
    for (cs4, grid, (lc, ls, ld, le)), vs in tables.groups:
        ct_size, _, cy, cx = cs4
        yc, ys, yd, ye, yv = axis_spans(1, h, cy)
        xc, xs, xd, xe, xv = axis_spans(2, w, cx)
        n_l, n_y, n_x = len(lc), yc.shape[1], xc.shape[1]
        max_lyx = [max(a, b) for a, b in zip(max_lyx, (n_l, n_y, n_x), strict=True)]
        ct, tt = np.divmod(t, ct_size)  # [B, T]
        # The pieces are the valid cells of a [G, B, T, L, Y, X] grid (G: the
        # variables of this chunking); index the small per-axis arrays with the
        # cells' coordinates (cheaper than masking broadcast arrays).
        shape = (len(vs), n_b, n_frames, n_l, n_y, n_x)
        valid = np.empty(shape, dtype=bool)
        valid[...] = (yv[:, None, None, :, None] & xv[:, None, None, None, :])[None]
        tiles_of.append((vs, n_l, n_y, n_x, valid))
        g, b, f, lev, y, x = np.nonzero(valid)
        by, bx = (b, y), (b, x)
        # Made when a backend asks for them (the GPU path needs only the tiles).
        pieces.append(
            _PieceGroup(
                cells=(b, f, lev, by, bx),
                time=(out_of_frame, frame_in_out, tt),
                first_channel=ld[lev] + offsets_arr[vs][g],
                spans=(ys, xs, yd, xd, ls, le, ye, xe),
            )
        )
        keys.append(
            ((ct[b, f] * grid[1] + lc[lev]) * grid[2] + yc[by]) * grid[3] + xc[bx] + bases[vs][g]
        )

    chunk_key, inverse = unique_inverse(np.concatenate(keys))
    chunk_var = np.searchsorted(bases, chunk_key, side="right") - 1
    # one grid for all chunks when every variable has the same (the usual case)
    grids = tables.chunk_grids[:1] if len(tables.groups) == 1 else tables.chunk_grids[chunk_var]
    chunk_coords = np.empty((len(chunk_key), 4), dtype=np.int64)
    rest = chunk_key - bases[chunk_var]
    for axis in (3, 2, 1):
        rest, chunk_coords[:, axis] = np.divmod(rest, grids[:, axis])
    chunk_coords[:, 0] = rest

    # Tiles: [V, B, T] rows, each with a padded [L, Y, X] table of chunk rows.
    per_var = n_b * n_frames
    tile_chunks = np.full((len(layouts), per_var, *max_lyx), -1, dtype=np.int64)
    start = 0
    for vs, n_l, n_y, n_x, valid in tiles_of:
        block = np.full(valid.shape, -1, dtype=np.int64)
        n = int(np.count_nonzero(valid))
        block[valid] = inverse[start : start + n]
        start += n
        tile_chunks[vs, :, :n_l, :n_y, :n_x] = block.reshape(len(vs), per_var, n_l, n_y, n_x)
    tile_chunks = tile_chunks.reshape(-1, *max_lyx)
    tile_var = np.repeat(np.arange(len(layouts), dtype=np.int64), per_var)
    tile_b = np.tile(np.repeat(np.arange(n_b, dtype=np.int64), n_frames), len(layouts))
    tile_f = np.tile(frames, n_b * len(layouts))
    tile_t = (t.reshape(1, -1) % tables.chunk_shapes[:, :1]).reshape(-1)

    return BatchPlan(
        samples=samples,
        out_shape=(n_b, n_frames, sum(lay.n_levels for lay in layouts), h, w),
        frame_split=frame_split,
        chunk_var=chunk_var,
        chunk_coords=chunk_coords,
        chunk_key=chunk_key,
        piece_chunk=inverse,
        piece_blocks=pieces,
        tile_var=tile_var,
        tile_b=tile_b,
        tile_out=out_of_frame[tile_f],
        tile_frame=frame_in_out[tile_f],
        tile_t=tile_t,
        tile_chunks=tile_chunks,
    )
