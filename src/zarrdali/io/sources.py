"""Where a store's bytes come from: local files, or an object store over the network.

The locator asks a :class:`ByteSource` for the shard indexes (and chunk sizes)
of the storage objects a batch touches for the first time; the CPU backend asks
a remote source for the bytes of all chunks of a batch. Every call covers a
whole batch, so a remote source fetches everything at once with many requests
in flight (bounded by ``max_in_flight``), each byte range coalesced across
neighbouring inner chunks of a shard. Local stores keep the CPU backend's own
``os.pread`` path (:class:`~zarrdali.batch.host.PosixReader`); the
:class:`LocalSource` here only reads their shard indexes and sizes.

Objects are named by *paths*: a file path for a local store, a key relative to
the store's root for a remote one (:meth:`ByteSource.path_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from zarrdali.errors import StoreAccessError, ZarrDaliError
from zarrdali.io.cache import DiskCache
from zarrdali.io.flow import AdaptiveLimit, LatencyBound, RequestPolicy
from zarrdali.io.ranges import coalesce_arrays
from zarrdali.io.remote import (
    connect_failure,
    describe_failure,
    is_access_error,
    is_throttling,
    is_transient,
)

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
    """Reading one object failed; callers name its array and key (``ChunkError``),
    or the store (:class:`~zarrdali.errors.StoreUnavailableError`).

    ``unavailable``: the store could not be reached or did not answer (rather
    than answering something wrong about this object)."""

    def __init__(self, path: str, reason: str, *, unavailable: bool = False) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason
        self.unavailable = unavailable


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


class RangesIgnored(Exception):
    """The server does not serve byte ranges (it answers with the whole object,
    or the client refuses its answer for that); ``whole``: that answer, if kept."""

    def __init__(self, whole: Buffer | None = None) -> None:
        super().__init__("range requests are not supported")
        self.whole = whole


def _nbytes(result: Any) -> int:
    """Bytes of an answer: a buffer, ``(buffer, size)``, a zarr ``Buffer``; else 0."""
    data = result[0] if isinstance(result, tuple) else result
    if data is None or isinstance(data, (bool, int)):
        return 0
    try:
        return memoryview(data).nbytes
    except TypeError:  # a zarr Buffer (zarr-python's reads): its length in bytes
        return len(data) if hasattr(data, "__len__") else 0


class RemoteSource:
    """Concurrent byte-range reads from an object store (the async engine).

    Subclasses implement one request: :meth:`_get_range`, :meth:`_get_whole`,
    :meth:`_get_index`; :meth:`request` runs any other (zarr-python's metadata
    reads, through :class:`~zarrdali.io.bounded.BoundedStore`), so every
    request of a loader has the same deadline and flow control. Requests run on
    zarr-python's event loop (the one that serves zarr-python's own calls). How
    many are in flight adapts to what the store sustains
    (:class:`~zarrdali.io.flow.AdaptiveLimit`, at most
    ``max_in_flight``); a request that stalls past what the store usually takes
    is cancelled, abandoned (never awaited: its connection closes behind it) and
    sent again; transient errors are retried here (the storage client's own
    retries are off, so every retry is counted): throttling (429, 503 SlowDown)
    with exponential backoff and jitter, other errors (a plain 5xx, a reset
    connection) at once while the store answers most requests, with backoff
    when it fails most. A refused connection, an unreachable host, a name that
    does not resolve or a failed TLS handshake fails at once while the store has
    never answered (a wrong URL), and is retried once it has (a restart). A
    request not answered within ``policy.timeout_s`` in all fails its batch (see
    :mod:`~zarrdali.io.flow`). At interpreter exit every request in
    flight is abandoned and later ones fail at once, so no thread waiting on one
    keeps the process alive.
    A server that ignores ``Range`` is read whole object by whole object, each
    fetched once while it fits the last ``whole_bytes`` kept in memory, with a
    one-time warning. ``max_gap``: see ``REMOTE_MAX_GAP``.
    """

    remote = True

    def __init__(
        self,
        name: str,
        *,
        max_in_flight: int = 64,
        max_gap: int = REMOTE_MAX_GAP,
        policy: RequestPolicy | None = None,
        whole_bytes: int = 256 << 20,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.name = name
        self.max_in_flight = max_in_flight
        self.max_gap = max_gap
        self.policy = policy or RequestPolicy()
        self.limit = AdaptiveLimit(max_in_flight, self.policy.initial_in_flight)
        self.latency = LatencyBound(self.policy)
        self._lock = threading.Lock()
        self.requests = self.bytes = self.retried = self.timeouts = self.errors = self.slow = 0
        self.throttled = self.answered = 0
        self._recent: deque[bool] = deque(maxlen=64)  # last attempts: answered or failed
        self.seconds = 0.0
        _watch_for_exit(self)
        self.ranges_ignored = False
        self.whole_bytes = whole_bytes
        self._whole: OrderedDict[str, Buffer] = OrderedDict()  # path -> object (LRU)
        self._whole_held = 0

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
        gap = self.max_gap
        if self.ranges_ignored and len(ranged):  # one "read" per object: it comes whole
            gap = int((offset[ranged] + nbytes[ranged]).max())
        reads = coalesce_arrays(file[ranged], offset[ranged], nbytes[ranged], gap)
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
            (self._then, (self._fetch_range, (paths[f], start, end - start), cut, r))
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
        """Requests made (attempts), bytes received, retries (after a transient error
        or a stall), stalls, transient errors, the in-flight limit and peak."""
        return {
            "requests": self.requests,
            "bytes": self.bytes,
            "retries": self.retried,
            "timeouts": self.timeouts,
            "transient_errors": self.errors,
            "throttled": self.throttled,
            "slow_answers": self.slow,
            "peak_in_flight": self.limit.peak,
            "max_in_flight": self.max_in_flight,
            "in_flight_limit": self.limit.current,
            "in_flight_decreases": self.limit.decreases,
            "stall_bound_ms": int(1000 * self.latency.bound(0)),
            "ranges_ignored": int(self.ranges_ignored),
            "request_seconds_x1000": int(self.seconds * 1000),
        }

    def close(self) -> None:
        self._whole.clear()
        self._whole_held = 0

    def configure(self, max_in_flight: int, policy: RequestPolicy) -> None:
        """Use these settings from now on (a source made to read the metadata,
        then given the loader's ``max_in_flight``; the latencies learnt stay)."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if max_in_flight != self.max_in_flight:
            self.max_in_flight = max_in_flight
            self.limit = AdaptiveLimit(max_in_flight, policy.initial_in_flight)
        self.policy = policy
        self.latency.policy = policy

    async def request(self, path: str, make: Callable[[], Any]) -> Any:
        """``await make()`` as one of this source's requests: under the in-flight
        limit, re-sent when it stalls, retried, within ``policy.timeout_s``. For
        metadata (small documents): their latency is not a chunk's usual one."""
        return await self._request(path, make, metadata=True)

    # -- the engine ---------------------------------------------------------------
    def _run(self, calls: list[tuple[Callable, tuple]]) -> list[Any]:
        """Run ``fn(*args)`` coroutines concurrently; results in order. The first
        error cancels the others and is raised (a failed batch fails at once)."""
        if not calls:
            return []
        from zarr.core.sync import sync

        if _exiting:
            raise ObjectReadError(str(calls[0][1][0]), _EXIT_REASON, unavailable=True)
        t0 = time.perf_counter()
        try:
            return sync(self._gather(calls))
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - t0

    @staticmethod
    async def _gather(calls: list[tuple[Callable, tuple]]) -> list[Any]:
        tasks = [asyncio.ensure_future(fn(*args)) for fn, args in calls]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # an error, or this batch cancelled: stop what is left
            left = [task for task in tasks if not task.done()]
            for task in left:
                task.cancel()
            if left:
                await asyncio.gather(*left, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]

    @staticmethod
    async def _then(fn: Callable, args: tuple, callback: Callable, key: int) -> None:
        callback(key, await fn(*args))

    async def _request(
        self, path: str, make: Callable[[], Any], nbytes: int = 0, *, metadata: bool = False
    ) -> Any:
        """One request under the in-flight limit: re-sent when it stalls, retried
        when it fails transiently, until ``policy.timeout_s`` has passed."""
        if _exiting:
            raise ObjectReadError(path, _EXIT_REASON, unavailable=True)
        me = asyncio.current_task()
        _requesting.add(me)
        try:
            return await self._attempts(path, make, nbytes, metadata)
        except asyncio.CancelledError:
            if _exiting:  # abandoned at interpreter exit: a plain error, not a cancel
                raise ObjectReadError(path, _EXIT_REASON, unavailable=True) from None
            raise
        finally:
            _requesting.discard(me)

    async def _attempts(
        self, path: str, make: Callable[[], Any], nbytes: int, metadata: bool
    ) -> Any:
        loop = asyncio.get_running_loop()
        policy = self.policy
        bound = self.latency.bound(nbytes)
        backoff = policy.backoff_s
        deadline = None
        attempts, last = 0, ""
        while True:
            token = await self.limit.acquire()
            now = loop.time()
            if deadline is None:  # from the first attempt on, not the wait for room
                deadline = now + policy.timeout_s
            attempts += 1
            self.requests += 1
            outcome, stalled, throttled, took = "other", False, False, 0.0
            task = asyncio.ensure_future(make())
            try:
                wait = max(0.0, min(bound, deadline - now))
                try:
                    done, _ = await asyncio.wait({task}, timeout=wait)
                except BaseException:  # this batch was cancelled (another request failed)
                    _abandon(task)
                    raise
                if not done and wait < bound:  # the deadline came first: no stall
                    _abandon(task)
                    last = last or f"no answer in {wait:.1f} s"
                elif not done:  # stalled: abandoned (cancelling closes its connection)
                    _abandon(task)
                    self.timeouts += 1
                    outcome, stalled = "congested", True
                    last = f"no answer in {wait:.1f} s"
                else:
                    try:
                        result = task.result()
                    except (FileNotFoundError, RangesIgnored):
                        self.answered += 1  # an answer all the same
                        self._recent.append(True)
                        raise
                    except Exception as err:
                        if is_access_error(err):
                            raise StoreAccessError(
                                f"access to store {self.name!r} was refused reading {path!r}: "
                                f"{describe_failure(err)}. Check the credentials "
                                f"(storage_options or the environment) and the permissions "
                                f"on the bucket."
                            ) from err
                        cause, unreachable = describe_failure(err), connect_failure(err)
                        if unreachable in ("dns", "tls") or (unreachable and not self.answered):
                            # A wrong URL, not a restart: no use waiting for it.
                            raise ObjectReadError(path, cause, unavailable=True) from err
                        if not unreachable and not is_transient(err):
                            raise ObjectReadError(path, cause) from err
                        self.errors += 1
                        self._recent.append(False)
                        throttled = is_throttling(err)
                        self.throttled += throttled
                        outcome, last = ("congested" if throttled else "failed"), cause
                    else:
                        took, size = loop.time() - now, max(nbytes, _nbytes(result))
                        outcome = "congested" if self.latency.slow(took, size) else "ok"
                        self.slow += outcome == "congested"
                        if metadata:
                            self.latency.record_first(took)
                        else:
                            self.latency.record(took, size)
                        self.answered += 1
                        self._recent.append(True)
                        return result
            finally:
                self.limit.release(token, outcome, took)
            now = loop.time()
            if now >= deadline:
                tried = f"; {attempts} attempts, the last: {last}" if attempts > 1 else ""
                if attempts == 1 and not last.startswith("no answer"):
                    tried = f"; {last}"
                raise ObjectReadError(
                    path,
                    f"no answer within {policy.timeout_s:g} s (request_timeout{tried})",
                    unavailable=True,
                )
            self.retried += 1
            if stalled:  # sent again at once, with more patience
                bound = min(policy.max_stall_s, 2 * bound)
                continue
            if not throttled and self._answering():
                # The store answers: this failure is bad luck more likely than load
                # (that is for the in-flight limit to tell): try again now.
                await asyncio.sleep(0)
                continue
            delay = min(backoff, deadline - now) * (0.5 + random.random() / 2)  # jitter
            backoff = min(policy.max_backoff_s, 2 * backoff)
            await asyncio.sleep(delay)

    def _answering(self) -> bool:
        """Whether the store answers (at least a quarter of the last attempts, of 8
        or more): then a failure is retried at once; a store that fails nearly
        everything (down, or refusing most connections) gets backoff instead."""
        return len(self._recent) >= 8 and 4 * sum(self._recent) >= len(self._recent)

    def _ignore_ranges(self) -> None:
        if not self.ranges_ignored:
            self.ranges_ignored = True
            warnings.warn(
                f"store {self.name!r} does not serve byte ranges (it answers a range request "
                f"with the whole object): zarrdali reads whole objects from it instead, each "
                f"once while it fits {self.whole_bytes >> 20} MiB of memory (and cache_dir, if "
                f"given, keeps what was read).",
                RuntimeWarning,
                stacklevel=2,
            )

    async def _whole_object(self, path: str, have: Buffer | None = None) -> Buffer:
        """The whole object at ``path`` (for a server that ignores ranges): fetched
        once and kept while the last ``whole_bytes`` of such objects hold it (a
        batch coalesces all its ranges of an object into one read)."""
        if path in self._whole:
            self._whole.move_to_end(path)
            return self._whole[path]
        if have is None:
            have = await self._request(path, lambda: self._get_whole(path))
            self.bytes += _nbytes(have)
        size = _nbytes(have)
        if size <= self.whole_bytes and path not in self._whole:  # (another batch's fetch)
            self._whole[path] = have
            self._whole_held += size
            while self._whole_held > self.whole_bytes:
                self._whole_held -= _nbytes(self._whole.popitem(last=False)[1])
        return have

    async def _fetch_range(self, path: str, start: int, nbytes: int) -> Buffer:
        try:
            if self.ranges_ignored:
                data = memoryview(await self._whole_object(path))[start : start + nbytes]
            else:
                try:
                    data = await self._request(
                        path, lambda: self._get_range(path, start, nbytes), nbytes
                    )
                except RangesIgnored as err:
                    self._ignore_ranges()
                    whole = await self._whole_object(path, err.whole)
                    data = memoryview(whole)[start : start + nbytes]
                else:
                    self.bytes += _nbytes(data)
        except FileNotFoundError as err:
            raise ObjectReadError(path, "object not found (deleted while reading?)") from err
        got = _nbytes(data)
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
        self.bytes += _nbytes(data)
        return data

    async def _index_or_none(self, path: str, nbytes: int, at_end: bool):
        try:
            if not self.ranges_ignored:
                try:
                    raw, size = await self._request(
                        path, lambda: self._get_index(path, nbytes, at_end), nbytes
                    )
                except RangesIgnored as err:
                    self._ignore_ranges()
                    if err.whole is not None:
                        await self._whole_object(path, err.whole)
                else:
                    self.bytes += _nbytes(raw)
                    return raw, size
            whole = memoryview(await self._whole_object(path))
        except FileNotFoundError:
            return None  # a shard never written: every inner chunk is the fill value
        raw = whole[max(0, len(whole) - nbytes) :] if at_end else whole[:nbytes]
        return raw, len(whole)  # a short one: the locator names the broken shard


def _abandon(task: asyncio.Future) -> None:
    """Cancel a request and leave it: its connection closes as it unwinds, and
    nobody waits for that (its outcome, if any, is read so none is reported)."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


# -- at interpreter exit ------------------------------------------------------------
# Interpreter shutdown joins every thread of a ThreadPoolExecutor (threading's own
# exit hooks, before atexit's). A thread of a loader waiting on a request would hold
# the process for up to request_timeout, and a queued batch would start new ones. A
# hook registered with threading after concurrent.futures' (they run in reverse)
# abandons every request in flight and fails every later one at once.
_EXIT_REASON = "abandoned: the interpreter is exiting"
_exiting = False
_requesting: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()  # tasks inside _request
_watched = False
_watch_lock = threading.Lock()


def _watch_for_exit(source: RemoteSource) -> None:
    global _watched
    with _watch_lock:
        if _watched:
            return
        register = getattr(threading, "_register_atexit", None)
        if register is None:  # not CPython: threads are joined as they end
            _watched = True
            return
        try:
            register(_abandon_requests)
        except RuntimeError:  # already shutting down
            return
        _watched = True


def _abandon_requests() -> None:
    global _exiting
    _exiting = True
    for task in list(_requesting):
        with contextlib.suppress(RuntimeError):  # its loop closed: nothing waits on it
            task.get_loop().call_soon_threadsafe(task.cancel)


def _range_refused(err: BaseException) -> bool:
    """obstore's answer to a server that ignores ``Range``."""
    return "Range request not supported" in str(err)


class ObstoreSource(RemoteSource):
    """Reads through an obstore store (S3, GCS, Azure, HTTP): Rust client. Give it a
    store whose own retries are off (:func:`~zarrdali.io.remote.obstore_for_requests`):
    the engine retries, and counts what it retries."""

    def __init__(self, store: Any, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.store = store

    async def _get_range(self, path: str, start: int, nbytes: int) -> Buffer:
        import obstore

        try:
            return await obstore.get_range_async(self.store, path, start=start, length=nbytes)
        except obstore.exceptions.NotSupportedError as err:
            if _range_refused(err):
                raise RangesIgnored() from err
            raise

    async def _get_whole(self, path: str) -> Buffer:
        import obstore

        result = await obstore.get_async(self.store, path)
        return await result.bytes_async()

    async def _get_index(self, path: str, nbytes: int, at_end: bool) -> tuple[Buffer, int]:
        import obstore

        want = {"suffix": nbytes} if at_end else (0, nbytes)
        try:
            result = await obstore.get_async(self.store, path, options={"range": want})
        except obstore.exceptions.NotSupportedError as err:
            if _range_refused(err):
                raise RangesIgnored() from err
            # no suffix requests (Azure): ask the size
            size = (await obstore.head_async(self.store, path))["size"]
            start = max(0, size - nbytes)
            raw = await self._get_range(path, start, size - start)
            return raw, size
        return await result.bytes_async(), int(result.meta["size"])


class ZarrStoreSource(RemoteSource):
    """Reads through any zarr ``Store`` (fsspec-backed, Icechunk, ...): its async
    ``get`` with byte ranges."""

    def __init__(self, store: Any, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.store = store

    async def _get(self, path: str, byte_range: Any) -> Buffer:
        from zarr.core.buffer import default_buffer_prototype

        buf = await self.store.get(path, default_buffer_prototype(), byte_range=byte_range)
        if buf is None:
            raise FileNotFoundError(path)
        return buf.as_numpy_array()

    async def _get_range(self, path: str, start: int, nbytes: int) -> Buffer:
        from zarr.abc.store import RangeByteRequest

        data = await self._get(path, RangeByteRequest(start, start + nbytes))
        if len(data) > nbytes:  # the whole object, range ignored (a short one: truncated)
            raise RangesIgnored(data)
        return data

    async def _get_whole(self, path: str) -> Buffer:
        return await self._get(path, None)

    async def _get_index(self, path: str, nbytes: int, at_end: bool) -> tuple[Buffer, int]:
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        request = SuffixByteRequest(nbytes) if at_end else RangeByteRequest(0, nbytes)
        data = await self._get(path, request)
        if len(data) > nbytes:
            raise RangesIgnored(data)
        return data, -1  # size unknown: short reads are caught later


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
