"""Where a store's bytes come from: local files, or an object store over the network.

The locator asks a :class:`ByteSource` for the shard indexes (and chunk sizes)
of the storage objects a batch touches for the first time; the CPU backend asks
a remote source for the bytes of all chunks of a batch. Every call covers a
whole batch, so a remote source fetches everything at once with many requests
in flight (bounded by ``max_in_flight``), each byte range coalesced across
neighbouring inner chunks of a shard. Local stores keep the CPU backend's own
``os.pread`` path (:class:`~zarrdali.backends.cpu.PosixReader`); the
:class:`LocalSource` here only reads their shard indexes and sizes.

Objects are named by *paths*: a file path for a local store, a key relative to
the store's root for a remote one (:meth:`ByteSource.path_of`).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import StoreAccessError, ZarrDaliError
from ..remote import is_access_error, is_transient, short_message
from .cache import DEFAULT_CACHE_BYTES, DiskCache
from .ranges import coalesce_arrays

MISSING = -1  # size of an object that does not exist
# Ranges of one object less than this apart share a request. Object stores bill and
# throttle per request and answer each after a round trip, so reading up to 1 MiB
# nobody asked for beats a request more (obstore's own default). Measured against
# a local S3 server (benchmarks/remote_bench.py, 5 ms per request): 64 KiB, 17
# samples/s; 256 KiB, 33; 1 MiB, 60.
REMOTE_MAX_GAP = 1 << 20
WHOLE = -2  # size not known (remote unsharded chunk): read the whole object

Buffer = Any  # bytes-like: memoryview, bytes, obstore.Bytes
OnReady = Callable[[list[int], list[Any]], None]  # (chunk positions, their buffers)


class ObjectReadError(ZarrDaliError, OSError):
    """Reading one object failed; callers name its array and key (``ChunkError``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


class ByteSource(Protocol):
    name: str
    remote: bool

    def path_of(self, directory: os.PathLike | None, key_prefix: str | None, key: str) -> str:
        """Where the object ``key`` of an array is (file path or store key)."""

    def chunk_sizes(self, paths: Sequence[str]) -> list[int]:
        """Size of each unsharded chunk object: bytes, ``MISSING`` or ``WHOLE`` (unknown)."""

    def read_indexes(
        self, paths: Sequence[str], nbytes: int, at_end: bool
    ) -> list[tuple[Buffer, int] | None]:
        """Per shard: ``(index bytes, object size or -1 if unknown)``; None: no such object."""

    def read_chunks(
        self,
        paths: np.ndarray,
        file: np.ndarray,
        offset: np.ndarray,
        nbytes: np.ndarray,
        on_ready: OnReady | None = None,
    ) -> list[Buffer | None]:
        """Bytes of chunk ``i`` at ``offset[i]`` of object ``paths[file[i]]`` (all in one go).

        ``nbytes[i] == WHOLE`` reads the whole object, None when it does not exist.
        ``on_ready(chunks, buffers)`` is called as soon as those chunks' bytes are in
        (on the fetching thread: keep it short, e.g. hand the decoding to a pool).
        """

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class LocalSource:
    """Shard indexes and chunk sizes of a local store (``os.pread``, ``os.stat``).

    ``map_fn`` runs the reads (e.g. a thread pool's ``map``).
    """

    remote = False

    def __init__(self, name: str, map_fn: Callable[[Callable, Iterable], Iterable] = map) -> None:
        self.name = name
        self._map = map_fn

    def path_of(self, directory: os.PathLike | None, key_prefix: str | None, key: str) -> str:
        return os.path.join(directory, key)

    def chunk_sizes(self, paths: Sequence[str]) -> list[int]:
        def size(path: str) -> int:
            try:
                return os.stat(path).st_size
            except FileNotFoundError:
                return MISSING
            except OSError as err:
                raise ObjectReadError(path, f"cannot stat: {err}") from err

        return list(self._map(size, paths))

    def read_indexes(
        self, paths: Sequence[str], nbytes: int, at_end: bool
    ) -> list[tuple[Buffer, int] | None]:
        def read(path: str) -> tuple[bytes, int] | None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            except OSError as err:
                raise ObjectReadError(path, f"cannot read the shard index: {err}") from err
            try:
                size = os.fstat(fd).st_size
                if size < nbytes:
                    return b"", size
                return os.pread(fd, nbytes, size - nbytes if at_end else 0), size
            except OSError as err:
                raise ObjectReadError(path, f"cannot read the shard index: {err}") from err
            finally:
                os.close(fd)

        return list(self._map(read, paths))

    def read_chunks(
        self,
        paths: np.ndarray,
        file: np.ndarray,
        offset: np.ndarray,
        nbytes: np.ndarray,
        on_ready: OnReady | None = None,
    ) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        for f, start, n in zip(file.tolist(), offset.tolist(), nbytes.tolist(), strict=True):
            try:
                with open(paths[f], "rb") as fh:
                    fh.seek(start)
                    out.append(fh.read() if n == WHOLE else fh.read(n))
            except FileNotFoundError:
                if n != WHOLE:
                    raise ObjectReadError(paths[f], "file not found") from None
                out.append(None)
        if on_ready is not None:
            on_ready(list(range(len(out))), out)
        return out

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class RemoteSource:
    """Concurrent byte-range reads from an object store (the async engine).

    Subclasses implement one request: :meth:`_get_range`, :meth:`_get_whole`,
    :meth:`_get_index`. Requests run on zarr-python's event loop (the one that
    already serves the store's metadata), at most ``max_in_flight`` at a time
    per source. ``retries`` > 0 retries transient errors (429, 503 SlowDown, 5xx,
    dropped connections) here with exponential backoff and jitter; obstore
    retries in its own client instead. ``max_gap``: see ``REMOTE_MAX_GAP``.
    """

    remote = True

    def __init__(
        self,
        name: str,
        *,
        max_in_flight: int = 64,
        max_gap: int = REMOTE_MAX_GAP,
        retries: int = 0,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.name = name
        self.max_in_flight = max_in_flight
        self.max_gap = max_gap
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._semaphore: asyncio.Semaphore | None = None  # made on the loop that uses it
        self._in_flight = 0
        self._lock = threading.Lock()
        self.requests = self.bytes = self.retried = self.peak_in_flight = 0
        self.seconds = 0.0

    # -- the requests a subclass makes ------------------------------------------
    async def _get_range(self, path: str, start: int, nbytes: int) -> Buffer:
        raise NotImplementedError

    async def _get_whole(self, path: str) -> Buffer:
        raise NotImplementedError

    async def _get_index(self, path: str, nbytes: int, at_end: bool) -> tuple[Buffer, int]:
        raise NotImplementedError

    # -- ByteSource ------------------------------------------------------------
    def path_of(self, directory: os.PathLike | None, key_prefix: str | None, key: str) -> str:
        return f"{key_prefix}/{key}" if key_prefix else key

    def chunk_sizes(self, paths: Sequence[str]) -> list[int]:
        # Asking costs a request per chunk; reading the whole object finds out for free.
        return [WHOLE] * len(paths)

    def read_indexes(
        self, paths: Sequence[str], nbytes: int, at_end: bool
    ) -> list[tuple[Buffer, int] | None]:
        return self._run([(self._index_or_none, (path, nbytes, at_end)) for path in paths])

    def read_chunks(
        self,
        paths: np.ndarray,
        file: np.ndarray,
        offset: np.ndarray,
        nbytes: np.ndarray,
        on_ready: OnReady | None = None,
    ) -> list[Buffer | None]:
        out: list[Buffer | None] = [None] * len(file)
        whole = np.flatnonzero(nbytes == WHOLE)
        ranged = np.flatnonzero(nbytes != WHOLE)
        reads = coalesce_arrays(file[ranged], offset[ranged], nbytes[ranged], self.max_gap)
        members = ranged[reads.order]
        starts, offsets, sizes = reads.start.tolist(), offset.tolist(), nbytes.tolist()
        bounds = reads.bounds.tolist()

        def cut(r: int, data: Buffer) -> None:
            """Read ``r`` is in: its chunks' views, handed on at once."""
            buf, chunks = memoryview(data), members[bounds[r] : bounds[r + 1]].tolist()
            for i in chunks:
                lo = offsets[i] - starts[r]
                out[i] = buf[lo : lo + sizes[i]]
            if on_ready is not None:
                on_ready(chunks, [out[i] for i in chunks])

        def whole_in(i: int, data: Buffer | None) -> None:
            out[i] = None if data is None else memoryview(data)
            if on_ready is not None:
                on_ready([i], [out[i]])

        calls = [
            (self._then, (self._get_range_checked, (paths[f], start, end - start), cut, r))
            for r, (f, start, end) in enumerate(
                zip(reads.file.tolist(), starts, reads.end.tolist(), strict=True)
            )
        ]
        calls += [
            (self._then, (self._whole_or_none, (paths[f],), whole_in, i))
            for i, f in zip(whole.tolist(), file[whole].tolist(), strict=True)
        ]
        self._run(calls)
        return out

    def stats(self) -> dict[str, int]:
        """Requests made, bytes received, retries, the most requests in flight."""
        return {
            "requests": self.requests,
            "bytes": self.bytes,
            "retries": self.retried,
            "peak_in_flight": self.peak_in_flight,
            "max_in_flight": self.max_in_flight,
            "request_seconds_x1000": int(self.seconds * 1000),
        }

    def close(self) -> None:
        pass

    # -- the engine ---------------------------------------------------------------
    def _run(self, calls: list[tuple[Callable, tuple]]) -> list[Any]:
        """Run ``fn(*args)`` coroutines concurrently; results in order; first error raised."""
        if not calls:
            return []
        from zarr.core.sync import sync

        t0 = time.perf_counter()
        results = sync(self._gather(calls))
        with self._lock:
            self.seconds += time.perf_counter() - t0
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _gather(self, calls: list[tuple[Callable, tuple]]) -> list[Any]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_in_flight)
        return await asyncio.gather(*(fn(*args) for fn, args in calls), return_exceptions=True)

    @staticmethod
    async def _then(fn: Callable, args: tuple, callback: Callable, key: int) -> None:
        callback(key, await fn(*args))

    async def _request(self, path: str, make: Callable[[], Any]) -> Any:
        """One request under the in-flight bound, retried when transient."""
        attempt = 0
        while True:
            async with self._semaphore:
                self._in_flight += 1  # only touched on the loop's thread
                self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
                self.requests += 1
                try:
                    return await make()
                except FileNotFoundError:
                    raise
                except Exception as err:
                    if is_access_error(err):
                        raise StoreAccessError(
                            f"access to store {self.name!r} was refused reading {path!r}: "
                            f"{short_message(err)}. Check the credentials (storage_options or "
                            f"the environment) and the permissions on the bucket."
                        ) from err
                    if attempt >= self.retries or not is_transient(err):
                        raise ObjectReadError(path, short_message(err)) from err
                finally:
                    self._in_flight -= 1
            attempt += 1
            self.retried += 1
            delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))  # jitter

    async def _get_range_checked(self, path: str, start: int, nbytes: int) -> Buffer:
        try:
            data = await self._request(path, lambda: self._get_range(path, start, nbytes))
        except FileNotFoundError as err:
            raise ObjectReadError(path, "object not found (deleted while reading?)") from err
        got = memoryview(data).nbytes
        self.bytes += got
        if got != nbytes:
            raise ObjectReadError(
                path, f"object is truncated: wanted {nbytes} bytes at {start}, got {got}"
            )
        return data

    async def _whole_or_none(self, path: str) -> Buffer | None:
        try:
            data = await self._request(path, lambda: self._get_whole(path))
        except FileNotFoundError:
            return None  # a chunk never written: the fill value
        self.bytes += memoryview(data).nbytes
        return data

    async def _index_or_none(self, path: str, nbytes: int, at_end: bool):
        try:
            raw, size = await self._request(path, lambda: self._get_index(path, nbytes, at_end))
        except FileNotFoundError:
            return None  # a shard never written: every inner chunk is the fill value
        self.bytes += memoryview(raw).nbytes
        return raw, size


class ObstoreSource(RemoteSource):
    """Reads through an obstore store (S3, GCS, Azure, HTTP): Rust client, retries in it."""

    def __init__(self, store: Any, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.store = store

    async def _get_range(self, path: str, start: int, nbytes: int) -> Buffer:
        import obstore

        return await obstore.get_range_async(self.store, path, start=start, length=nbytes)

    async def _get_whole(self, path: str) -> Buffer:
        import obstore

        result = await obstore.get_async(self.store, path)
        return await result.bytes_async()

    async def _get_index(self, path: str, nbytes: int, at_end: bool) -> tuple[Buffer, int]:
        import obstore

        want = {"suffix": nbytes} if at_end else (0, nbytes)
        try:
            result = await obstore.get_async(self.store, path, options={"range": want})
        except obstore.exceptions.NotSupportedError:  # no suffix requests (Azure): ask the size
            size = (await obstore.head_async(self.store, path))["size"]
            start = max(0, size - nbytes)
            raw = await obstore.get_range_async(self.store, path, start=start, end=size)
            return raw, size
        return await result.bytes_async(), int(result.meta["size"])


class ZarrStoreSource(RemoteSource):
    """Reads through any zarr ``Store`` (fsspec-backed, Icechunk, ...): its async
    ``get`` with byte ranges, retried here on transient errors."""

    def __init__(self, store: Any, name: str, *, retries: int = 8, **kwargs: Any) -> None:
        super().__init__(name, retries=retries, **kwargs)
        self.store = store

    async def _get(self, path: str, byte_range: Any) -> Buffer:
        from zarr.core.buffer import default_buffer_prototype

        buf = await self.store.get(path, default_buffer_prototype(), byte_range=byte_range)
        if buf is None:
            raise FileNotFoundError(path)
        return buf.as_numpy_array()

    async def _get_range(self, path: str, start: int, nbytes: int) -> Buffer:
        from zarr.abc.store import RangeByteRequest

        return await self._get(path, RangeByteRequest(start, start + nbytes))

    async def _get_whole(self, path: str) -> Buffer:
        return await self._get(path, None)

    async def _get_index(self, path: str, nbytes: int, at_end: bool) -> tuple[Buffer, int]:
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        request = SuffixByteRequest(nbytes) if at_end else RangeByteRequest(0, nbytes)
        return await self._get(path, request), -1  # size unknown: short reads are caught later


class CachedSource:
    """A remote source behind a :class:`DiskCache`: chunks and shard indexes that
    were read once come from local files afterwards (any process, any rank)."""

    remote = True

    def __init__(self, inner: RemoteSource, cache: DiskCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name

    def path_of(self, directory: os.PathLike | None, key_prefix: str | None, key: str) -> str:
        return self.inner.path_of(directory, key_prefix, key)

    def chunk_sizes(self, paths: Sequence[str]) -> list[int]:
        return self.inner.chunk_sizes(paths)

    def read_indexes(
        self, paths: Sequence[str], nbytes: int, at_end: bool
    ) -> list[tuple[Buffer, int] | None]:
        tag = -1 if at_end else -3  # offsets no chunk has: index entries have their own names
        out: list[tuple[Buffer, int] | None] = []
        todo = []
        for k, path in enumerate(paths):
            hit = self.cache.get(path, tag, nbytes)
            if hit is None:
                todo.append(k)
                out.append(None)
            else:  # stored as the object size (8 bytes, -1 unknown), then the index
                out.append((hit[8:], int.from_bytes(hit[:8], "little", signed=True)))
        fetched = self.inner.read_indexes([paths[k] for k in todo], nbytes, at_end)
        for k, got in zip(todo, fetched, strict=True):
            out[k] = got
            if got is not None:
                raw, size = got
                entry = size.to_bytes(8, "little", signed=True) + bytes(raw)
                self.cache.put(paths[k], tag, nbytes, entry)
        return out

    def read_chunks(
        self,
        paths: np.ndarray,
        file: np.ndarray,
        offset: np.ndarray,
        nbytes: np.ndarray,
        on_ready: OnReady | None = None,
    ) -> list[Buffer | None]:
        out: list[Buffer | None] = [None] * len(file)
        files, offsets, sizes = file.tolist(), offset.tolist(), nbytes.tolist()
        todo, hits = [], []
        for i in range(len(files)):
            hit = self.cache.get(paths[files[i]], offsets[i], sizes[i])
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
                hits.append(i)
        if on_ready is not None and hits:
            on_ready(hits, [out[i] for i in hits])
        if not todo:
            return out

        def fetched(positions: list[int], buffers: list[Buffer | None]) -> None:
            chunks = [todo[k] for k in positions]
            for i, data in zip(chunks, buffers, strict=True):
                out[i] = data
                if data is not None:  # missing chunks are not cached: one may be written later
                    self.cache.put(paths[files[i]], offsets[i], sizes[i], data)
            if on_ready is not None:
                on_ready(chunks, buffers)

        pick = np.array(todo, dtype=np.int64)
        self.inner.read_chunks(paths, file[pick], offset[pick], nbytes[pick], on_ready=fetched)
        return out

    def stats(self) -> dict[str, int]:
        return {**self.inner.stats(), **self.cache.stats()}

    def close(self) -> None:
        self.inner.close()
        self.cache.close()


def cache_namespace(zstore: Any, name: str) -> str:
    """What cached bytes belong to: the store, and for Icechunk its snapshot."""
    session = getattr(zstore, "session", None)
    snapshot = getattr(session, "snapshot_id", None)
    return f"{name}@{snapshot}" if snapshot else name


def make_source(
    group: Any,
    name: str,
    *,
    max_in_flight: int = 64,
    cache_dir: str | os.PathLike | None = None,
    cache_bytes: int | None = None,
    map_fn: Callable[[Callable, Iterable], Iterable] = map,
) -> ByteSource:
    """The byte source of the store a zarr group was opened from."""
    from zarr.storage import LocalStore, ObjectStore

    zstore = group.store
    if isinstance(zstore, LocalStore):
        return LocalSource(name, map_fn)
    if isinstance(zstore, ObjectStore):
        source: RemoteSource = ObstoreSource(zstore.store, name, max_in_flight=max_in_flight)
    else:
        source = ZarrStoreSource(zstore, name, max_in_flight=max_in_flight)
    if cache_dir is None:
        return source
    budget = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
    return CachedSource(source, DiskCache(cache_dir, cache_namespace(zstore, name), budget))
