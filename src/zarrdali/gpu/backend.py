"""GPU backend: the engine's stages, orchestrated per batch.

Importing this module never touches a GPU (CuPy, kvikIO and nvCOMP are imported
inside functions); asking for the backend checks what the GPU path needs and
says what is missing and how to install it.

One batch consumes the same array plan as the CPU backend
(:class:`~zarrdali.batch.plan.BatchPlan`); each stage is a module of its own:

1. **plan** (host, numpy; :mod:`.plan`): a cached
   :class:`~zarrdali.batch.locate.ChunkLocator` finds each chunk's file,
   offset and size; with ``cache="gpu"`` the chunk cache (:mod:`.cache`) says
   which payloads it holds; :func:`~zarrdali.gpu.describe.describe_batch`
   lays out the staging buffer (coalesced reads of the other chunks), the
   decoded slots, the decode groups and the gather tables.
2. **read** (:mod:`.read`): the compressed bytes into one device staging
   buffer: kvikIO (``read="kvikio"``, the default with GDS) or preads into
   pinned memory and one host-to-device copy (``read="pinned"``, the default
   in kvikIO's compatibility mode). A remote store (``source.remote``) is read
   through its byte source into pinned memory, one copy per batch
   (``read="pinned"``, the default) or with kvikIO's remote file
   (``read="kvikio"``); its unsharded chunks are fetched whole first (their
   sizes are unknown until read).
3. **decode** (:mod:`.decode`): the payloads a decoder cannot read where they
   were staged packed (nvCOMP's own input alignment, asked once: in 5.3 only
   raw deflate needs it) and uncompressed chunks copied, by one copy kernel
   each; admitted payloads copied into the cache arena; then nvCOMP's batched
   C API per algorithm (``decode="capi"``; ``"python"``: nvCOMP's Python API),
   in calls whose temp fits the stream's share of ``decode_temp_budget``, into
   a temp buffer of the stream's own (two threads' decodes overlap). Before
   that, the crc32c of every staged chunk that carries one is computed by
   nvCOMP's batched CRC32-C and compared on the device: a chunk that fails it
   never reaches the decoder (a stand-in stream does: corrupt input is undefined
   behaviour in nvCOMP). One check per batch: a bad chunk (checksum or decode)
   raises :class:`~zarrdali.errors.ChunkError` naming its array and key, and no
   batch holding it is returned. Chunks nvCOMP
   cannot decode (Blosc) and arrays the fast path cannot read are decoded on
   the CPU into pinned memory and copied once per batch, with a one-time warning.
4. **gather** (:mod:`.gather`, sources in :mod:`.kernels`): one launch
   assembles ``[B, T, C, H, W]`` (byte swap, cast, fill values for missing chunks).

Streams and lifetimes: each thread has its own state (a stream, a reader,
the decoder's device arrays, pinned buffers) owned by the backend and released
by :meth:`GpuBackend.close`; the GPU feed's streams (:class:`~.feed.FeedStreams`)
are the backend's too, made once and reused by every epoch (CuPy's pool caches
freed blocks per stream), and ``close()`` ends with ``free_all_blocks()``.
Every call runs on the backend's device (``device_id``, ``LOCAL_RANK`` under
torchrun), in whichever thread; its host pool's threads select it when they
start. Nothing GPU-owning sits in a reference cycle: a dropped backend is
freed by reference counting, never by the collector. ``load_batch(..., stream=s)`` enqueues every
device operation of the batch on ``s`` and returns without synchronizing it;
the batch's temporary buffers are held in the state's in-flight ring
(:mod:`.lifetimes`) until an event recorded after the batch has completed.
The host waits only where it must: for its reads, and for the batch's check
(48 bytes the device writes after the crc32c and the decode; the gather is
already enqueued then), so that a corrupt chunk raises instead of reaching the
caller; in the GPU feed's loading threads not even for that: the feed reads
the check when it hands the batch to DALI (:func:`~.feed.deferring_checks`).
The batch's small tables reach the device in one copy (:mod:`.upload`).

VERIFICATION STATUS: restructured on a machine without a GPU. The host side
is unit-tested on the CPU (``tests/test_gpu_backend.py``,
``tests/test_gpu_decode.py``, ``tests/test_gpu_cache.py``,
``tests/test_gpu_read.py``): the plan and gather tables against the CPU
backend (the gather kernel's source compiled as host C++), the C API's
prototypes against the nvCOMP 5.3 headers, the pointer/status arithmetic,
the cache bookkeeping, the lifetimes with fake events, the pinned reader's
preads. :meth:`GpuBackend.load_batch` itself runs on a CPU stand-in of CuPy,
kvikIO and the C API (``tests/fakecuda.py``, ``tests/test_gpu_engine.py``):
bit for bit against the CPU backend for every codec, plain and sharded,
every dtype, missing chunks; corrupted zstd; the cache across epochs; the
stream/out contract; in-flight buffers held until their event. What that
stand-in cannot show (real CuPy, kvikIO and nvCOMP calls, stream ordering on
a device, speed) is unverified until the ``gpu``-marked tests and
``benchmarks/decode_gpu.py`` run on a GPU (the object-plan predecessor of
this code ran correctly on an H200).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from zarrdali.batch.backend import finish_all
from zarrdali.batch.finish import Finish
from zarrdali.batch.locate import ChunkLocations, ChunkLocator, Locators
from zarrdali.batch.plan import BatchPlan, natural_coords
from zarrdali.errors import BackendUnavailableError, LoaderClosedError
from zarrdali.gpu.cache import DEFAULT_PAGE_SIZE, GpuChunkCache, chunk_keys, insert_jobs
from zarrdali.gpu.decode import (
    DEFAULT_TEMP_BUDGET,
    BatchedDecoder,
    CApiUnavailableError,
    CrcWork,
    DecodeCheck,
    DecodeTemp,
    PythonApiDecoder,
    bad_chunk_error,
    crc_chunk_error,
    crc_table,
    decode_table,
    nvcomp_capi,
)
from zarrdali.gpu.describe import (
    FALLBACK_INPUT_ALIGN,
    BatchDescription,
    align_up,
    cacheable_payloads,
    describe_batch,
    finish_tables,
)
from zarrdali.gpu.epoch import CudaSourceRole
from zarrdali.gpu.feed import FeedStreams, check_sink, cuda_device_id
from zarrdali.gpu.gather import Kernels, launch_copies, launch_gather
from zarrdali.gpu.lifetimes import GuardedBuffers, InFlight
from zarrdali.gpu.read import (
    DEFAULT_GDS_THRESHOLD,
    DEFAULT_TASK_SIZE,
    KvikioReader,
    KvikioRemoteReader,
    OpenFiles,
    PinnedReader,
    SourceReader,
    configure_kvikio,
    io_details,
    io_mode,
    kvikio_remote_url,
    resolve_read_mode,
    source_error,
)
from zarrdali.gpu.upload import BatchUpload
from zarrdali.io.connect import make_source
from zarrdali.io.sources import MISSING, REMOTE_MAX_GAP, WHOLE, ByteSource, ObjectReadError
from zarrdali.store.open import ArrayLayout
from zarrdali.trace import annotate

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'zarrdali[cuda13]' (CUDA 13 driver) or 'zarrdali[cuda12]' (CUDA 12)"


def _has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package missing, or one that fails to import
        return False


def missing_gpu_requirements() -> list[str]:
    """What the GPU path lacks on this machine (empty: all there)."""
    missing = []
    for modules, package in (
        (("cupy",), "CuPy"),
        (("kvikio",), "kvikIO"),
        # the C API (libnvcomp, DALI's dependency) or the Python bindings (fallback)
        (("nvidia.libnvcomp", "nvidia.nvcomp"), "nvCOMP"),
        # hands the batches to torch (not a dependency of the CPU path)
        (("nvidia.dali",), "DALI"),
    ):
        if not any(_has_module(m) for m in modules):
            names = " or ".join(repr(m) for m in modules)
            missing.append(f"{package} (module {names})")
    if not missing:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                missing.append("a CUDA GPU (none visible)")
        except Exception as err:  # no driver: CUDARuntimeError, ImportError of libcuda
            missing.append(f"a working CUDA driver ({type(err).__name__}: {err})")
    return missing


def gpu_description() -> str:
    """A one-line description of the GPU for benchmark headers ("none" without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.stdout.strip().replace("\n", "; ") or "none"


# -- visibility ---------------------------------------------------------------
class TransferCounter:
    """Host↔device copies made by the GPU backend (thread-safe; read at any time).

    ``host_to_device``/``device_to_host``: copies of array data: the pinned
    reader's one staging copy per batch, the CPU-decoded fallback chunks' one
    copy per batch. ``control_to_device``: uploads of the batch's work lists,
    one per batch (:class:`~.upload.BatchUpload`: the copy jobs, the decode
    table: 40 bytes per chunk, the crc32c jobs: 40 per checked chunk, the four
    gather tables: about 72 bytes per tile plus 8 per chunk and 4 per entry of
    ``tile_chunks``, the finishing tables). File reads are counted as ``file_reads`` (coalesced
    reads; kvikIO's go storage→device, through its own bounce buffers in its
    compatibility mode).
    """

    _FIELDS = (
        "host_to_device",
        "host_to_device_bytes",
        "device_to_host",
        "device_to_host_bytes",
        "control_to_device",
        "control_to_device_bytes",
        "file_reads",
        "file_read_bytes",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            for name in self._FIELDS:
                setattr(self, name, 0)

    def _add(self, count: str, nbytes: int) -> None:
        with self._lock:
            setattr(self, count, getattr(self, count) + 1)
            setattr(self, f"{count}_bytes", getattr(self, f"{count}_bytes") + int(nbytes))

    def host_to_device_copy(self, nbytes: int) -> None:
        self._add("host_to_device", nbytes)

    def device_to_host_copy(self, nbytes: int) -> None:
        self._add("device_to_host", nbytes)

    def control_upload(self, nbytes: int) -> None:
        self._add("control_to_device", nbytes)

    def file_read(self, nbytes: int) -> None:
        self.file_reads_done(1, nbytes)

    def file_reads_done(self, count: int, nbytes: int) -> None:
        with self._lock:
            self.file_reads += int(count)
            self.file_read_bytes += int(nbytes)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: getattr(self, name) for name in self._FIELDS}

    def __repr__(self) -> str:
        return f"TransferCounter({self.snapshot()})"


_host_decode_warned: set[tuple[str, str]] = set()
_host_decode_lock = threading.Lock()


def warn_host_decode_once(store_name: str, layout: ArrayLayout) -> None:
    """Warn once per (store, array) that its chunks are decoded on the CPU."""
    with _host_decode_lock:
        if (store_name, layout.name) in _host_decode_warned:
            return
        _host_decode_warned.add((store_name, layout.name))
    compressor = layout.codec.compressor if layout.codec is not None else "unknown"
    warnings.warn(
        f"zarrdali: nvCOMP cannot decode the {compressor!r} codec of array {layout.name!r} "
        f"in {store_name!r}; its chunks are decoded on the CPU and copied to the GPU once "
        f"per batch, which is slower. `zarrdali prepare` rewrites the store with a "
        f"GPU-decodable codec (zstd or lz4).",
        UserWarning,
        stacklevel=3,
    )


def _source_gap(source: Any) -> int:
    """The gap below which a remote source merges byte ranges into one request."""
    inner = getattr(source, "inner", source)  # a CachedSource wraps the fetching one
    return int(getattr(inner, "max_gap", REMOTE_MAX_GAP))


def kvikio_io_mode() -> str:
    """``"gds"`` or ``"posix"``: :func:`zarrdali.gpu.read.io_mode`."""
    return io_mode()


DECODE_MODES = ("auto", "capi", "python")
DECODE_STREAMS = 2  # the feed's loading threads: decode_temp_budget is split among them
_capi_warned = False


@dataclass(frozen=True)
class _BatchWork:
    """One batch on one loading thread: what its read, decode and host-decode
    stages all take (the thread's state, the batch's plan, where its chunks
    are, its device description, the decoded buffer, the stream it runs on,
    the remote bytes fetched ahead)."""

    state: _ThreadState
    layouts: Sequence[ArrayLayout]
    plan: BatchPlan
    locations: ChunkLocations
    desc: BatchDescription
    decoded: Any
    stream: Any
    prefetched: dict[int, Any] | None = None


# -- the backend --------------------------------------------------------------
@dataclass(eq=False)
class _ThreadState:
    """What one thread's batches use: its stream and what is bound to it.

    Owned by the backend's list of states; used by one thread at a time
    (``thread``, a weak reference); :meth:`release` frees it all, the stream
    last. ``last_event``/``last_stream``: the end of this state's latest batch
    (a batch on another stream first waits for it: the decoder's arrays are
    shared by the state's batches).
    """

    reader: Any = None
    staging: GuardedBuffers | None = None  # kvikIO: device staging written off-stream
    host_pinned: GuardedBuffers | None = None  # the CPU-decoded region's pinned buffers
    control: GuardedBuffers | None = None  # pinned staging of the batch's packed tables
    decoder: BatchedDecoder | None = None
    py_decoder: PythonApiDecoder | None = None
    checksums: BatchedDecoder | None = None  # with the Python API: crc32c through the C API
    temp: DecodeTemp | None = None  # this stream's nvCOMP temp
    inflight: InFlight = field(default_factory=InFlight)
    last_event: Any = None
    last_stream: Any = None
    thread: weakref.ref | None = None
    stream: Any = None

    def release(self) -> None:
        """Wait for every batch in flight (their cache tickets finish), then drop
        the buffers, the reader, the decoders' device arrays, then the stream.
        Idempotent."""
        stream = self.stream
        if stream is None:
            return
        errors: list[BaseException] = []
        for step in (
            self.inflight.drain,
            stream.synchronize,
            *(
                x.close
                for x in (self.staging, self.host_pinned, self.control, self.reader)
                if x is not None
            ),
            *(x.close for x in (self.decoder, self.py_decoder, self.checksums) if x is not None),
            *([self.temp.close] if self.temp is not None else []),
        ):
            try:
                step()
            except BaseException as err:  # raised below, once everything is released
                errors.append(err)
        self.staging = self.host_pinned = self.control = self.reader = None
        self.decoder = self.py_decoder = self.checksums = self.temp = None
        self.last_event = self.last_stream = None
        self.thread = None
        self.stream = None
        if errors:
            raise errors[0]


@dataclass(frozen=True, eq=False)
class _Tables:
    """A batch's host-built decode inputs (see ``GpuBackend._tables``)."""

    decode: np.ndarray | None  # [N_ROWS, N] decode table (C API), None with the Python API
    bounds: np.ndarray  # its groups' column bounds
    crc: np.ndarray | None  # [N_CRC_FIELDS, K] crc32c jobs, None: none to check
    crc_max: int  # the largest chunk they read
    insert: np.ndarray | None  # [K, 3] cache admissions, None without a cache


def _finish_ticket(book: Any, ticket: Any, ok: bool, check: DecodeCheck | None) -> None:
    """The cache's ``finish`` once the batch's stream has passed it: its
    admissions are kept only if no chunk of the batch failed (a deferred check
    has been written by then)."""
    book.finish(ticket, ok and (check is None or not check.failed()))


_crc_warned_stores: set[str] = set()


def _warn_crc_unchecked(store_name: str) -> None:
    if store_name in _crc_warned_stores:
        return
    _crc_warned_stores.add(store_name)
    warnings.warn(
        f"zarrdali: the crc32c of {store_name!r}'s chunks is not checked on the GPU path: "
        f"nvCOMP's C API (libnvcomp, for its batched CRC32-C) is unavailable. A corrupt chunk "
        f"is then undefined behaviour in nvCOMP's decoder.",
        RuntimeWarning,
        stacklevel=4,
    )


def _retire_on_current_stream(cp: Any, inflight: InFlight, buffers: list[Any]) -> None:
    """Hold buffers replaced while in use until the current stream (which waited
    for the state's previous batches) passes this point."""
    inflight.push(cp.cuda.get_current_stream().record(), buffers)


class GpuBackend(CudaSourceRole):
    """Read → decode → gather on the device; ``load_batch`` returns a CuPy array.

    ``num_threads``: host threads (shard indexes, pinned reads, CPU-decoded
    chunks). ``read``: ``"auto"`` (kvikIO with GDS, else ``"pinned"``),
    ``"kvikio"`` or ``"pinned"`` (see :mod:`.read`). ``io_threads``,
    ``task_size``, ``gds_threshold``: kvikIO's settings (process-wide; the
    ``KVIKIO_*`` environment variables win; ``io_threads`` defaults to
    max(8, num_threads)). ``source``: where bytes come from (default: derived
    from the group's store; owned and closed by the backend); a remote source
    is read by :class:`~.read.SourceReader` (or kvikIO's remote file with
    ``read="kvikio"``); ``max_gap`` defaults to 64 KiB locally and to the
    source's own gap remotely (each staged read is then one request).
    ``decode``: ``"capi"`` (nvCOMP's batched C API; ``"auto"``/None: it when
    its symbols load, else the Python API with a warning) or ``"python"``.
    ``preconfigure`` (Python API only): hand nvCOMP
    the known sizes so decode does not synchronize. ``cache``: ``"gpu"`` keeps
    compressed chunk bytes on the device across batches and epochs, in at most
    ``cache_budget`` bytes (default: a quarter of the free device memory),
    in pages of ``cache_page_size`` bytes (payloads above it are not cached).
    ``batches_per_thread``: batches per thread whose buffers may be held while
    their stream runs (past it, the host waits for the oldest).
    ``decode_temp_budget``: bytes of nvCOMP temp for the decoding streams
    together: each thread's stream has its own buffer, of
    ``decode_temp_budget // DECODE_STREAMS`` (the feed's two loading threads;
    a batch's group is split into calls that fit).
    ``device_id``: the GPU (default: ``LOCAL_RANK`` under torchrun, else the
    calling thread's current device); every thread working for the backend
    makes it current.
    Safe to call from several threads: each has its own stream and buffers.
    """

    device = "cuda"
    # The loader's batches are finished (cast, normalized, missing values masked
    # and filled) by the gather kernel: load_batch(finish=...), not by DALI.
    finishes_in_gather = True

    def __init__(
        self,
        group,
        store_name: str,
        num_threads: int | None = None,
        *,
        read: str = "auto",
        decode: str | None = None,
        cache: str | None = None,
        cache_budget: int | None = None,
        cache_page_size: int = DEFAULT_PAGE_SIZE,
        io_threads: int | None = None,
        task_size: int | None = DEFAULT_TASK_SIZE,
        gds_threshold: int | None = DEFAULT_GDS_THRESHOLD,
        max_gap: int | None = None,
        preconfigure: bool = True,
        config_cache_size: int = 64,
        batches_per_thread: int = 4,
        source: ByteSource | None = None,
        decode_temp_budget: int = DEFAULT_TEMP_BUDGET,
        device_id: int | None = None,
    ) -> None:
        decode = "auto" if decode is None else decode
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if cache not in (None, "gpu"):
            raise ValueError(f"cache must be None or 'gpu', got {cache!r}")
        resolve_read_mode(read, "posix")  # validates the name before any GPU work
        missing = missing_gpu_requirements()
        if missing:
            raise BackendUnavailableError(
                "device='cuda' needs " + "; ".join(missing) + f". Install with {_INSTALL_HINT}, "
                "or pass device='cpu' to use the CPU path."
            )
        import cupy

        from zarrdali.batch.fallback import ZarrPythonChunkSource
        from zarrdali.batch.host import NumcodecsDecoder, PosixReader

        self._cp = cupy
        self._store = store_name
        # The loader's GPU, made current in every thread that works for it:
        # new threads start on device 0 (torchrun: LOCAL_RANK's GPU).
        self.device_id = cuda_device_id(cupy) if device_id is None else int(device_id)
        self._on_device = partial(cupy.cuda.Device, self.device_id)
        self.num_threads = num_threads or os.cpu_count() or 1
        self.batches_per_thread = batches_per_thread
        self._pool = ThreadPoolExecutor(
            self.num_threads,
            thread_name_prefix="zarrdali-gpu-host",
            initializer=cupy.cuda.runtime.setDevice,
            initargs=(self.device_id,),
        )
        # The feed's streams, made once and reused by every epoch (feed.py).
        self.feed_streams = FeedStreams(cupy, self._on_device)
        if source is None:
            source = make_source(group, store_name, map_fn=self._pool.map)
        # Local stores: preads or kvikIO. Remote: the source's concurrent range requests.
        self.source = source
        self.remote = bool(source.remote)
        if max_gap is None:  # remote: the source's gap, so each staged read is one request
            max_gap = _source_gap(source) if self.remote else 64 * 1024
        self.max_gap = max_gap
        self._files = OpenFiles()
        self.host_reader = PosixReader(store_name, max_gap=max_gap)
        self.host_decoder = NumcodecsDecoder(store_name)
        self.fallback = ZarrPythonChunkSource(group, store_name)
        self.transfers = TransferCounter()
        configure_kvikio(io_threads or max(8, self.num_threads), task_size, gds_threshold)
        self.io = io_details()
        self.io_mode = self.io["mode"]
        self.read_mode = resolve_read_mode(read, self.io_mode, self.remote)
        self._remote_url = None
        if self.remote and self.read_mode == "kvikio":
            self._remote_url = self._check_kvikio_remote()
        log.info("zarrdali GPU backend: %s reads, kvikIO %s", self.read_mode, self.io)
        self.decode_mode = self._decode_mode(decode)
        self.input_align = self._input_alignments()
        # nvCOMP's temp: a buffer per stream, each of an equal share of the budget.
        if decode_temp_budget < 1:
            raise ValueError(f"decode_temp_budget must be positive, got {decode_temp_budget}")
        self.decode_temp_share = max(1, int(decode_temp_budget) // DECODE_STREAMS)
        self._preconfigure = preconfigure
        self._config_cache_size = config_cache_size
        self._kernels = Kernels(cupy)
        # Every stream, buffer and decoder is owned by this list (not by
        # thread-locals, which are freed whenever a thread ends, stream first).
        self._states: list[_ThreadState] = []
        self._locators = Locators(store_name, map_fn=self._pool.map, source=self.source)
        self._states_lock = threading.Lock()
        self._closed = False
        self.cache: GpuChunkCache | None = None
        if cache == "gpu":
            with self._on_device():
                if cache_budget is None:
                    free, _ = cupy.cuda.runtime.memGetInfo()
                    cache_budget = max(free // 4, cache_page_size)
                self.cache = GpuChunkCache(cupy, int(cache_budget), page_size=cache_page_size)
        self.peak_device_bytes = 0

    def _check_kvikio_remote(self) -> str:
        """The store URL kvikIO's remote file reads from; raises when it cannot."""
        url = kvikio_remote_url(self._store)
        if url is None:
            raise ValueError(
                f"read='kvikio' on a remote store needs an s3:// or http(s):// URL (kvikIO's "
                f"remote file), not {self._store!r}; pass read='pinned' (the default) to read "
                f"it through its byte source."
            )
        try:
            from kvikio.remote_file import RemoteFile, is_remote_file_available
        except ImportError:  # a kvikIO without the module
            RemoteFile, is_remote_file_available = None, lambda: False
        if RemoteFile is None or not is_remote_file_available():
            raise BackendUnavailableError(
                "read='kvikio' on a remote store needs kvikIO built with remote-file "
                "support (kvikio.RemoteFile); pass read='pinned' (the default)."
            )
        return url

    def _decode_mode(self, decode: str) -> str:
        global _capi_warned
        if decode == "python":
            importlib.import_module("nvidia.nvcomp")  # its import-time set-up happens now
            return "python"
        try:
            nvcomp_capi()
            return "capi"
        except CApiUnavailableError as err:
            if decode == "capi":
                raise BackendUnavailableError(
                    f"decode='capi' needs nvCOMP's batched C API: {err}. Install "
                    f"nvidia-libnvcomp-cu13 (or -cu12) 5.x, or pass decode='python'."
                ) from err
            if not _capi_warned:
                _capi_warned = True
                warnings.warn(
                    f"zarrdali: nvCOMP's batched C API is unavailable ({err}); decoding "
                    f"through its Python API, one object per chunk.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            importlib.import_module("nvidia.nvcomp")
            return "python"

    def _input_alignments(self) -> dict[str, int]:
        """Each algorithm's input alignment, from ``GetRequiredAlignments`` (a host
        call, made once per process): payloads are packed only where it needs.
        Without the C API (nvCOMP's Python API decodes), the headers' bounds."""
        try:
            api = nvcomp_capi()
        except CApiUnavailableError:
            return dict(FALLBACK_INPUT_ALIGN)
        return {algorithm: inp for algorithm, (inp, _, _) in api.alignments.items()}

    # -- per-thread resources ------------------------------------------------
    def _state(self) -> _ThreadState:
        """The calling thread's state: its own, else one whose thread has ended
        (the loader's prefetch threads live one epoch), else a new one."""
        me = threading.current_thread()
        with self._states_lock:
            if self._closed:
                raise LoaderClosedError(f"the GPU backend of {self._store!r} is closed")
            free = None
            for state in self._states:
                owner = state.thread() if state.thread is not None else None
                if owner is me:
                    return state
                if free is None and (owner is None or not owner.is_alive()):
                    free = state
            if free is None:
                free = self._new_state()
                self._states.append(free)
            else:  # a thread that ended in an error may have left work queued
                free.inflight.drain()
                free.stream.synchronize()
            free.thread = weakref.ref(me)
            return free

    def _new_state(self) -> _ThreadState:
        import cupyx

        cp = self._cp
        state = _ThreadState(stream=cp.cuda.Stream(non_blocking=True))
        state.inflight.max_entries = self.batches_per_thread

        def pinned(n: int) -> np.ndarray:
            return cupyx.empty_pinned(align_up(n, 1 << 20), dtype=np.uint8)

        state.host_pinned = GuardedBuffers(pinned, n=2)
        if self.remote and self.read_mode == "pinned":
            state.reader = SourceReader(
                self._store,
                self.source,
                alloc_pinned=pinned,
                on_read=self.transfers.file_reads_done,
                on_copy=self.transfers.host_to_device_copy,
            )
        elif self.read_mode == "kvikio":
            if self.remote:
                state.reader = KvikioRemoteReader(
                    self._store,
                    self._remote_url,
                    on_read=self.transfers.file_reads_done,
                    on_copy=self.transfers.host_to_device_copy,
                )
            else:
                state.reader = KvikioReader(self._store, on_read=self.transfers.file_reads_done)
            state.staging = GuardedBuffers(lambda n: cp.empty(n, dtype=cp.uint8), n=2)
        else:
            state.reader = PinnedReader(
                self._store,
                self._files,
                self._pool,
                self.num_threads * 4,
                alloc_pinned=pinned,
                on_read=self.transfers.file_reads_done,
                on_copy=self.transfers.host_to_device_copy,
            )

        state.control = GuardedBuffers(
            lambda n: cupyx.empty_pinned(align_up(n, 1 << 16), dtype=np.uint8), n=2
        )
        # The decoder refers to the state's in-flight ring, not to the state
        # (which holds the decoder): no reference cycle.
        retire = partial(_retire_on_current_stream, cp, state.inflight)
        if self.decode_mode == "capi":
            state.temp = DecodeTemp(cp, self.decode_temp_share)
            state.decoder = BatchedDecoder(
                cp, nvcomp_capi(), retire, state.temp, kernels=self._kernels
            )
        else:
            state.py_decoder = PythonApiDecoder(
                cp,
                self._store,
                preconfigure=self._preconfigure,
                config_cache_size=self._config_cache_size,
            )
            try:  # crc32c: nvCOMP's C API, where it loads (the decoder is its Python API)
                api = nvcomp_capi()
            except CApiUnavailableError:
                api = None
            if api is not None:
                state.temp = DecodeTemp(cp, 1)
                state.checksums = BatchedDecoder(cp, api, retire, state.temp, kernels=self._kernels)
        return state

    # -- public API ------------------------------------------------------------
    def locator(self, layouts: Sequence[ArrayLayout]) -> ChunkLocator:
        """The (cached) locator of these layouts' chunks."""
        return self._locators.get(layouts)

    def describe(
        self,
        layouts: Sequence[ArrayLayout],
        plan: BatchPlan,
        locations: ChunkLocations,
        cached: np.ndarray | None = None,
    ) -> BatchDescription:
        """The batch's device work, described on the host (numpy; no GPU call)."""
        return describe_batch(
            layouts,
            plan,
            locations,
            store_name=self._store,
            max_gap=self.max_gap,
            cached=cached,
            input_align=self.input_align,
        )

    def probe(self, layouts: Sequence[ArrayLayout]) -> None:
        """Read the first storage object's row of every variable (its shard index, or
        its size; nothing for a remote unsharded chunk), on the host, no GPU call:
        access errors and broken shards surface before training starts. The rows
        stay cached."""
        from zarrdali.batch.plan import plan_batch

        plan = plan_batch(
            layouts, np.zeros((1, 3), dtype=np.int64), n_frames=1, frame_step=1, tile_hw=(1, 1)
        )
        self.locator(layouts).locate(plan)

    def stats(self) -> dict[str, int]:
        """Requests, bytes and in-flight depth of the remote source (empty for local)."""
        return self.source.stats()

    def cache_stats(self) -> dict[str, int] | None:
        """The GPU chunk cache's counters and occupancy (None without a cache)."""
        return None if self.cache is None else self.cache.stats()

    def memory_stats(self) -> dict[str, int]:
        """Device memory of CuPy's pool now and at its peak after any batch so
        far (the cache arena included), and the cache's capacity."""
        with self._on_device():
            now = int(self._cp.get_default_memory_pool().total_bytes())
        return {
            "pool_bytes": now,
            "peak_pool_bytes": max(self.peak_device_bytes, now),
            "cache_capacity": 0 if self.cache is None else self.cache.book.capacity,
        }

    def load_batch(
        self,
        layouts: Sequence[ArrayLayout],
        plan: BatchPlan,
        *,
        out: Any = None,
        stream: Any = None,
        before_write: Callable[[], None] | None = None,
        finish: Finish | None = None,
    ) -> Any:
        """The batch ``[B, T, C, H, W]`` as a CuPy array in the batch dtype.

        Runs on the backend's device (``device_id``), whichever thread calls it.
        ``stream`` (a CuPy stream): every device operation of the batch is
        enqueued on it and the method returns without synchronizing it (the
        result is ready once ``stream`` has passed it). Without it, this
        thread's own stream is used and synchronized before returning.
        ``out``: a CuPy array of ``plan.out_shape`` and the batch dtype to
        gather into (returned); ``before_write()`` is called (with ``stream``
        current) just before the first operation that writes ``out`` is
        enqueued, after the batch's read and decode: the GPU feed makes the
        stream wait there for DALI's copy of the buffer's previous batch.
        ``finish`` (no flags: DALI augments): the batch is float32, cast,
        normalized and checked for missing values in the gather kernel's pass,
        as the CPU path finishes its pieces; ``finish.mask_arrays`` (one uint8 array
        shaped like the batch) gets the validity mask in the same pass.
        Raises :class:`ChunkError` for a chunk that cannot be read, fails its
        crc32c or cannot be decoded: after the gather is enqueued, the host
        waits for the batch's check (a few bytes written after the decode).
        With ``stream``, inside :func:`~.feed.deferring_checks` (the GPU feed's
        prefetch threads), it does not: the :class:`~.decode.DecodeCheck` goes
        to that list, and whoever hands the batch on raises for it (the feed,
        when DALI asks for the batch), so that loading threads never wait for
        their decodes.
        """
        if plan.frame_split is not None:  # the GPU pipeline slices input/target itself
            raise ValueError("the GPU backend assembles the whole window: plan without frame_split")
        with self._on_device():
            return self._load_batch(layouts, plan, out, stream, before_write, finish)

    def _load_batch(
        self,
        layouts: Sequence[ArrayLayout],
        plan: BatchPlan,
        out: Any,
        stream: Any,
        before_write: Callable[[], None] | None,
        finish: Finish | None = None,
    ) -> Any:
        cp = self._cp
        state = self._state()
        gather_finish, mask = None, None
        if finish is not None:  # checked before anything is enqueued
            masks = finish.mask_arrays or ()
            gather_finish = finish_tables(layouts, finish, masks=bool(masks))
            mask = masks[0] if masks else None
        own = stream is None
        if own:
            stream = state.stream
        with annotate("zarrdali.describe"):
            locations = self.locator(layouts).locate(plan)
            prefetched = None
            if self.remote:  # unsharded chunks' sizes are known once they are read
                locations, prefetched = self._fetch_whole(layouts, locations)
            ticket, rows, lengths, cached = None, None, None, None
            if self.cache is not None:
                book = self.cache.book
                rows, lengths = cacheable_payloads(layouts, plan, locations)
                ticket = book.begin(chunk_keys(book, layouts, plan, rows), lengths)
                cached = np.full(plan.n_chunks, -1, dtype=np.int64)
                cached[rows] = ticket.hit_offset
            try:
                desc = self.describe(layouts, plan, locations, cached)
                tables = self._tables(state, plan, desc, ticket, rows, lengths)
            except BaseException:
                if ticket is not None:  # nothing enqueued: its slots are free at once
                    self.cache.book.finish(ticket, ok=False)
                raise
            # Every small table of the batch, in one host-to-device copy.
            upload = BatchUpload(cp, state.control, self.transfers.control_upload)
            upload.add(
                *desc.gather.arrays, *(() if gather_finish is None else gather_finish.arrays)
            )
            upload.add(tables.decode, tables.crc, tables.insert, desc.pack_jobs, desc.copy_jobs)
        keep: list[Any] = []
        staged: int | None = None  # the kvikIO staging ring's buffer this batch holds
        check: DecodeCheck | None = None
        ok = False
        with stream:
            try:
                for v in np.unique(plan.chunk_var[desc.host_chunks]).tolist():
                    warn_host_decode_once(self._store, layouts[v])  # zarr-python warns itself
                state.inflight.retire()
                if state.last_event is not None and state.last_stream is not stream:
                    stream.wait_event(state.last_event)  # the decoder's arrays are shared
                keep.append(upload.send(stream))
                decoded = cp.empty(max(desc.decoded_nbytes, 8), dtype=cp.uint8)
                keep.append(decoded)
                out = self._output(plan, desc, out, finish is not None)
                if mask is not None:
                    self._check_mask(plan, mask)
                work = _BatchWork(
                    state, layouts, plan, locations, desc, decoded, stream, prefetched
                )
                if len(desc.device_chunks):
                    staged, check = self._read_and_decode(work, keep, tables, upload)
                if desc.host_nbytes:
                    self._decode_on_host(work)
                with annotate("zarrdali.gather"):
                    if before_write is not None:
                        before_write()
                    keep += launch_gather(
                        self._kernels,
                        desc.gather,
                        decoded,
                        out,
                        upload,
                        finish=gather_finish,
                        mask=mask,
                    )
                if check is not None:
                    sink = None if own else check_sink()
                    if sink is not None:  # raised for where the batch is handed on
                        sink.append(check)
                    else:  # the one host wait on the device: a few bytes
                        with annotate("zarrdali.check"):
                            check.raise_if_bad()
                ok = True
            finally:
                event = stream.record()
                state.last_event, state.last_stream = event, stream
                if staged is not None:
                    state.staging.release(staged, event)
                done = None
                if ticket is not None:
                    done = partial(_finish_ticket, self.cache.book, ticket, ok, check)
                state.inflight.push(event, keep, done)
        if own:
            stream.synchronize()
            state.inflight.retire()
        self.peak_device_bytes = max(
            self.peak_device_bytes, int(cp.get_default_memory_pool().total_bytes())
        )
        return out

    def _tables(
        self,
        state: _ThreadState,
        plan: BatchPlan,
        desc: BatchDescription,
        ticket: Any,
        rows: np.ndarray | None,
        lengths: np.ndarray | None,
    ) -> _Tables:
        """The batch's decode table, crc32c jobs and cache admissions, on the host."""
        groups = desc.decode_groups
        table, bounds = decode_table(groups)
        crc, crc_max = None, 0
        if len(desc.crc_jobs):
            if state.decoder is not None or state.checksums is not None:
                # with the Python API nothing is gated: the check comes before its decode
                crc = crc_table(desc.crc_jobs, groups if state.decoder is not None else [], bounds)
                crc_max = int(desc.crc_jobs[:, 1].max())
            else:
                _warn_crc_unchecked(self._store)
        insert = None
        if ticket is not None:
            insert = insert_jobs(
                plan.n_chunks,
                desc.read_chunks,
                desc.staging.payload_offset,
                rows,
                ticket.insert_offset,
                lengths,
            )
        return _Tables(
            decode=table if state.decoder is not None else None,
            bounds=bounds,
            crc=crc,
            crc_max=crc_max,
            insert=insert,
        )

    def close(self) -> None:
        """Release the backend's GPU resources, in dependency order; idempotent.

        The host thread pool is joined first (its threads fill pinned buffers),
        then every state is released (the batches in flight waited for, their
        cache tickets finished; buffers, reader and decoder arrays dropped; the
        stream last), then the feed's streams (synchronized, dropped), nvCOMP's
        temp, the cache arena, the compiled kernels and the open files. Last,
        the free blocks of CuPy's device and pinned memory pools are released
        (``free_all_blocks()``: every free block of this device's pool, its
        streams' arenas included; blocks in use elsewhere are untouched), so
        the memory goes back to the device for torch and others. Call it when
        no thread is in :meth:`load_batch`: ``ZarrLoader.close()`` closes its
        epoch (joining the prefetch threads) before its backend.
        """
        with self._states_lock:
            if self._closed:
                return
            self._closed = True
            states, self._states = self._states, []
        errors: list[BaseException] = []

        def step(fn: Callable[[], Any]) -> None:
            try:
                fn()
            except BaseException as err:  # raised below, once everything is released
                errors.append(err)

        with self._on_device():
            step(partial(self._pool.shutdown, wait=True, cancel_futures=True))
            step(self.host_reader.close)
            for state in states:
                step(state.release)
            states.clear()
            step(self.feed_streams.close)
            if self.cache is not None:
                step(self.cache.close)
            self._kernels.clear()
            step(self._files.close)
            step(self.source.close)
            cp = self._cp
            step(cp.get_default_memory_pool().free_all_blocks)
            step(cp.get_default_pinned_memory_pool().free_all_blocks)
        if errors:
            raise errors[0]

    # -- stages ----------------------------------------------------------------
    def _fetch_chunks(
        self,
        layouts: Sequence[ArrayLayout],
        locations: ChunkLocations,
        chunks: np.ndarray,
        prefetched: dict[int, Any] | None = None,
    ) -> list[Any]:
        """The stored bytes of ``chunks`` from the remote source, in one concurrent
        fetch (those of objects in ``prefetched`` cut from there)."""
        file = locations.file[chunks]
        out: list[Any] = [None] * len(chunks)
        todo = list(range(len(chunks)))
        if prefetched:
            offsets, sizes = locations.offset[chunks].tolist(), locations.nbytes[chunks].tolist()
            todo = []
            for k, f in enumerate(file.tolist()):
                whole = prefetched.get(f)
                if whole is None:
                    todo.append(k)
                else:
                    out[k] = memoryview(whole)[offsets[k] : offsets[k] + sizes[k]]
        if todo:
            pick = chunks[np.asarray(todo, dtype=np.int64)]
            try:
                got = self.source.read_chunks(
                    locations.paths,
                    locations.file[pick],
                    locations.offset[pick],
                    locations.nbytes[pick],
                )
            except ObjectReadError as err:
                raise source_error(err, self._store, layouts, locations) from err
            for k, data in zip(todo, got, strict=True):
                out[k] = data
        return out

    def _fetch_whole(
        self, layouts: Sequence[ArrayLayout], locations: ChunkLocations
    ) -> tuple[ChunkLocations, dict[int, Any] | None]:
        """A remote store's unsharded chunks (size ``WHOLE``: unknown until read),
        fetched whole in one concurrent call: the locations with their sizes (a
        chunk never written: missing, the fill value), and their bytes by file."""
        whole = np.flatnonzero(locations.present & (locations.nbytes == WHOLE))
        if not len(whole):
            return locations, None
        buffers = self._fetch_chunks(layouts, locations, whole)
        sizes = np.array(
            [MISSING if b is None else memoryview(b).nbytes for b in buffers], dtype=np.int64
        )
        gone = whole[sizes == MISSING]
        file, nbytes, missing = (
            locations.file.copy(),
            locations.nbytes.copy(),
            locations.missing.copy(),
        )
        nbytes[whole] = sizes
        file[gone], missing[gone] = -1, True
        files = locations.file[whole].tolist()
        prefetched = {f: b for f, b in zip(files, buffers, strict=True) if b is not None}
        return replace(locations, file=file, nbytes=nbytes, missing=missing), prefetched

    def _output(
        self, plan: BatchPlan, desc: BatchDescription, out: Any, finished: bool = False
    ) -> Any:
        dtype = np.dtype(np.float32 if finished else desc.gather.out_dtype)
        if out is None:
            return self._cp.empty(plan.out_shape, dtype=dtype)
        if tuple(out.shape) != tuple(plan.out_shape) or np.dtype(out.dtype) != dtype:
            raise ValueError(
                f"out must be a CuPy array of shape {plan.out_shape} and dtype {dtype}, "
                f"got {tuple(out.shape)} {out.dtype}"
            )
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        return out

    @staticmethod
    def _check_mask(plan: BatchPlan, mask: Any) -> None:
        if (
            tuple(mask.shape) != tuple(plan.out_shape)
            or np.dtype(mask.dtype) not in (np.dtype(np.uint8), np.dtype(bool))
            or not mask.flags.c_contiguous
        ):
            raise ValueError(
                f"the mask must be a C-contiguous uint8 CuPy array of shape {plan.out_shape}, "
                f"got {tuple(mask.shape)} {mask.dtype}"
            )

    def _read_and_decode(
        self, work: _BatchWork, keep: list[Any], tables: _Tables, upload: BatchUpload
    ) -> tuple[int | None, DecodeCheck | None]:
        """Read the batch's payloads into staging, pack them, copy admitted ones
        into the cache, check crc32c and decode every group; ``(staging ring
        slot, check)``."""
        state, layouts, plan, locations = work.state, work.layouts, work.plan, work.locations
        desc, decoded, stream, prefetched = work.desc, work.decoded, work.stream, work.prefetched
        cp = self._cp
        s = desc.staging
        staged = None
        staging = None
        with annotate("zarrdali.read"):
            if s.n_reads:
                if state.staging is not None:  # kvikIO writes outside stream order
                    staged, staging = state.staging.acquire(s.total_nbytes)
                else:  # the pinned reader copies in stream order
                    staging = cp.empty(s.total_nbytes, dtype=cp.uint8)
                    keep.append(staging)
                extra = {} if not self.remote else {"prefetched": prefetched}
                try:
                    state.reader.read(layouts, locations, s, staging, stream, **extra)
                except BaseException:
                    if staged is not None:
                        state.staging.release(staged, None)
                    raise
        arena = None if self.cache is None else self.cache.arena
        with annotate("zarrdali.decode"):
            kernels = self._kernels
            keep.append(launch_copies(kernels, staging, staging, desc.pack_jobs, upload))
            keep.append(launch_copies(kernels, staging, decoded, desc.copy_jobs, upload))
            if tables.insert is not None:
                keep.append(launch_copies(kernels, staging, arena, tables.insert, upload))
            groups = desc.decode_groups
            crc = None
            if tables.crc is not None:
                explain_crc = partial(crc_chunk_error, self._store, layouts, plan, desc.crc_chunks)
                n = len(desc.crc_chunks)
                crc = CrcWork(upload(tables.crc), n, staging, tables.crc_max, explain_crc)
            explain = partial(bad_chunk_error, self._store, layouts, plan, groups, tables.bounds)
            bases = tuple(0 if b is None else b.data.ptr for b in (staging, arena))
            if state.decoder is None:  # nvCOMP's Python API
                if crc is not None:  # its crc32c checked first, on the host's word
                    table, bounds = decode_table([])
                    check, buffers = state.checksums.decode(
                        [], upload(table), bounds, bases, decoded.data.ptr, stream, explain, crc
                    )
                    keep += buffers
                    with annotate("zarrdali.check"):
                        check.raise_if_bad()
                if groups:
                    state.py_decoder.decode(
                        layouts, plan, groups, (staging, arena), decoded, stream
                    )
                return staged, None
            if not groups and crc is None:
                return staged, None
            check, buffers = state.decoder.decode(
                groups,
                upload(tables.decode),
                tables.bounds,
                bases,
                decoded.data.ptr,
                stream,
                explain,
                crc,
            )
            keep += buffers
            return staged, check

    def _decode_on_host(self, work: _BatchWork) -> None:
        """Decode the host region (numcodecs' and zarr-python's chunks) into one
        pinned host buffer, then one copy to the device."""
        state, layouts, plan, locations = work.state, work.layouts, work.plan, work.locations
        desc, decoded, stream, prefetched = work.desc, work.decoded, work.stream, work.prefetched
        region_start, region_nbytes = desc.device_nbytes, desc.host_nbytes
        k, host = state.host_pinned.acquire(region_nbytes)
        chunk_var = plan.chunk_var
        coords4 = plan.chunk_coords

        def view(i: int, decoded_dtype: np.dtype) -> np.ndarray:
            layout = layouts[chunk_var[i]]
            start = int(desc.slots[i]) - region_start
            raw = host[start : start + layout.chunk_nbytes]
            return raw.view(decoded_dtype).reshape(layout.chunk_shape)

        # Numcodecs' chunks: coalesced preads (remote: the source's concurrent
        # requests), each member decoded into its slot.
        reader, decoder = self.host_reader, self.host_decoder
        if not self.remote:
            only_host = np.zeros_like(locations.fast)
            only_host[desc.host_chunks] = True
            reads, chunk_of = reader.reads(locations, only_host)

        def run_reads(rs: range) -> None:
            for r in rs:
                f, start = int(reads.file[r]), int(reads.start[r])
                array = layouts[locations.file_var[f]].name
                buf = reader.pread(
                    locations.paths[f], start, int(reads.nbytes[r]), array, locations.keys[f]
                )
                for i in chunk_of[reads.bounds[r] : reads.bounds[r + 1]].tolist():
                    layout = layouts[chunk_var[i]]
                    lo = int(locations.offset[i]) - start
                    data = buf[lo : lo + int(locations.nbytes[i])]
                    out = view(i, layout.codec.stored_dtype(layout.dtype))
                    decoder.decode(layout, coords4[i], data, out=out)

        def run_fallback(i: int) -> None:
            layout = layouts[chunk_var[i]]
            chunk = self.fallback.read_decoded(layout, natural_coords(layout, coords4[i]))
            view(i, layout.dtype)[...] = chunk

        def run_fetched(chunks: list[int], buffers: list[Any]) -> None:
            for i, data in zip(chunks, buffers, strict=True):
                layout = layouts[chunk_var[i]]
                out = view(i, layout.codec.stored_dtype(layout.dtype))
                decoder.decode(layout, coords4[i], data, out=out)

        tasks: list[Any] = []
        if self.remote:  # one concurrent fetch (or the whole objects read already)
            chunks = desc.host_chunks.tolist()
            buffers = self._fetch_chunks(layouts, locations, desc.host_chunks, prefetched)
            n_tasks = max(1, min(len(chunks), self.num_threads * 4))
            tasks += [
                partial(run_fetched, chunks[j::n_tasks], buffers[j::n_tasks])
                for j in range(n_tasks)
                if chunks[j::n_tasks]
            ]
        else:
            n_tasks = max(1, min(len(reads), self.num_threads * 4))
            tasks += [partial(run_reads, range(j, len(reads), n_tasks)) for j in range(n_tasks)]
        tasks += [partial(run_fallback, i) for i in desc.fallback_chunks.tolist()]
        try:  # the buffer is reused: no task may still write it when this returns
            finish_all([self._pool.submit(task) for task in tasks])
        except BaseException:
            state.host_pinned.release(k, None)
            raise
        target = decoded[region_start : region_start + region_nbytes]
        target.set(host[:region_nbytes], stream=stream)
        state.host_pinned.release(k, stream.record())
        self.transfers.host_to_device_copy(region_nbytes)
