"""Read stage of the GPU engine: a batch's compressed bytes into one device staging buffer.

Two readers fill the staging layout of :func:`~zarrdali.gpu.describe.plan_staging`
(coalesced reads, each at an 8-byte-aligned offset):

* :class:`KvikioReader`: ``kvikio.CuFile.pread`` of every coalesced read,
  all issued before any is awaited, in kvikIO's C++ thread pool. With GDS the
  bytes go storage→GPU; in kvikIO's POSIX compatibility mode each task reads
  into a pinned bounce buffer and copies it to the device (one
  ``cudaMemcpy`` per task). :func:`configure_kvikio` sizes the pool
  (``num_threads``; kvikIO's default is 1), the task size and ``gds_threshold``
  (kvikIO runs reads under it synchronously in the *caller's* thread, one
  after another: we default it to 0 so small chunk reads run in the pool too).
* :class:`PinnedReader`: ``os.preadv`` of every coalesced read straight into one
  pinned host buffer, in a thread pool, then **one** host-to-device copy of
  the whole staging area per batch, on the batch's stream.

``read="auto"`` picks kvikIO when GDS is in use (:func:`io_mode` is
``"gds"``: the bytes never touch host memory) and the pinned reader
otherwise. In compatibility mode the pinned reader is expected to win: both
read from the page cache with the same ``pread``, but kvikIO then issues one
bounce-buffer copy and one stream synchronization per task, while the pinned
reader makes one large copy per batch at full PCIe/C2C bandwidth; for small
chunks kvikIO's per-task overhead dominates. ``benchmarks/decode_gpu.py``
measures both (rows ``zarrdali-gpu[kvikio]`` and ``zarrdali-gpu[pinned]``).

A remote store (``s3://``, ``gs://``, ``https://``, a zarr Store, Icechunk) has
two more: :class:`SourceReader` (``read="pinned"``, the default: the store's
:class:`~zarrdali.io.sources.ByteSource` fetches the coalesced ranges
concurrently, each response is copied into pinned memory as it arrives, then
one host-to-device copy per batch) and :class:`KvikioRemoteReader`
(``read="kvikio"``, ``s3://``/``http(s)://`` URLs only: ``kvikio.RemoteFile``
reads straight into device staging). ``benchmarks/remote_bench.py`` measures
both (rows ``zarrdali-gpu[pinned]`` and ``zarrdali-gpu[kvikio]``); neither has
run on a GPU yet (the source reader is tested on the CPU stand-in against a
local S3 server, the kvikIO one against a fake ``RemoteFile``).

Readers belong to one thread state of the backend (kvikIO file handles are
kept open per reader, least recently used closed past a limit); ``close()``
releases them. The host waits for the reads themselves (inherent: the bytes
must have arrived before the stream uses them) but never for the stream.

VERIFIED WITHOUT A GPU: the pinned reader's host side (the preads into a host
buffer, per-thread descriptors, truncation errors, one copy per batch) with
numpy standing in for pinned and device memory; both readers inside the
backend on the CPU stand-in of ``tests/fakecuda.py`` (a fake ``CuFile``);
:func:`io_mode` and :func:`configure_kvikio` against a fake ``kvikio`` module
of the 26.x API (``tests/test_gpu_read.py``). NOT VERIFIED until a GPU runs
the ``gpu``-marked tests: kvikIO's reads, the host-to-device copy, the modes
reported on a real machine, and which reader is faster (the benchmark).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import Any

import numpy as np

from zarrdali.batch.backend import finish_all
from zarrdali.batch.locate import ChunkLocations
from zarrdali.errors import ChunkError
from zarrdali.gpu.describe import StagingLayout
from zarrdali.gpu.lifetimes import GuardedBuffers
from zarrdali.io.openfiles import OpenFiles
from zarrdali.io.sources import ObjectReadError
from zarrdali.store.open import ArrayLayout

READ_MODES = ("auto", "kvikio", "pinned")
_H2D = 1  # cudaMemcpyHostToDevice

# Our defaults for kvikIO's global settings (the KVIKIO_* environment variables win).
DEFAULT_TASK_SIZE = 1 << 20
DEFAULT_GDS_THRESHOLD = 0
_ENV = {
    "num_threads": "KVIKIO_NTHREADS",
    "task_size": "KVIKIO_TASK_SIZE",
    "gds_threshold": "KVIKIO_GDS_THRESHOLD",
}


# -- kvikIO settings and mode ---------------------------------------------------------
def configure_kvikio(
    num_threads: int | None = None,
    task_size: int | None = DEFAULT_TASK_SIZE,
    gds_threshold: int | None = DEFAULT_GDS_THRESHOLD,
) -> dict[str, Any]:
    """Set kvikIO's thread pool size, task size and GDS threshold (process-wide;
    ``None`` leaves one as it is, and a ``KVIKIO_*`` environment variable wins
    over the argument). Returns the settings now in force."""
    import kvikio.defaults as d

    wanted = {
        name: int(value)
        for name, value in (
            ("num_threads", num_threads),
            ("task_size", task_size),
            ("gds_threshold", gds_threshold),
        )
        if value is not None and not os.environ.get(_ENV[name])
    }
    if wanted:
        if hasattr(d, "set"):  # kvikIO >= 25.x: defaults.set({name: value})
            d.set(wanted)
        else:  # older releases
            for name, value in wanted.items():
                reset = "num_threads_reset" if name == "num_threads" else f"{name}_reset"
                getattr(d, reset)(value)
    return kvikio_settings()


def kvikio_settings() -> dict[str, Any]:
    """kvikIO's thread pool size, task size and GDS threshold."""
    import kvikio.defaults as d

    out: dict[str, Any] = {}
    for name in ("num_threads", "task_size", "gds_threshold"):
        try:
            if hasattr(d, "get"):
                out[name] = d.get(name)
            else:
                out[name] = getattr(d, "get_num_threads" if name == "num_threads" else name)()
        except Exception as err:  # reported, not fatal: an older or newer kvikIO
            out[name] = f"unknown ({type(err).__name__})"
    return out


def gds_available() -> bool:
    """Whether the cuFile driver reports GPUDirect Storage (False when kvikIO
    cannot tell: no libcufile, no driver)."""
    try:
        import kvikio.cufile_driver as driver
    except ImportError:
        return False
    try:
        if hasattr(driver, "get"):  # kvikIO >= 25.x
            return bool(driver.get("is_gds_available"))
        return bool(driver.DriverProperties().is_gds_available)  # older releases
    except Exception:  # no libcufile / no driver: cuFile cannot be used
        return False


def compat_mode_preferred() -> bool:
    """Whether kvikIO resolves its compatibility mode (POSIX reads) to ON."""
    import kvikio.defaults as d

    preferred = getattr(d, "is_compat_mode_preferred", None)
    if preferred is not None:
        return bool(preferred())
    mode = d.get("compat_mode") if hasattr(d, "get") else d.compat_mode()
    name = getattr(mode, "name", str(mode)).upper()
    return name in ("ON", "TRUE", "1")


def io_mode() -> str:
    """``"gds"`` when kvikIO reads through cuFile with GPUDirect Storage,
    ``"posix"`` otherwise (kvikIO's compatibility mode, or cuFile without GDS)."""
    return "gds" if not compat_mode_preferred() and gds_available() else "posix"


def io_details() -> dict[str, Any]:
    """:func:`io_mode` with what it was derived from and kvikIO's settings."""
    compat = compat_mode_preferred()
    gds = gds_available()
    return {
        "mode": "gds" if not compat and gds else "posix",
        "compat_mode_preferred": compat,
        "gds_available": gds,
        **kvikio_settings(),
    }


def resolve_read_mode(read: str, mode: str, remote: bool = False) -> str:
    """The reader ``read`` ("auto", "kvikio", "pinned") names in I/O mode ``mode``.

    For a ``remote`` store, "auto" is "pinned" (the store's byte source into
    pinned memory, :class:`SourceReader`); "kvikio" is kvikIO's remote file
    (:class:`KvikioRemoteReader`)."""
    if read not in READ_MODES:
        raise ValueError(f"read must be one of {READ_MODES}, got {read!r}")
    if read != "auto":
        return read
    return "kvikio" if mode == "gds" and not remote else "pinned"


# -- errors ---------------------------------------------------------------------------
def _read_error(
    message: str,
    store: str,
    layouts: Sequence[ArrayLayout],
    locations: ChunkLocations,
    f: int,
) -> ChunkError:
    return ChunkError(
        message,
        store=store,
        array=layouts[int(locations.file_var[f])].name,
        key=str(locations.keys[f]),
    )


# -- kvikIO -----------------------------------------------------------------------------
class KvikioReader:
    """Coalesced reads with ``kvikio.CuFile.pread`` into device staging.

    All reads are issued before any is awaited; one handle per file is kept
    open, least recently used closed past ``max_open_files``.
    """

    name = "kvikio"
    what = "file"  # in messages

    def __init__(self, store: str, *, max_open_files: int = 64, on_read=None) -> None:
        self._store = store
        self.max_open_files = max_open_files
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._on_read = on_read  # (reads, bytes) once per batch, for the transfer counter

    def _open(self, path: str) -> Any:
        import kvikio

        return kvikio.CuFile(path, "r")

    def _release(self, handle: Any) -> None:
        handle.close()

    def _handle(self, path: str) -> Any:
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = self._open(path)
        else:
            self._files.move_to_end(path)
        return handle

    def _copy_prefetched(self, whole: Any, start: int, n: int, view: Any, stream: Any) -> None:
        raise NotImplementedError  # only readers that take prefetched objects

    def read(
        self,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        s: StagingLayout,
        staging: Any,
        stream: Any,
        prefetched: dict[int, Any] | None = None,
    ) -> None:
        """Every read of ``s`` into ``staging`` (a device buffer nothing else
        uses now); returns when all bytes have arrived. kvikIO copies on its own
        streams and has finished when a read returns; ``stream`` orders only the
        copies of ``prefetched`` objects (file index -> bytes, read whole before)."""
        files, starts = s.read_file.tolist(), s.read_start.tolist()
        dst, nbytes = s.read_dst.tolist(), s.read_nbytes.tolist()
        pending: list[tuple[int, int, Any]] = []
        error: BaseException | None = None
        failed = f"kvikIO {'remote ' if self.what == 'object' else ''}read failed"

        def fail(message: str, r: int, cause: BaseException | None = None) -> None:
            nonlocal error
            if error is None:
                error = _read_error(message, self._store, layouts, locations, files[r])
                error.__cause__ = cause

        for r in range(s.n_reads):
            view = staging[dst[r] : dst[r] + nbytes[r]]
            whole = None if not prefetched else prefetched.get(files[r])
            try:
                if whole is not None:
                    self._copy_prefetched(whole, starts[r], nbytes[r], view, stream)
                    continue
                handle = self._handle(str(locations.paths[files[r]]))
                pending.append((r, nbytes[r], handle.pread(view, nbytes[r], starts[r])))
            except Exception as err:  # raised below, after every issued read has finished
                fail(f"{failed}: {type(err).__name__}: {err}", r, err)
                break
        done_bytes = 0
        for r, n, future in pending:  # wait for all before any handle closes
            try:
                got = future.get()
            except Exception as err:
                fail(f"{failed}: {type(err).__name__}: {err}", r, err)
                continue
            if got != n:
                fail(f"{self.what} is truncated: wanted {n} bytes at {starts[r]}, got {got}", r)
            done_bytes += n
        if self._on_read is not None:
            self._on_read(len(pending), done_bytes)
        while len(self._files) > self.max_open_files:
            self._release(self._files.popitem(last=False)[1])
        if error is not None:
            raise error

    def close(self) -> None:
        """Close the open handles (call when no read is in progress)."""
        while self._files:
            self._release(self._files.popitem()[1])


# -- pinned host memory -----------------------------------------------------------------
def pread_into(
    host: np.ndarray,
    s: StagingLayout,
    paths: Sequence[str],
    files: OpenFiles,
    map_tasks: Callable[[list[Callable[[], None]]], None],
    n_tasks: int,
    error: Callable[[str, int], ChunkError],
) -> None:
    """Every read of ``s`` into ``host[read_dst:]`` (``os.preadv``, no copy), as
    ``n_tasks`` tasks of interleaved reads run by ``map_tasks``.

    ``error(message, file)`` makes the exception of a failed or short read.
    """
    view = memoryview(host).cast("B")
    file, start = s.read_file, s.read_start
    nbytes, dst = s.read_nbytes, s.read_dst

    def run(rs: range) -> None:
        for r in rs:
            f, n, at = int(file[r]), int(nbytes[r]), int(start[r])
            d = int(dst[r])
            try:
                got = os.preadv(files.fd(str(paths[f])), [view[d : d + n]], at)
            except OSError as err:
                raise error(f"cannot read bytes {at}..{at + n}: {err}", f) from err
            if got != n:
                raise error(f"file is truncated: wanted {n} bytes at {at}, got {got}", f)

    r = s.n_reads
    n_tasks = max(1, min(r, n_tasks))
    map_tasks([partial(run, range(k, r, n_tasks)) for k in range(n_tasks)])


class PinnedReader:
    """Coalesced ``os.preadv`` into pinned host memory, then one host-to-device
    copy of the batch's staging area on the batch's stream.

    The pinned buffers are a ring of :class:`GuardedBuffers` (2): a batch's
    preads wait only for the copy out of the buffer the batch before last used.
    """

    name = "pinned"

    def __init__(
        self,
        store: str,
        files: OpenFiles,
        executor: Executor,
        n_tasks: int,
        *,
        alloc_pinned: Callable[[int], np.ndarray],
        on_read=None,
        on_copy=None,
    ) -> None:
        self._store = store
        self._files = files
        self._executor = executor
        self.n_tasks = n_tasks
        self._ring = GuardedBuffers(alloc_pinned, n=2)
        self._on_read = on_read
        self._on_copy = on_copy

    def _map(self, tasks: list[Callable[[], None]]) -> None:
        # every task finishes before the buffer is used (or reused after an error)
        finish_all([self._executor.submit(task) for task in tasks])

    def read(
        self,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        s: StagingLayout,
        staging: Any,
        stream: Any,
    ) -> None:
        """Every read of ``s`` into pinned memory, then one copy of
        ``staging[:s.raw_nbytes]`` enqueued on ``stream`` (not awaited)."""
        self._read_then_copy(layouts, locations, s, staging, stream, self._fill)

    def _fill(
        self,
        host: np.ndarray,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        s: StagingLayout,
    ) -> None:
        def error(message: str, f: int) -> ChunkError:
            return _read_error(message, self._store, layouts, locations, f)

        pread_into(host, s, locations.paths, self._files, self._map, self.n_tasks, error)

    def _read_then_copy(
        self,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        s: StagingLayout,
        staging: Any,
        stream: Any,
        fill: Callable[..., None],
    ) -> None:
        import cupy

        k, host = self._ring.acquire(s.raw_nbytes)
        try:
            fill(host, layouts, locations, s)
        except BaseException:
            self._ring.release(k, None)
            raise
        if self._on_read is not None:
            self._on_read(s.n_reads, int(s.read_nbytes.sum()))
        cupy.cuda.runtime.memcpyAsync(
            staging.data.ptr, host.ctypes.data, s.raw_nbytes, _H2D, stream.ptr
        )
        self._ring.release(k, stream.record())
        if self._on_copy is not None:
            self._on_copy(s.raw_nbytes)

    def close(self) -> None:
        """Wait for the copies out of the pinned buffers, then drop them."""
        self._ring.close()


# -- a remote store, through its byte source ----------------------------------------------
def source_error(
    err: ObjectReadError, store: str, layouts: Sequence[ArrayLayout], locations: ChunkLocations
) -> ChunkError:
    """The :class:`ChunkError` naming the array and key of the object ``err`` names."""
    f = int(np.flatnonzero(locations.paths == err.path)[0])
    error = _read_error(err.reason, store, layouts, locations, f)
    error.__cause__ = err
    return error


class SourceReader(PinnedReader):
    """A remote store's coalesced byte ranges, fetched concurrently through its
    :class:`~zarrdali.io.sources.ByteSource` into pinned host memory (each
    response copied to its place in the staging layout as it arrives, on the
    fetching thread), then **one** host-to-device copy per batch, as
    :class:`PinnedReader`.

    ``source.read_chunks`` gets the staging layout's reads themselves; when the
    layout was coalesced with the source's own ``max_gap``, each read is one
    request. ``prefetched`` (file index → bytes of the whole object): objects
    already fetched whole (a remote store's unsharded chunks, whose sizes are
    unknown until read), copied from there instead.
    """

    name = "source"

    def __init__(
        self,
        store: str,
        source: Any,
        *,
        alloc_pinned: Callable[[int], np.ndarray],
        on_read=None,
        on_copy=None,
    ) -> None:
        self._store = store
        self._source = source
        self._ring = GuardedBuffers(alloc_pinned, n=2)
        self._on_read = on_read
        self._on_copy = on_copy

    def read(
        self,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        s: StagingLayout,
        staging: Any,
        stream: Any,
        prefetched: dict[int, Any] | None = None,
    ) -> None:
        """Every read of ``s`` into pinned memory, then one copy of
        ``staging[:s.raw_nbytes]`` enqueued on ``stream`` (not awaited)."""
        fill = partial(self._fill_from_source, prefetched=prefetched)
        self._read_then_copy(layouts, locations, s, staging, stream, fill)

    def _fill_from_source(
        self,
        host: np.ndarray,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        s: StagingLayout,
        prefetched: dict[int, Any] | None,
    ) -> None:
        files, starts = s.read_file.tolist(), s.read_start.tolist()
        dst, nbytes = s.read_dst.tolist(), s.read_nbytes.tolist()
        fetch = np.arange(s.n_reads)
        if prefetched:
            have = np.fromiter((f in prefetched for f in files), dtype=bool, count=len(files))
            for r in np.flatnonzero(have).tolist():
                data = np.frombuffer(prefetched[files[r]], dtype=np.uint8)
                host[dst[r] : dst[r] + nbytes[r]] = data[starts[r] : starts[r] + nbytes[r]]
            fetch = np.flatnonzero(~have)
        if not len(fetch):
            return
        order = fetch.tolist()

        def ready(positions: list[int], buffers: list[Any]) -> None:  # on the fetching thread
            for k, data in zip(positions, buffers, strict=True):
                r = order[k]
                got = np.frombuffer(data, dtype=np.uint8)
                if len(got) != nbytes[r]:
                    raise _read_error(
                        f"object is truncated: wanted {nbytes[r]} bytes at {starts[r]}, "
                        f"got {len(got)}",
                        self._store,
                        layouts,
                        locations,
                        files[r],
                    )
                host[dst[r] : dst[r] + nbytes[r]] = got

        try:
            self._source.read_chunks(
                locations.paths,
                s.read_file[fetch],
                s.read_start[fetch],
                s.read_nbytes[fetch],
                ready,
            )
        except ObjectReadError as err:
            raise source_error(err, self._store, layouts, locations) from err


def kvikio_remote_url(store: str) -> str | None:
    """The URL kvikIO's remote file can open the objects of ``store`` under (an
    ``s3://`` or ``http(s)://`` store URL), else None."""
    if store.startswith(("s3://", "http://", "https://")):
        return store.rstrip("/")
    return None


class KvikioRemoteReader(KvikioReader):
    """A remote store's coalesced byte ranges straight into device staging with
    kvikIO's remote file (``kvikio.RemoteFile``, libcurl in kvikIO's thread
    pool): ``s3://`` URLs through ``RemoteFile.open_s3_url``, ``http(s)://``
    through ``RemoteFile.open_http``. All reads are issued before any is awaited.

    Credentials and endpoint come from kvikIO's own configuration (the
    ``AWS_*`` environment variables, ``AWS_ENDPOINT_URL`` for another server),
    not from ``storage_options``. One handle per object is kept open (its size
    asked once), least recently used dropped past ``max_open_files``. Objects
    already fetched whole through the byte source (``prefetched``: unsharded
    chunks, whose sizes are unknown until read) are copied to the device one by
    one (counted as host-to-device copies).

    NOT VERIFIED ON A GPU: written from kvikIO's documented Python API
    (``RemoteFile.open_s3_url``/``open_http``, ``pread(buf, size, file_offset)``
    returning a future); on this machine only its wiring runs, against a fake.
    """

    name = "kvikio-remote"
    what = "object"

    def __init__(
        self, store: str, url: str, *, max_open_files: int = 256, on_read=None, on_copy=None
    ):
        super().__init__(store, max_open_files=max_open_files, on_read=on_read)
        self._url = url
        self._on_copy = on_copy

    def _open(self, path: str) -> Any:
        from kvikio.remote_file import RemoteFile

        url = f"{self._url}/{path}"
        if url.startswith("s3://"):
            return RemoteFile.open_s3_url(url)
        return RemoteFile.open_http(url)

    def _release(self, handle: Any) -> None:
        pass  # a remote file holds no descriptor: dropping it is enough

    def _copy_prefetched(self, whole: Any, start: int, n: int, view: Any, stream: Any) -> None:
        view.set(np.frombuffer(whole, dtype=np.uint8)[start : start + n], stream=stream)
        if self._on_copy is not None:
            self._on_copy(n)
