"""CPU backend: ``os.pread`` in a thread pool, numcodecs, numpy.

Both reads and decodes release the GIL, so a thread pool the size of the core
count keeps every core busy without worker processes.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np

from ..chunkplan import BatchReadPlan, ChunkRef
from ..errors import ChunkError
from ..store import ArrayLayout
from .base import batch_dtype
from .fallback import ZarrPythonChunkSource
from .ranges import coalesce

_EMPTY = 2**64 - 1  # shard index entry of an inner chunk that was never written


def _check_crc32c(data: memoryview, what: str, layout: ArrayLayout, store: str, key: str):
    body, stored = data[:-4], int.from_bytes(data[-4:], "little")
    if crc32c.crc32c(body) != stored:
        raise ChunkError(f"crc32c checksum mismatch in {what}", store=store,
                         array=layout.name, key=key)
    return body


class PosixChunkReader:
    """Reads encoded chunks from a local store with ``os.pread``.

    Shard indexes are read once per shard file and cached; the inner chunks a
    batch needs from one shard are read as coalesced byte ranges.
    """

    def __init__(self, pool: ThreadPoolExecutor, store_name: str, *, max_gap: int = 64 * 1024,
                 index_cache_size: int = 8192) -> None:
        self._pool = pool
        self._store = store_name
        self.max_gap = max_gap
        self._index_cache: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._index_cache_size = index_cache_size
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.read_calls = 0

    def read(self, layouts: Sequence[ArrayLayout], chunks: Sequence[ChunkRef]) -> list:
        by_file: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i, c in enumerate(chunks):
            by_file[(c.var, layouts[c.var].storage_key(c.coords))].append(i)
        out: list = [None] * len(chunks)

        def read_file(item: tuple[tuple[int, str], list[int]]) -> None:
            (var, key), members = item
            layout = layouts[var]
            path = os.path.join(layout.directory, key)
            if layout.shard is None:
                out[members[0]] = self._read_whole(path, layout, key)
            else:
                parts = self._read_inner(path, layout, key, [chunks[i] for i in members])
                for i, part in zip(members, parts, strict=True):
                    out[i] = part

        list(self._pool.map(read_file, by_file.items()))
        return out

    def _error(self, msg: str, layout: ArrayLayout, key: str, err: Exception) -> ChunkError:
        e = ChunkError(f"{msg}: {err}", store=self._store, array=layout.name, key=key)
        e.__cause__ = err
        return e

    def _read_whole(self, path: str, layout: ArrayLayout, key: str) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
        except OSError as err:
            raise self._error("cannot read chunk", layout, key, err) from err
        finally:
            os.close(fd)
        self._count(len(data))
        return data

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.read_calls += 1

    def _shard_index(self, fd: int, path: str, layout: ArrayLayout, key: str) -> np.ndarray:
        with self._lock:
            if path in self._index_cache:
                self._index_cache.move_to_end(path)
                return self._index_cache[path]
        shard = layout.shard
        size = os.fstat(fd).st_size
        n = shard.index_nbytes
        if size < n:
            raise ChunkError(f"shard file is {size} bytes, smaller than its {n}-byte index",
                             store=self._store, array=layout.name, key=key)
        raw = memoryview(os.pread(fd, n, size - n if shard.index_location == "end" else 0))
        self._count(n)
        if shard.index_has_crc32c:
            raw = _check_crc32c(raw, "the shard index", layout, self._store, key)
        index = np.frombuffer(raw, dtype=np.dtype("u8").newbyteorder(shard.index_byteorder))
        index = index.reshape((*shard.chunks_per_shard, 2)).astype(np.uint64)
        with self._lock:
            self._index_cache[path] = index
            if len(self._index_cache) > self._index_cache_size:
                self._index_cache.popitem(last=False)
        return index

    def _read_inner(self, path: str, layout: ArrayLayout, key: str,
                    chunks: list[ChunkRef]) -> list:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return [None] * len(chunks)  # whole shard missing: all fill value
        try:
            index = self._shard_index(fd, path, layout, key)
            cps = layout.shard.chunks_per_shard
            wanted: list[tuple[int, int]] = []
            slots: list[int] = []
            parts: list = [None] * len(chunks)
            for i, c in enumerate(chunks):
                local = tuple(x % n for x, n in zip(c.coords, cps, strict=True))
                off, nbytes = (int(v) for v in index[local])
                if off == _EMPTY and nbytes == _EMPTY:
                    continue  # inner chunk never written: fill value
                wanted.append((off, nbytes))
                slots.append(i)
            for read in coalesce(wanted, self.max_gap):
                buf = memoryview(os.pread(fd, read.nbytes, read.start))
                self._count(len(buf))
                if len(buf) < read.nbytes:
                    raise ChunkError(
                        f"shard is truncated: wanted bytes {read.start}..{read.end}, "
                        f"got {len(buf)}", store=self._store, array=layout.name, key=key)
                for m in read.members:
                    off, nbytes = wanted[m]
                    parts[slots[m]] = buf[off - read.start : off - read.start + nbytes]
            return parts
        except OSError as err:
            raise self._error("cannot read shard", layout, key, err) from err
        finally:
            os.close(fd)


class NumcodecsDecoder:
    """Decodes chunks with numcodecs in the thread pool."""

    def __init__(self, pool: ThreadPoolExecutor, store_name: str) -> None:
        self._pool = pool
        self._store = store_name

    def decode_one(self, layout: ArrayLayout, chunk: ChunkRef, data) -> np.ndarray:
        if data is None:
            return np.full(layout.chunk_shape, layout.fill_value, dtype=layout.dtype)
        codec = layout.codec
        key = layout.describe_chunk(chunk.coords)
        try:
            if codec.has_crc32c:
                data = _check_crc32c(memoryview(data), "the chunk", layout, self._store, key)
            decoder = codec.numcodecs_decoder()
            raw = data if decoder is None else decoder.decode(data)
            arr = np.frombuffer(raw, dtype=codec.stored_dtype(layout.dtype))
            return arr.reshape(layout.chunk_shape)
        except ChunkError:
            raise
        except Exception as err:  # numcodecs raises RuntimeError/ValueError of its own
            raise ChunkError(f"cannot decode {codec.compressor} chunk: {err}",
                             store=self._store, array=layout.name, key=key) from err

    def decode(self, layouts: Sequence[ArrayLayout], chunks: Sequence[ChunkRef],
               encoded: Sequence) -> list[np.ndarray]:
        return list(self._pool.map(
            lambda i: self.decode_one(layouts[chunks[i].var], chunks[i], encoded[i]),
            range(len(chunks)),
        ))


class NumpyAssembler:
    """Copies each sample's tile pieces into the batch buffer (byte-swapping on the way)."""

    def assemble(self, plan: BatchReadPlan, decoded: Sequence[np.ndarray],
                 dtype: np.dtype) -> np.ndarray:
        out = np.empty(plan.out_shape, dtype=dtype)
        for copy in plan.copies:
            out[copy.dst] = decoded[copy.chunk][copy.src]
        return out


class CpuBackend:
    """Read → decode → assemble on the host. Thread count defaults to the cores."""

    device = "cpu"

    def __init__(self, group, store_name: str, num_threads: int | None = None) -> None:
        self.num_threads = num_threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="zarrdali-io")
        self.reader = PosixChunkReader(self._pool, store_name)
        self.decoder = NumcodecsDecoder(self._pool, store_name)
        self.assembler = NumpyAssembler()
        self.fallback = ZarrPythonChunkSource(group, store_name)

    def load_batch(self, layouts: Sequence[ArrayLayout], plan: BatchReadPlan) -> np.ndarray:
        fast = [i for i, c in enumerate(plan.chunks) if layouts[c.var].fast_path]
        slow = [i for i, c in enumerate(plan.chunks) if not layouts[c.var].fast_path]
        decoded: list = [None] * len(plan.chunks)
        if fast:
            refs = [plan.chunks[i] for i in fast]
            encoded = self.reader.read(layouts, refs)
            for i, arr in zip(fast, self.decoder.decode(layouts, refs, encoded), strict=True):
                decoded[i] = arr
        if slow:
            refs = [plan.chunks[i] for i in slow]
            for i, arr in zip(slow, self.fallback.read_many(layouts, refs), strict=True):
                decoded[i] = arr
        return self.assembler.assemble(plan, decoded, batch_dtype(layouts))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
