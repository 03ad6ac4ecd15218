"""CPU backend: ``os.pread`` in a thread pool, numcodecs, numpy.

Reads and decodes release the GIL, so a thread pool the size of the core count
keeps every core busy without worker processes. The three roles (reader,
decoder, assembler) run fused per chunk inside one task: bytes are read into a
thread-local buffer, decoded into thread-local scratch and scattered into the
batch at once, so no per-chunk memory is allocated and each chunk is touched
while it is still in cache. That is what lets the path run close to the
numcodecs decode ceiling.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import crc32c
import numpy as np

from ..chunkplan import BatchReadPlan, ChunkRef, TileCopy
from ..codecs import MIN_PARTIAL_SKIP
from ..errors import ChunkError
from ..store import ArrayLayout
from .base import batch_dtype
from .fallback import ZarrPythonChunkSource
from .ranges import coalesce

_EMPTY = 2**64 - 1  # shard index entry of an inner chunk that was never written


class _Scratch(threading.local):
    """Per-thread buffers, grown on demand and reused for every chunk."""

    def __init__(self) -> None:
        self.encoded = np.empty(0, dtype=np.uint8)
        self.decoded = np.empty(0, dtype=np.uint8)

    def encoded_buffer(self, nbytes: int) -> memoryview:
        if self.encoded.nbytes < nbytes:
            self.encoded = np.empty(nbytes, dtype=np.uint8)
        return memoryview(self.encoded)[:nbytes]

    def decoded_array(self, shape: tuple[int, ...], nbytes: int, dtype: np.dtype) -> np.ndarray:
        if self.decoded.nbytes < nbytes:
            self.decoded = np.empty(nbytes, dtype=np.uint8)
        return self.decoded[:nbytes].view(dtype).reshape(shape)


def _strip_crc32c(
    data: memoryview, what: str, layout: ArrayLayout, store: str, key: str
) -> memoryview:
    body, stored = data[:-4], int.from_bytes(data[-4:], "little")
    if crc32c.crc32c(body) != stored:
        raise ChunkError(
            f"crc32c checksum mismatch in {what}", store=store, array=layout.name, key=key
        )
    return body


# A read group performs its I/O when called and yields (position in the request
# list, encoded bytes or None for a missing chunk). The bytes are only valid
# until the next item is drawn: they may live in a reused buffer.
ReadGroup = Callable[[], Iterator[tuple[int, memoryview | None]]]


@dataclass(frozen=True)
class _InnerRange:
    position: int
    offset: int
    nbytes: int


class PosixChunkReader:
    """Reads encoded chunks from a local store with ``os.pread``.

    Shard indexes are read once per shard file and cached; the inner chunks a
    batch needs from one shard are read as coalesced byte ranges.
    """

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        store_name: str,
        *,
        max_gap: int = 64 * 1024,
        index_cache_size: int = 8192,
    ) -> None:
        self._pool = pool
        self._store = store_name
        self.max_gap = max_gap
        self._index_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._index_cache_size = index_cache_size
        self._lock = threading.Lock()
        self._scratch = _Scratch()

    # -- public API --------------------------------------------------------
    def groups(self, layouts: Sequence[ArrayLayout], chunks: Sequence[ChunkRef]) -> list[ReadGroup]:
        """Independent units of I/O covering ``chunks``; run them in any thread."""
        by_file: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
        for i, c in enumerate(chunks):
            by_file[(c.var, layouts[c.var].storage_coords(c.coords))].append(i)
        groups: list[ReadGroup] = []
        sharded = []
        for (v, coords), members in by_file.items():
            layout = layouts[v]
            key = layout.encode_key(coords)
            if layout.shard is None:
                groups.append(self._whole_file_group(layout, key, members[0]))
            else:
                sharded.append((layout, key, members))
        # Shard indexes first (in parallel, cached), then one group per coalesced read.
        indexes = list(self._pool.map(lambda item: self.shard_index(item[0], item[1]), sharded))
        for (layout, key, members), index in zip(sharded, indexes, strict=True):
            local = np.array([chunks[i].coords for i in members]) % layout.shard.chunks_per_shard
            groups += self._shard_groups(layout, key, index, members, local)
        return groups

    def read(
        self, layouts: Sequence[ArrayLayout], chunks: Sequence[ChunkRef]
    ) -> list[bytes | None]:
        """Encoded bytes of every chunk (copies), or None where a chunk is missing."""
        out: list[bytes | None] = [None] * len(chunks)

        def run(group: ReadGroup) -> None:
            for i, data in group():
                out[i] = None if data is None else bytes(data)

        list(self._pool.map(run, self.groups(layouts, chunks)))
        return out

    # -- internals ---------------------------------------------------------
    def _path(self, layout: ArrayLayout, key: str) -> str:
        return os.path.join(layout.directory, key)

    def _pread(
        self,
        fd: int,
        nbytes: int,
        offset: int,
        layout: ArrayLayout,
        key: str,
        buffer: memoryview | None = None,
    ) -> memoryview:
        buf = buffer if buffer is not None else memoryview(bytearray(nbytes))
        try:
            got = os.preadv(fd, [buf], offset)
        except OSError as err:
            raise ChunkError(
                f"cannot read bytes {offset}..{offset + nbytes}: {err}",
                store=self._store,
                array=layout.name,
                key=key,
            ) from err
        if got != nbytes:
            raise ChunkError(
                f"file is truncated: wanted {nbytes} bytes at {offset}, got {got}",
                store=self._store,
                array=layout.name,
                key=key,
            )
        return buf

    def _whole_file_group(self, layout: ArrayLayout, key: str, position: int) -> ReadGroup:
        def group() -> Iterator[tuple[int, memoryview | None]]:
            try:
                fd = os.open(self._path(layout, key), os.O_RDONLY)
            except FileNotFoundError:
                yield position, None  # missing chunk: fill value
                return
            try:
                size = os.fstat(fd).st_size
                buf = self._pread(fd, size, 0, layout, key, self._scratch.encoded_buffer(size))
            finally:
                os.close(fd)
            yield position, buf

        return group

    def shard_index(self, layout: ArrayLayout, key: str) -> np.ndarray | None:
        """The shard's ``[*chunks_per_shard, 2]`` (offset, nbytes) table; None: no shard."""
        path = self._path(layout, key)
        with self._lock:
            if path in self._index_cache:
                self._index_cache.move_to_end(path)
                return self._index_cache[path]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # whole shard missing: every inner chunk is fill value
        shard = layout.shard
        try:
            size = os.fstat(fd).st_size
            n = shard.index_nbytes
            if size < n:
                raise ChunkError(
                    f"shard file is {size} bytes, smaller than its {n}-byte index",
                    store=self._store,
                    array=layout.name,
                    key=key,
                )
            offset = size - n if shard.index_location == "end" else 0
            raw = self._pread(fd, n, offset, layout, key)
        finally:
            os.close(fd)
        if shard.index_has_crc32c:
            raw = _strip_crc32c(raw, "the shard index", layout, self._store, key)
        index = np.frombuffer(raw, dtype=np.dtype("u8").newbyteorder(shard.index_byteorder))
        index = index.reshape((*shard.chunks_per_shard, 2)).astype(np.uint64)
        with self._lock:
            self._index_cache[path] = index
            if len(self._index_cache) > self._index_cache_size:
                self._index_cache.popitem(last=False)
        return index

    def _shard_groups(
        self,
        layout: ArrayLayout,
        key: str,
        index: np.ndarray | None,
        positions: list[int],
        local: np.ndarray,
    ) -> list[ReadGroup]:
        """Groups reading the inner chunks at ``local`` coordinates of one shard."""
        if index is None:  # whole shard missing: every inner chunk is fill value
            return [lambda: iter([(p, None) for p in positions])]
        entries = index[tuple(local.T)]  # [n, 2] (offset, nbytes)
        empty = ((entries[:, 0] == _EMPTY) & (entries[:, 1] == _EMPTY)).tolist()
        missing = [p for p, e in zip(positions, empty, strict=True) if e]
        ranges = [
            _InnerRange(p, off, n)
            for p, (off, n), e in zip(positions, entries.tolist(), empty, strict=True)
            if not e
        ]
        groups: list[ReadGroup] = []
        if missing:  # inner chunks never written: fill value
            groups.append(lambda: iter([(p, None) for p in missing]))
        for read in coalesce([(r.offset, r.nbytes) for r in ranges], self.max_gap):
            parts = [ranges[m] for m in read.members]
            groups.append(self._coalesced_group(layout, key, read.start, read.end, parts))
        return groups

    def _coalesced_group(
        self, layout: ArrayLayout, key: str, start: int, end: int, parts: list[_InnerRange]
    ) -> ReadGroup:
        def group() -> Iterator[tuple[int, memoryview | None]]:
            fd = os.open(self._path(layout, key), os.O_RDONLY)
            try:
                buf = self._pread(
                    fd, end - start, start, layout, key, self._scratch.encoded_buffer(end - start)
                )
            finally:
                os.close(fd)
            for part in parts:
                yield part.position, buf[part.offset - start : part.offset - start + part.nbytes]

        return group


class NumcodecsDecoder:
    """Decodes chunk bytes with numcodecs' decompressors (thread-safe)."""

    def __init__(self, store_name: str) -> None:
        self._store = store_name
        self._scratch = _Scratch()

    def decode(
        self,
        layout: ArrayLayout,
        chunk: ChunkRef,
        data: memoryview | None,
        out: np.ndarray | None = None,
        needed: int | None = None,
    ) -> np.ndarray:
        """The decoded chunk (full chunk shape, stored byte order).

        Decodes into ``out`` when given, else into this thread's scratch (valid
        until the thread decodes its next chunk). A missing chunk is the fill value.
        With ``needed``, only the first ``needed`` bytes are guaranteed: streaming
        compressors stop there and the rest of the array is left as it was.
        """
        codec = layout.codec
        if out is None:
            dtype = codec.stored_dtype(layout.dtype)
            out = self._scratch.decoded_array(layout.chunk_shape, layout.chunk_nbytes, dtype)
        if data is None:
            out[...] = layout.fill_value
            return out
        try:
            if codec.has_crc32c:
                where = layout.describe_chunk(chunk.coords)
                data = _strip_crc32c(data, "the chunk", layout, self._store, where)
            codec.decode_into(data, out.reshape(-1).view(np.uint8), needed)
        except ChunkError:
            raise
        except Exception as err:  # numcodecs raises RuntimeError/ValueError of its own
            raise ChunkError(
                f"cannot decode {codec.compressor} chunk: {err}",
                store=self._store,
                array=layout.name,
                key=layout.describe_chunk(chunk.coords),
            ) from err
        return out


class NumpyAssembler:
    """Copies tile pieces of decoded chunks into the batch (byte-swapping on the way)."""

    @staticmethod
    def scatter(
        outputs: Sequence[np.ndarray], decoded: np.ndarray, copies: Sequence[TileCopy]
    ) -> None:
        for copy in copies:
            outputs[copy.out][copy.dst] = decoded[copy.src]


def _may_decode_partially(layout: ArrayLayout) -> bool:
    """Whether partial decoding could skip anything in this array's chunks."""
    return layout.fast_path and layout.codec.streams and layout.chunk_nbytes > MIN_PARTIAL_SKIP


def partial_decode_prefixes(
    layouts: Sequence[ArrayLayout], plan: BatchReadPlan
) -> list[int | None]:
    """Per chunk of ``plan``, the bytes partial decoding stops after (None: the whole chunk)."""
    if not any(_may_decode_partially(layout) for layout in layouts):
        return [None] * len(plan.chunks)  # spares working out the prefixes
    prefixes: list[int | None] = []
    for chunk, n in zip(plan.chunks, plan.needed_nbytes(layouts), strict=True):
        layout = layouts[chunk.var]
        partial = layout.fast_path and layout.codec.decodes_partially(n, layout.chunk_nbytes)
        prefixes.append(n if partial else None)
    return prefixes


def _run_all(work: Sequence[Callable[[], None]]) -> None:
    for item in work:
        item()


class CpuBackend:
    """Read → decode → assemble on the host. Thread count defaults to the cores.

    With ``partial_decode`` (the default) a chunk is decoded only up to the last
    byte the batch copies from it, where its compressor streams (zstd, gzip,
    none). Field-sized chunks read for small tiles then cost a fraction of a
    whole decode. ``partial_decode=False`` decodes every chunk whole, which also
    runs every compressor's own checks over the whole chunk.
    """

    device = "cpu"
    tasks_per_thread = 4

    def __init__(
        self,
        group,
        store_name: str,
        num_threads: int | None = None,
        partial_decode: bool = True,
    ) -> None:
        self.num_threads = num_threads or os.cpu_count() or 1
        self.partial_decode = partial_decode
        self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="zarrdali-io")
        self.reader = PosixChunkReader(self._pool, store_name)
        self.decoder = NumcodecsDecoder(store_name)
        self.assembler = NumpyAssembler()
        self.fallback = ZarrPythonChunkSource(group, store_name)

    def load_batch(
        self, layouts: Sequence[ArrayLayout], plan: BatchReadPlan
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The window, or (input frames, target frames) if the plan splits it."""
        dtype = batch_dtype(layouts)
        out = [np.empty(shape, dtype=dtype) for shape in plan.out_shapes]
        copies = plan.copies_by_chunk()
        needed = (
            partial_decode_prefixes(layouts, plan)
            if self.partial_decode
            else [None] * len(plan.chunks)
        )
        fast = [i for i, c in enumerate(plan.chunks) if layouts[c.var].fast_path]
        slow = [i for i, c in enumerate(plan.chunks) if not layouts[c.var].fast_path]

        def run_group(group: ReadGroup) -> None:
            for j, data in group():
                i = fast[j]
                chunk = plan.chunks[i]
                decoded = self.decoder.decode(layouts[chunk.var], chunk, data, needed=needed[i])
                self.assembler.scatter(out, decoded, copies[i])

        def run_fallback(i: int) -> None:
            chunk = plan.chunks[i]
            decoded = self.fallback.read_decoded(layouts[chunk.var], chunk)
            self.assembler.scatter(out, decoded, copies[i])

        work: list[Callable[[], None]] = [partial(run_fallback, i) for i in slow]
        if fast:
            groups = self.reader.groups(layouts, [plan.chunks[i] for i in fast])
            work += [partial(run_group, g) for g in groups]
        result = out[0] if plan.frame_split is None else tuple(out)
        if self.num_threads == 1:  # e.g. in a DALI worker process: no hand-offs
            _run_all(work)
            return result
        # A few tasks per thread, not one per chunk: small inner chunks decode in
        # tens of microseconds, comparable to the executor's own overhead.
        n_tasks = min(len(work), self.num_threads * self.tasks_per_thread)
        tasks = [self._pool.submit(_run_all, work[k::n_tasks]) for k in range(n_tasks)]
        for task in tasks:
            task.result()  # re-raises the first error with its traceback
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
