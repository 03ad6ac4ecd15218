"""CPU backend: ``os.pread`` (or memory-mapped files), numcodecs, numpy, in threads.

One backend per process: in each worker process of the CPU path (one thread
there: the processes are the parallelism, since per-chunk work holds the GIL
part of the time), or in the training process with ``workers=0`` (a thread
pool the size of ``num_threads``). The three roles (reader,
decoder, assembler) run fused per chunk inside one task: a chunk's bytes are
read with ``pread`` into a thread-local buffer (coalesced with its neighbours)
or, with ``memory_map=True``, decoded straight from the page cache through a
memory map (``mapped.py``), into the batch itself when the chunk is one whole
piece of it, else into thread-local scratch and scattered into the batch at
once. ``pread`` is the default because a file rewritten while it is read then
gives a short read (a ``ChunkError``) or its old or new bytes, where a map
kills the process with SIGBUS once its file shrinks; the copy costs about 10%
more CPU per sample (``benchmarks/pread_vs_maps.py``). zstd chunks go
through numcodecs' libzstd with one reused context per thread
(``zstdctx.py``), on raw addresses. So no per-chunk memory is allocated, each
chunk is touched while it is still in cache, and the Python left per chunk is
one call and a few list lookups: the path runs at the numcodecs decode ceiling.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from zarrdali.batch.backend import EpochRequest, PathTraits, batch_dtype, finish_all
from zarrdali.batch.epoch import EpochRun
from zarrdali.batch.fallback import ZarrPythonChunkSource
from zarrdali.batch.finish import Finish
from zarrdali.batch.host import NumcodecsDecoder, PosixReader, describe_chunk
from zarrdali.batch.locate import ChunkLocations, ChunkLocator, Locators
from zarrdali.batch.plan import (
    PIECE_DST,
    PIECE_EXTENT,
    PIECE_OUT,
    BatchPlan,
    chunk_shape4,
    layout_tables,
    natural_coords,
)
from zarrdali.batch.zstdctx import ZstdContexts, ZstdFrameError
from zarrdali.errors import ChunkError
from zarrdali.io.connect import make_source
from zarrdali.io.mapped import MapLease, MappedFiles
from zarrdali.io.ranges import CoalescedReads, within
from zarrdali.io.sources import ByteSource, ObjectReadError, OnReady
from zarrdali.store.codecs import MIN_PARTIAL_SKIP
from zarrdali.store.open import ArrayLayout


def decodes_in_place(
    layouts: Sequence[ArrayLayout],
    plan: BatchPlan,
    pieces: np.ndarray,
    bounds: np.ndarray,
    dtype: np.dtype | None = None,
) -> np.ndarray:
    """Per chunk: whether it can be decoded straight into the batch.

    That is when the chunk is exactly one piece (one time step, all of its
    levels, rows and columns), lands in a contiguous region of its output and
    holds its values as the batch stores them (same dtype, native byte order,
    stored as (time, [level,] y, x)):
    with tiles aligned to inner chunks, most chunks of a sharded store.
    ``pieces`` are ``plan.pieces`` grouped by chunk (``plan.piece_order``);
    ``dtype`` is the batch's (default: :func:`batch_dtype`).
    """
    dtype = batch_dtype(layouts) if dtype is None else np.dtype(dtype)
    same = np.array(
        [
            lay.fast_path and lay.codec.stored_dtype(lay.dtype) == dtype and not lay.transposed
            for lay in layouts
        ]
    )
    shapes = layout_tables(layouts).chunk_shapes[plan.chunk_var]  # [N, 4]
    one = (np.diff(bounds) == 1) & same[plan.chunk_var] & (shapes[:, 0] == 1)
    first = pieces[np.minimum(bounds[:-1], max(len(pieces) - 1, 0))]
    extent, dst = first[:, PIECE_EXTENT], first[:, PIECE_DST]
    whole = np.all(extent == shapes[:, 1:], axis=1)
    _, _, _, h, w = plan.out_shape
    # [.., c:c+nl, dy:dy+ny, dx:dx+nx] of a [B, T, C, H, W] array is contiguous
    # when it spans whole rows, and whole fields unless it is one level.
    contiguous = (dst[:, 4] == 0) & (extent[:, 2] == w)
    contiguous &= (extent[:, 0] == 1) | ((dst[:, 3] == 0) & (extent[:, 1] == h))
    return one & whole & contiguous


def _may_decode_partially(layout: ArrayLayout) -> bool:
    """Whether partial decoding could skip anything in this array's chunks."""
    return layout.fast_path and layout.codec.streams and layout.chunk_nbytes > MIN_PARTIAL_SKIP


def partial_decode_prefixes(layouts: Sequence[ArrayLayout], plan: BatchPlan) -> np.ndarray:
    """Per chunk of ``plan``, the bytes partial decoding stops after (-1: the whole chunk)."""
    prefixes = np.full(plan.n_chunks, -1, dtype=np.int64)
    partial = [_may_decode_partially(layout) for layout in layouts]
    if not any(partial):
        return prefixes  # spares working out the prefixes
    needed = plan.needed_nbytes(layouts)
    chunk_nbytes = np.array([layout.chunk_nbytes for layout in layouts], dtype=np.int64)
    skip = chunk_nbytes[plan.chunk_var] - needed
    use = np.array(partial)[plan.chunk_var] & (skip >= MIN_PARTIAL_SKIP)
    prefixes[use] = needed[use]
    return prefixes


@dataclass(frozen=True)
class BatchWork:
    """One batch's plan and locations as the plain lists the read/copy loops index
    (made once per batch with a few ``tolist`` calls)."""

    locations: ChunkLocations
    read_file: list[int]
    read_start: list[int]
    read_nbytes: list[int]
    read_bounds: list[int]  # chunks read_members[read_bounds[r]:read_bounds[r + 1]] of read r
    read_members: list[int]
    unread: list[int]  # missing chunks (fill value) and chunks zarr-python reads
    chunk_var: list[int]
    chunk_coords: list[list[int]]
    offset: list[int]
    nbytes: list[int]
    needed: list[int]
    piece_bounds: list[int]  # pieces piece_bounds[i]:piece_bounds[i+1] read chunk i
    pieces: list[list[int]]  # out, t, l, sy, sx, b, f, c, dy, dx, nl, ny, nx (by chunk)
    direct: list[bool]  # decode straight into the output (the chunk is one whole piece)
    # Chunks of mapped files (see mapped.py), in file and offset order, and per chunk:
    mapped: list[int] = field(default_factory=list)
    file: list[int] = field(default_factory=list)  # its file (index into locations.paths)
    src: list[int] = field(default_factory=list)  # address of its bytes in the map
    by_context: list[bool] = field(default_factory=list)  # zstd with a reused context
    # decoded by context straight into output in_place_out[i] at byte in_place_offset[i]
    in_place_out: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    in_place_offset: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _in_place_offsets(
    plan: BatchPlan, itemsize: int, pieces: np.ndarray, bounds: np.ndarray, in_place: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per chunk decoded in place: the output its piece lands in, and the byte
    offset it starts at there (-1 for the other chunks)."""
    out = np.zeros(plan.n_chunks, dtype=np.int64)
    offset = np.full(plan.n_chunks, -1, dtype=np.int64)
    if not in_place.any():
        return out, offset
    first = pieces[bounds[:-1][in_place]]
    # C-order strides, in bytes, of each [B, T, C, H, W] output
    shapes = np.array(plan.out_shapes, dtype=np.int64)
    strides = np.cumprod(shapes[:, :0:-1], axis=1)[:, ::-1] * itemsize
    strides = np.concatenate([strides, np.full((len(shapes), 1), itemsize)], axis=1)
    out[in_place] = first[:, PIECE_OUT]
    offset[in_place] = (first[:, PIECE_DST] * strides[out[in_place]]).sum(axis=1)
    return out, offset


CPU_TRAITS = PathTraits(
    device="cpu", host_batches=True, worker_processes=True, forkable=True, uses_dali=False
)


class CpuBackend:
    """Read → decode → assemble on the host. Thread count defaults to the cores.

    With ``partial_decode`` (the default) a chunk is decoded only up to the last
    byte the batch copies from it, where its compressor streams (zstd, gzip,
    none). Field-sized chunks read for small tiles then cost a fraction of a
    whole decode. ``partial_decode=False`` decodes every chunk whole, which also
    runs every compressor's own checks over the whole chunk.

    Host work per batch is array programs (locate, coalesce, group the copies
    by chunk); the per-chunk loop that remains decodes and copies. A local
    store's files are read with ``pread`` (``memory_map=True``: mapped, no copy
    of the encoded bytes, but a file that shrinks under its map faults), and
    zstd chunks are decoded with one reused libzstd context per thread, on raw
    addresses, straight into the batch where a chunk is one whole piece.
    """

    # Batches are finished (cast, normalized, augmented) as they are assembled in a
    # ring of reused buffers and handed to torch as they are (cpu/epoch.py).
    traits = CPU_TRAITS
    device = "cpu"
    whole_window = False  # input and target frames assembled apart
    tasks_per_thread = 4

    def __init__(
        self,
        group,
        store_name: str,
        num_threads: int | None = None,
        partial_decode: bool = True,
        *,
        max_gap: int = 64 * 1024,
        source: ByteSource | None = None,
        memory_map: bool = False,
    ) -> None:
        self.num_threads = num_threads or os.cpu_count() or 1
        self.partial_decode = partial_decode
        self._store = store_name
        self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="zarrdali-io")
        if source is None:
            source = make_source(group, store_name, map_fn=self._pool.map)
        # Local stores: maps (or pread) in the decode threads. Remote: one concurrent
        # fetch per batch.
        self.source = source
        self.remote = source.remote
        self.reader = PosixReader(store_name, max_gap=max_gap)
        self.maps = MappedFiles() if memory_map and not self.remote else None
        self.zstd = ZstdContexts.create()
        self.decoder = NumcodecsDecoder(store_name)
        self.fallback = ZarrPythonChunkSource(group, store_name)
        self._locators = Locators(store_name, map_fn=self._pool.map, source=self.source)

    def locator(self, layouts: Sequence[ArrayLayout]) -> ChunkLocator:
        """The (cached) locator of these layouts' chunks."""
        return self._locators.get(layouts)

    def lease(self, layouts: Sequence[ArrayLayout], locations: ChunkLocations) -> MapLease | None:
        """The maps of the batch's files, held until released (None: nothing is mapped)."""
        if self.maps is None or not len(locations.paths):
            return None
        try:
            return self.maps.lease(locations.paths.tolist())
        except OSError as err:
            f = int(np.flatnonzero(locations.paths == err.filename)[0]) if err.filename else 0
            raise ChunkError(
                f"cannot open {err.filename}: {err.strerror or err}",
                store=self._store,
                array=layouts[locations.file_var[f]].name,
                key=locations.keys[f],
            ) from err

    def _check_ranges(
        self,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        chunks: np.ndarray,
        size: np.ndarray,
    ) -> None:
        """A chunk past the end of its (mapped) file is a named error, not a fault."""
        file = locations.file[chunks]
        offset, nbytes = locations.offset[chunks], locations.nbytes[chunks]
        short = np.flatnonzero(~within(offset, nbytes, size[file]))  # no sum that wraps
        if len(short):
            i = chunks[short[0]]
            f = int(locations.file[i])
            start = int(locations.offset[i])
            raise ChunkError(
                f"file is truncated: wanted {int(nbytes[short[0]])} bytes at {start}, "
                f"it has {int(size[f])}",
                store=self._store,
                array=layouts[locations.file_var[f]].name,
                key=locations.keys[f],
            )

    def describe(
        self,
        layouts: Sequence[ArrayLayout],
        plan: BatchPlan,
        locations: ChunkLocations,
        lease: MapLease | None = None,
        *,
        dtype: np.dtype | None = None,
        in_place: bool = True,
    ) -> BatchWork:
        """Everything the batch's read/decode/copy loops need, without I/O.

        ``dtype`` is the batch's (default: :func:`batch_dtype`); ``in_place=False``
        copies every piece from scratch (pieces that move: flips, quarter turns).
        """
        dtype = batch_dtype(layouts) if dtype is None else np.dtype(dtype)
        on_map = np.zeros(plan.n_chunks, dtype=bool)
        if lease is not None:
            on_map = locations.present & lease.mapped[np.maximum(locations.file, 0)]
        if self.remote:  # one "read" per chunk here: the source coalesces them itself
            chunk_of = np.flatnonzero(locations.present)
            start = locations.offset[chunk_of]
            reads = CoalescedReads(
                order=np.arange(len(chunk_of)),
                bounds=np.arange(len(chunk_of) + 1),
                file=locations.file[chunk_of],
                start=start,
                end=start + locations.nbytes[chunk_of],
            )
        else:
            reads, chunk_of = self.reader.reads(locations, ~on_map)
        order, bounds = plan.piece_order
        pieces = plan.pieces[order]
        needed = (
            partial_decode_prefixes(layouts, plan)
            if self.partial_decode
            else np.full(plan.n_chunks, -1, dtype=np.int64)
        )
        direct = decodes_in_place(layouts, plan, pieces, bounds, dtype) & (needed < 0)
        direct &= in_place
        mapped = np.flatnonzero(on_map)
        src = np.zeros(plan.n_chunks, dtype=np.int64)
        if len(mapped):
            self._check_ranges(layouts, locations, mapped, lease.size)
            mapped = mapped[np.lexsort((locations.offset[mapped], locations.file[mapped]))]
            src[mapped] = lease.base[locations.file[mapped]] + locations.offset[mapped]
        if self.zstd is not None and not self.remote:
            zstd = np.array(
                [
                    lay.fast_path and lay.codec.compressor == "zstd" and not lay.codec.has_crc32c
                    for lay in layouts
                ]
            )
            # From a map or from this thread's pread buffer: both are raw addresses.
            by_context = locations.present & zstd[plan.chunk_var] & (needed < 0)
        else:
            by_context = np.zeros(plan.n_chunks, dtype=bool)
        in_place_out, in_place_offset = _in_place_offsets(
            plan, dtype.itemsize, pieces, bounds, direct & by_context
        )
        return BatchWork(
            locations=locations,
            read_file=reads.file.tolist(),
            read_start=reads.start.tolist(),
            read_nbytes=reads.nbytes.tolist(),
            read_bounds=reads.bounds.tolist(),
            read_members=chunk_of.tolist(),
            unread=np.flatnonzero(~locations.present).tolist(),
            chunk_var=plan.chunk_var.tolist(),
            chunk_coords=plan.chunk_coords.tolist(),
            offset=locations.offset.tolist(),
            nbytes=locations.nbytes.tolist(),
            needed=needed.tolist(),
            piece_bounds=bounds.tolist(),
            pieces=pieces.tolist(),
            direct=direct.tolist(),
            mapped=mapped.tolist(),
            file=locations.file.tolist(),
            src=src.tolist(),
            by_context=by_context.tolist(),
            in_place_out=in_place_out,
            in_place_offset=in_place_offset,
        )

    def load_batch(
        self,
        layouts: Sequence[ArrayLayout],
        plan: BatchPlan,
        *,
        out: Sequence[np.ndarray] | None = None,
        finish: Finish | None = None,
        rows: np.ndarray | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The window, or (input frames, target frames) if the plan splits it.

        ``out`` (one array per output of the plan, e.g. slots of a ring of reused
        buffers) is assembled in place of new arrays. With ``finish`` the batch
        is float32, normalized and augmented as it is assembled (see finish.py).
        With ``rows`` the plan is part of a batch: its sample ``b`` goes to row
        ``rows[b]`` of ``out`` (the whole batch; ``finish`` is the batch's too).
        """
        locations = self.locator(layouts).locate(plan)
        dtype = np.dtype(np.float32) if finish is not None else batch_dtype(layouts)
        if out is None:
            if rows is not None:
                raise ValueError("rows need the batch's out arrays")
            outs = [np.empty(shape, dtype=dtype) for shape in plan.out_shapes]
        else:
            outs = list(out)
            n = len(outs[0]) if rows is None else None
            for o, shape in zip(outs, plan.out_shapes, strict=True):
                same = o.shape[1:] == tuple(shape[1:]) and (n is None or len(o) == shape[0])
                if not same or o.dtype != dtype or not o.flags.c_contiguous:
                    raise ValueError(
                        f"out arrays must be C-contiguous {dtype} of shapes "
                        f"{plan.out_shapes}, got {o.dtype} {o.shape}"
                    )
        if rows is not None:  # the plan's samples land in their rows of the batch
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) != plan.out_shape[0] or (len(rows) and rows.max() >= len(outs[0])):
                raise ValueError(f"rows {rows} do not fit a batch of {len(outs[0])}")
            b = PIECE_DST.start
            plan.pieces[:, b] = rows[plan.pieces[:, b]]
        if finish is not None and not (finish.changes_values or finish.flags is not None):
            finish = None  # a cast alone: numpy's assignment does it
        lease = self.lease(layouts, locations)
        try:
            in_place = finish is None or not finish.moves
            work = self.describe(layouts, plan, locations, lease, dtype=dtype, in_place=in_place)
            self._run(layouts, work, outs, lease, finish)
        finally:
            if lease is not None:
                lease.release()
        return outs[0] if plan.frame_split is None else tuple(outs)

    def _run(
        self,
        layouts: Sequence[ArrayLayout],
        work: BatchWork,
        outs: list[np.ndarray],
        lease: MapLease | None,
        finish: Finish | None = None,
    ) -> None:
        """Read, decode and copy every chunk of ``work`` into ``outs`` (finished
        as ``finish`` says, if given)."""
        locations = work.locations
        # a decoded chunk as (t, level, y, x): a reshape, or a transposed view of
        # a chunk stored in another order
        view4 = [
            layout.chunk_view4 if layout.transposed else partial(np.reshape, shape=shape4)
            for layout, shape4 in zip(layouts, map(chunk_shape4, layouts), strict=True)
        ]
        stored = [  # zarr-python decodes arrays without a codec of ours in native order
            layout.codec.stored_dtype(layout.dtype) if layout.codec else layout.dtype
            for layout in layouts
        ]
        chunk_nbytes = [layout.chunk_nbytes for layout in layouts]
        # chunks decoded straight into the batch are normalized (and checked for
        # missing values) there, in cache
        in_place_finish = finish is not None and finish.changes_values

        def scatter(i: int, decoded: np.ndarray) -> None:
            chunk = view4[work.chunk_var[i]](decoded)
            pieces = work.pieces[work.piece_bounds[i] : work.piece_bounds[i + 1]]
            if finish is not None:
                for o, t, sl, sy, sx, b, f, c, dy, dx, nl, ny, nx in pieces:
                    src = chunk[t, sl : sl + nl, sy : sy + ny, sx : sx + nx]
                    finish.place(outs[o], b, f, c, dy, dx, src, o)
                return
            for o, t, sl, sy, sx, b, f, c, dy, dx, nl, ny, nx in pieces:
                outs[o][b, f, c : c + nl, dy : dy + ny, dx : dx + nx] = chunk[
                    t, sl : sl + nl, sy : sy + ny, sx : sx + nx
                ]

        def finish_in_place(i: int) -> None:
            """Normalize chunk ``i``, decoded straight into the batch, while in cache."""
            o, _, _, _, _, b, f, c, dy, dx, nl, ny, nx = work.pieces[work.piece_bounds[i]]
            region = outs[o][b, f, c : c + nl, dy : dy + ny, dx : dx + nx]
            finish.finish_in_place(o, b, f, c, dy, dx, region)

        def decode(i: int, data) -> None:
            layout, coords = layouts[work.chunk_var[i]], work.chunk_coords[i]
            if work.direct[i]:  # no scratch, no copy: decode into the batch
                o, _, _, _, _, b, f, c, dy, dx, nl, ny, nx = work.pieces[work.piece_bounds[i]]
                target = outs[o][b, f, c : c + nl, dy : dy + ny, dx : dx + nx]
                self.decoder.decode(layout, coords, data, out=target)
                if in_place_finish:
                    finish.finish_in_place(o, b, f, c, dy, dx, target)
                return
            needed = work.needed[i]
            decoded = self.decoder.decode(
                layout, coords, data, needed=None if needed < 0 else needed
            )
            scatter(i, decoded)

        def frame_error(i: int, why: str) -> ChunkError:
            layout = layouts[work.chunk_var[i]]
            return ChunkError(
                f"cannot decode zstd chunk: {why}",
                store=self._store,
                array=layout.name,
                key=describe_chunk(layout, work.chunk_coords[i]),
            )

        def by_context() -> Callable[[int, int], None]:
            """``decode(i, src)``: zstd chunk ``i`` at address ``src`` through this
            thread's context (into the batch, or into scratch then copied)."""
            zstd = self.zstd
            ctx = zstd.context()
            scratch = self.decoder.scratch_bytes(max(chunk_nbytes))
            address = scratch.ctypes.data
            views = [scratch[:n].view(d) for n, d in zip(chunk_nbytes, stored, strict=True)]

            def decode_at(i: int, src: int) -> None:
                v, into = work.chunk_var[i], dst[i]
                try:
                    zstd.decompress_exactly(
                        ctx, into or address, chunk_nbytes[v], src, work.nbytes[i]
                    )
                except ZstdFrameError as err:
                    raise frame_error(i, str(err)) from None
                if not into:
                    scatter(i, views[v])
                elif in_place_finish:
                    finish_in_place(i)

            return decode_at

        def run_mapped(chunks: list[int]) -> None:
            """Chunks of mapped files: zstd by context on the map's addresses; other
            codecs through the numcodecs decoder on a view of the map."""
            decode_at = by_context() if uses_context else None
            for i in chunks:
                if work.by_context[i]:
                    decode_at(i, work.src[i])
                else:
                    lo = work.offset[i]
                    decode(i, lease.view(work.file[i])[lo : lo + work.nbytes[i]])

        def run_reads(rs: range) -> None:
            """Coalesced ``pread`` s into this thread's buffer, each chunk decoded from
            there (zstd by context on its address)."""
            decode_at = by_context() if uses_context else None
            for r in rs:
                f, start = work.read_file[r], work.read_start[r]
                array = layouts[locations.file_var[f]].name
                buf = self.reader.pread(
                    locations.paths[f], start, work.read_nbytes[r], array, locations.keys[f]
                )
                base = self.reader.address() - start if decode_at is not None else 0
                for i in work.read_members[work.read_bounds[r] : work.read_bounds[r + 1]]:
                    if work.by_context[i]:
                        decode_at(i, base + work.offset[i])
                    else:
                        lo = work.offset[i] - start
                        decode(i, buf[lo : lo + work.nbytes[i]])

        def run_fetched(ks: list[int], buffers: list) -> None:
            for k, data in zip(ks, buffers, strict=True):  # None: a chunk never written
                decode(work.read_members[k], data)

        def run_unread(chunks: list[int]) -> None:
            """Missing chunks (fill value) and chunks zarr-python reads."""
            for i in chunks:
                layout = layouts[work.chunk_var[i]]
                if locations.fast[i]:
                    decoded = self.decoder.decode(layout, work.chunk_coords[i], None)
                else:
                    natural = natural_coords(layout, work.chunk_coords[i])
                    decoded = self.fallback.read_decoded(layout, natural)
                scatter(i, decoded)

        unread, mapped, n_reads = work.unread, work.mapped, len(work.read_file)
        if self.remote:  # one concurrent fetch; each response decoded as soon as it is in
            futures: list = [self._pool.submit(run_unread, unread)]

            def ready(ks: list[int], buffers: list) -> None:  # on the fetching thread
                futures.append(self._pool.submit(run_fetched, ks, buffers))

            try:
                self.fetch(layouts, locations, work.read_members, on_ready=ready)
            finally:
                finish_all(futures)
            return
        uses_context = any(work.by_context)
        # Where chunks decoded in place go (0: into scratch, then copied)
        bases = np.array([out.ctypes.data for out in outs], dtype=np.int64)
        offset = work.in_place_offset
        dst = np.where(offset >= 0, bases[work.in_place_out] + offset, 0).tolist()
        # A few tasks per thread, not one per chunk: small inner chunks decode in
        # tens of microseconds, comparable to the executor's own overhead.
        n_tasks = max(
            1, min(len(mapped) + n_reads + len(unread), self.num_threads * self.tasks_per_thread)
        )
        tasks = [
            partial(run, part)
            for k in range(n_tasks)
            for run, part in (
                (run_mapped, mapped[k::n_tasks]),
                (run_reads, range(k, n_reads, n_tasks)),
                (run_unread, unread[k::n_tasks]),
            )
            if len(part)
        ]
        if self.num_threads == 1:  # e.g. in a worker process: no hand-offs
            for task in tasks:
                task()
            return
        finish_all([self._pool.submit(task) for task in tasks])

    def hold_static(self, static: Any) -> None:
        """Nothing: the CPU path cuts static tiles from the host copy."""
        return None

    def open_epoch(self, request: EpochRequest, run: EpochRun) -> None:
        """A ring of host buffers fed by threads or worker processes (cpu/epoch.py)."""
        from zarrdali.cpu.epoch import open_host_epoch

        open_host_epoch(self, request, run)

    def fetch(
        self,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        chunks: list[int],
        on_ready: OnReady | None = None,
    ) -> list:
        """The stored bytes of ``chunks`` from the remote source, fetched concurrently
        (``on_ready(positions in chunks, buffers)`` as responses come in)."""
        pick = np.asarray(chunks, dtype=np.int64)
        try:
            return self.source.read_chunks(
                locations.paths,
                locations.file[pick],
                locations.offset[pick],
                locations.nbytes[pick],
                on_ready=on_ready,
            )
        except ObjectReadError as err:
            f = int(np.flatnonzero(locations.paths == err.path)[0])
            raise ChunkError(
                err.reason,
                store=self._store,
                array=layouts[locations.file_var[f]].name,
                key=locations.keys[f],
            ) from err

    def probe(self, layouts: Sequence[ArrayLayout]) -> None:
        """Read the first storage object's row of every variable (its shard index, or
        its size; nothing for a remote unsharded chunk): access errors and broken
        shards surface before training starts. The rows stay cached."""
        from zarrdali.batch.plan import plan_batch

        plan = plan_batch(
            layouts, np.zeros((1, 3), dtype=np.int64), n_frames=1, frame_step=1, tile_hw=(1, 1)
        )
        self.locator(layouts).locate(plan)

    def stats(self) -> dict[str, int]:
        """Requests, bytes and in-flight depth of the remote source (empty for local)."""
        return self.source.stats()

    def close(self) -> None:
        """Stop the threads, then free what they used: maps, zstd contexts, files."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.maps is not None:
            self.maps.close()
        if self.zstd is not None:
            self.zstd.close()
        self.reader.close()
        self.source.close()
