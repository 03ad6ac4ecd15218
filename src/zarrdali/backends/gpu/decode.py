"""Decode stage of the GPU engine: nvCOMP's batched C API, one call per codec per batch.

:class:`NvcompCApi` binds the batched decompression functions of
``libnvcomp.so.5`` (the ``nvidia-libnvcomp`` wheel DALI pins; loaded with
``nvidia.libnvcomp.load_library()``) through ctypes, with the prototypes of the
nvCOMP 5.3 headers (``include/nvcomp/{zstd,lz4,gzip,deflate}.h``)::

    nvcompStatus_t nvcompBatched<Alg>DecompressGetTempSizeAsync(
        size_t num_chunks, size_t max_uncompressed_chunk_bytes,
        <Alg>DecompressOpts_t opts, size_t* temp_bytes,
        size_t max_total_uncompressed_bytes)
    nvcompStatus_t nvcompBatched<Alg>DecompressAsync(
        const void* const* d_in_ptrs, const size_t* d_in_bytes,
        const size_t* d_out_buffer_bytes, size_t* d_actual_out_bytes,
        size_t num_chunks, void* d_temp, size_t temp_bytes,
        void* const* d_out_ptrs, <Alg>DecompressOpts_t opts,
        nvcompStatus_t* d_statuses, cudaStream_t stream)

(opts: 64-byte structs passed by value; all zeros is each algorithm's default).

:class:`BatchedDecoder` decodes a batch with O(1) Python: the host builds one
``[5, N]`` int64 table of the batch's decode groups (:func:`decode_table`:
payload source, offset and size, output offset and size per chunk), uploads
it once, and the device computes the pointer arrays from it
(:func:`device_pointers`: ``base + offset``, with CuPy). Then
``nvcompBatched<Alg>DecompressAsync`` per algorithm, on the batch's stream, in
calls whose temp fits a budget (:func:`call_bounds`; nvCOMP's zstd temp is
about 3x the decoded bytes), into one temp buffer the backend's streams share
in event order (:class:`DecodeTemp`), and into status and actual-size arrays
the decoder owns and grows when a batch needs more (released by
:meth:`BatchedDecoder.close`).
Statuses and actual sizes are checked once per batch (:func:`first_bad`: the
first bad chunk and the count, 16 bytes copied to pinned memory):
:meth:`DecodeCheck.raise_if_bad` names the array and key of the first bad chunk
in a :class:`~zarrdali.errors.ChunkError`.

:class:`PythonApiDecoder` is the fallback (``GpuBackend(decode="python")``, or
when the C API cannot be loaded): nvCOMP's Python ``Codec.decode``, one
``nvcomp.Array`` per chunk.

VERIFIED WITHOUT A GPU (``tests/test_gpu_decode.py``): the prototypes and
struct layouts against the 5.3 headers (parsed, and compiled with g++:
function types, ``sizeof``/``offsetof``, enum values, default opts = zeros),
the temp-size and alignment queries through the real library (they run
without a device), the table, pointer and status arithmetic with numpy. The
whole decode path as the backend drives it runs on a CPU stand-in
(``tests/fakecuda.py``: numpy arrays at real host addresses, the batched
call emulated on those addresses with numcodecs; ``tests/test_gpu_engine.py``):
it checks which pointers, sizes and counts reach the call, the status check
and the error naming the chunk. NOT VERIFIED until a GPU runs the
``gpu``-marked tests: nvCOMP's decompression itself, the same arithmetic in
CuPy, and the Python-API fallback after the move.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...batchplan import BatchPlan
from ...errors import ChunkError
from ...store import ArrayLayout
from .plan import IN_CACHE, IN_STAGING, DecodeGroup

# -- the C API ------------------------------------------------------------------------
# nvcompStatus_t (include/nvcomp/shared_types.h)
STATUS_NAMES = {
    0: "nvcompSuccess",
    10: "nvcompErrorInvalidValue",
    11: "nvcompErrorNotSupported",
    12: "nvcompErrorCannotDecompress",
    13: "nvcompErrorBadChecksum",
    14: "nvcompErrorCannotVerifyChecksums",
    15: "nvcompErrorOutputBufferTooSmall",
    16: "nvcompErrorWrongHeaderLength",
    17: "nvcompErrorAlignment",
    18: "nvcompErrorChunkSizeTooLarge",
    19: "nvcompErrorCannotCompress",
    20: "nvcompErrorWrongInputLength",
    21: "nvcompErrorBatchSizeTooLarge",
    22: "nvcompErrorSubChunkCountTooLarge",
    23: "nvcompErrorSubChunkCountTooSmall",
    24: "nvcompErrorOutputBufferAlignmentTooSmall",
    1000: "nvcompErrorCudaError",
    10000: "nvcompErrorInternal",
}
NVCOMP_DECOMPRESS_BACKEND_DEFAULT = 0


def status_name(status: int) -> str:
    return STATUS_NAMES.get(int(status), f"nvcompStatus {int(status)}")


class ZstdDecompressOpts(ctypes.Structure):
    """``nvcompBatchedZstdDecompressOpts_t``."""

    _fields_ = [("backend", ctypes.c_int), ("reserved", ctypes.c_char * 60)]


class LZ4DecompressOpts(ctypes.Structure):
    """``nvcompBatchedLZ4DecompressOpts_t``."""

    _fields_ = [
        ("backend", ctypes.c_int),
        ("sort_before_hw_decompress", ctypes.c_int),
        ("data_type", ctypes.c_int),  # NVCOMP_TYPE_CHAR = 0
        ("bitshuffle_mode", ctypes.c_int),  # NVCOMP_BITSHUFFLE_NONE = 0
        ("reserved", ctypes.c_char * 48),
    ]


class GzipDecompressOpts(ctypes.Structure):
    """``nvcompBatchedGzipDecompressOpts_t``."""

    _fields_ = [
        ("backend", ctypes.c_int),
        ("algorithm", ctypes.c_int),  # NVCOMP_GZIP_DECOMPRESS_ALGORITHM_NAIVE = 0
        ("sort_before_hw_decompress", ctypes.c_int),
        ("reserved", ctypes.c_char * 52),
    ]


class DeflateDecompressOpts(ctypes.Structure):
    """``nvcompBatchedDeflateDecompressOpts_t``."""

    _fields_ = [
        ("backend", ctypes.c_int),
        ("sort_before_hw_decompress", ctypes.c_int),
        ("reserved", ctypes.c_char * 56),
    ]


class AlignmentRequirements(ctypes.Structure):
    """``nvcompAlignmentRequirements_t``."""

    _fields_ = [("input", ctypes.c_size_t), ("output", ctypes.c_size_t), ("temp", ctypes.c_size_t)]


# nvCOMP algorithm names (plan.NVCOMP_ALGORITHMS' values) -> decompression opts.
DECOMPRESS_OPTS: dict[str, type[ctypes.Structure]] = {
    "Zstd": ZstdDecompressOpts,
    "LZ4": LZ4DecompressOpts,
    "Gzip": GzipDecompressOpts,
    "Deflate": DeflateDecompressOpts,
}

_size_t, _ptr = ctypes.c_size_t, ctypes.c_void_p


def prototypes(algorithm: str) -> dict[str, list[Any]]:
    """The ctypes argument types of the three functions bound per algorithm (the
    return type of each is ``nvcompStatus_t``, a C int)."""
    opts = DECOMPRESS_OPTS[algorithm]
    name = f"nvcompBatched{algorithm}Decompress"
    return {
        f"{name}GetTempSizeAsync": [_size_t, _size_t, opts, ctypes.POINTER(_size_t), _size_t],
        f"{name}GetRequiredAlignments": [opts, ctypes.POINTER(AlignmentRequirements)],
        f"{name}Async": [
            _ptr,  # const void* const* device_compressed_chunk_ptrs
            _ptr,  # const size_t* device_compressed_chunk_bytes
            _ptr,  # const size_t* device_uncompressed_buffer_bytes
            _ptr,  # size_t* device_uncompressed_chunk_bytes (actual)
            _size_t,  # num_chunks
            _ptr,  # void* device_temp_ptr
            _size_t,  # temp_bytes
            _ptr,  # void* const* device_uncompressed_chunk_ptrs
            opts,  # decompress_opts, by value
            _ptr,  # nvcompStatus_t* device_statuses
            _ptr,  # cudaStream_t
        ],
    }


class CApiUnavailableError(RuntimeError):
    """libnvcomp or one of its batched decompression symbols cannot be loaded."""


def load_nvcomp_library() -> ctypes.CDLL:
    """``libnvcomp.so.5`` as the ``nvidia-libnvcomp`` wheel ships it; raises
    :class:`OSError` when it cannot be loaded.

    The wheel's ``load_library()`` swallows the loader's ``OSError`` and returns
    None when neither its own copy nor a system one loads (``nvidia/libnvcomp/
    load.py`` of 5.3.0.16): that is the library being unavailable too.
    """
    try:
        from nvidia import libnvcomp
    except ImportError:
        libnvcomp = None
    if libnvcomp is not None:
        lib = libnvcomp.load_library()
        if lib is None:
            raise OSError(
                "nvidia.libnvcomp.load_library() found no libnvcomp.so.5 (neither the "
                "wheel's copy nor a system one loads)"
            )
        return lib
    return ctypes.CDLL("libnvcomp.so.5")  # a system install (LD_LIBRARY_PATH)


class NvcompCApi:
    """nvCOMP's batched decompression functions, bound once per process.

    Our own function objects (``lib[name]``, not ``lib.name``), so setting their
    argument types does not touch other users of the same ``CDLL``.
    """

    def __init__(self, lib: ctypes.CDLL | None = None) -> None:
        try:
            self.lib = lib if lib is not None else load_nvcomp_library()
        except (OSError, ImportError, AttributeError) as err:
            raise CApiUnavailableError(f"cannot load libnvcomp: {err}") from err
        self._fns: dict[str, Any] = {}
        missing = []
        for algorithm in DECOMPRESS_OPTS:
            for name, argtypes in prototypes(algorithm).items():
                try:
                    fn = self.lib[name]
                except AttributeError:
                    missing.append(name)
                    continue
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int
                self._fns[name] = fn
        if missing:
            raise CApiUnavailableError(f"libnvcomp lacks {', '.join(missing)}")
        self.alignments = {a: self.required_alignments(a) for a in DECOMPRESS_OPTS}

    def _call(self, name: str, *args: Any) -> int:
        return int(self._fns[name](*args))

    def required_alignments(self, algorithm: str) -> tuple[int, int, int]:
        """``(input, output, temp)`` alignment in bytes (a host call)."""
        out = AlignmentRequirements()
        name = f"nvcompBatched{algorithm}DecompressGetRequiredAlignments"
        status = self._call(name, DECOMPRESS_OPTS[algorithm](), ctypes.byref(out))
        if status:
            raise CApiUnavailableError(f"{name} returned {status_name(status)}")
        return int(out.input), int(out.output), int(out.temp)

    def temp_bytes(self, algorithm: str, n: int, max_chunk: int, total: int) -> int:
        """Temp bytes the decode of ``n`` chunks needs (a host call, no device)."""
        temp = ctypes.c_size_t(0)
        name = f"nvcompBatched{algorithm}DecompressGetTempSizeAsync"
        status = self._call(
            name, n, max_chunk, DECOMPRESS_OPTS[algorithm](), ctypes.byref(temp), total
        )
        if status:
            raise RuntimeError(f"{name}({n}, {max_chunk}, {total}) returned {status_name(status)}")
        return int(temp.value)

    def decompress(
        self,
        algorithm: str,
        in_ptrs: int,
        in_bytes: int,
        out_bytes: int,
        actual_bytes: int,
        n: int,
        temp: int,
        temp_bytes: int,
        out_ptrs: int,
        statuses: int,
        stream: int,
    ) -> int:
        """Enqueue one batched decompression on ``stream``; the call's status.

        Every pointer is a device address (int): the arrays of ``n`` input
        pointers, input sizes, output buffer sizes, actual sizes (written),
        output pointers and statuses (written), and the temp buffer.
        """
        return self._call(
            f"nvcompBatched{algorithm}DecompressAsync",
            in_ptrs,
            in_bytes,
            out_bytes,
            actual_bytes,
            n,
            temp,
            temp_bytes,
            out_ptrs,
            DECOMPRESS_OPTS[algorithm](),
            statuses,
            stream,
        )


_api: NvcompCApi | None = None
_api_error: CApiUnavailableError | None = None
_api_lock = threading.Lock()


def nvcomp_capi() -> NvcompCApi:
    """The process's :class:`NvcompCApi` (raises :class:`CApiUnavailableError`)."""
    global _api, _api_error
    with _api_lock:
        if _api is None and _api_error is None:
            try:
                _api = NvcompCApi()
            except CApiUnavailableError as err:
                _api_error = err
        if _api is None:
            raise _api_error  # type: ignore[misc]
        return _api


# -- host-side arithmetic (numpy; the device runs the same with CuPy) ------------------
ROW_SOURCE = 0  # IN_STAGING or IN_CACHE
ROW_IN_OFFSET = 1
ROW_IN_NBYTES = 2
ROW_OUT_OFFSET = 3
ROW_OUT_NBYTES = 4
N_ROWS = 5


def decode_table(groups: Sequence[DecodeGroup]) -> tuple[np.ndarray, np.ndarray]:
    """``(table, bounds)``: the decode groups' chunks as one ``[5, N]`` int64
    table (rows ``ROW_*``), group ``g`` in columns ``bounds[g]:bounds[g + 1]``."""
    sizes = [len(g.chunks) for g in groups]
    bounds = np.zeros(len(groups) + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    table = np.empty((N_ROWS, int(bounds[-1])), dtype=np.int64)
    for g, group in enumerate(groups):
        cols = slice(int(bounds[g]), int(bounds[g + 1]))
        table[ROW_SOURCE, cols] = group.in_source
        table[ROW_IN_OFFSET, cols] = group.in_offset
        table[ROW_IN_NBYTES, cols] = group.in_nbytes
        table[ROW_OUT_OFFSET, cols] = group.out_offset
        table[ROW_OUT_NBYTES, cols] = group.out_nbytes
    return table, bounds


def device_pointers(xp: Any, table: Any, in_bases: tuple[int, int], out_base: int) -> Any:
    """``[2, N]`` uint64: input pointers (``in_bases[source] + offset``) and
    output pointers (``out_base + offset``) of a :func:`decode_table`, computed
    where ``table`` lives (``xp``: numpy or CuPy; the table holds no pointer).

    Elementwise uint64 arithmetic only (wrapping, so ``staging + source *
    (cache - staging)`` picks either base), the same on numpy and CuPy.
    """
    n = table.shape[1]
    staging, cache = in_bases
    delta = np.uint64((cache - staging) % (1 << 64))
    ptrs = xp.empty((2, n), dtype=np.uint64)
    xp.multiply(table[ROW_SOURCE].view(np.uint64), delta, out=ptrs[0])
    ptrs[0] += table[ROW_IN_OFFSET].view(np.uint64)
    ptrs[0] += np.uint64(staging)
    xp.add(table[ROW_OUT_OFFSET].view(np.uint64), np.uint64(out_base), out=ptrs[1])
    return ptrs


def first_bad(xp: Any, statuses: Any, actual: Any, expected: Any) -> Any:
    """``[2]`` int64 (where the arrays live): the index of the first chunk whose
    status is not ``nvcompSuccess`` or whose decoded size is not the expected
    one (``n`` if none), and how many such chunks there are."""
    n = statuses.shape[0]
    if n == 0:
        return xp.asarray(np.array([0, 0], dtype=np.int64))
    bad = (statuses != 0) | (actual != expected)
    first = xp.where(bad, xp.arange(n, dtype=np.int64), np.int64(n)).min()
    out = xp.empty(2, dtype=np.int64)
    out[0] = first
    out[1] = xp.count_nonzero(bad)
    return out


def bad_chunk_error(
    store: str,
    layouts: Sequence[ArrayLayout],
    plan: BatchPlan,
    groups: Sequence[DecodeGroup],
    bounds: np.ndarray,
    index: int,
    count: int,
    status: int,
    actual: int,
    refused: bool = False,
) -> ChunkError:
    """The :class:`ChunkError` for column ``index`` of the batch's decode table:
    a bad chunk (``count`` in the batch), or with ``refused`` the first chunk of
    a group whose decode call nvCOMP refused on the host (``status``)."""
    g = int(np.searchsorted(bounds, index, side="right")) - 1
    group = groups[g]
    k = index - int(bounds[g])
    row = int(group.chunks[k])
    layout = layouts[int(plan.chunk_var[row])]
    if refused:
        what = (
            f"nvCOMP {group.algorithm} refused to decode a batch of {count} chunks "
            f"({status_name(status)}); the first is named here"
        )
    else:
        expected = int(group.out_nbytes[k])
        if status:
            what = f"nvCOMP {group.algorithm} could not decode it ({status_name(status)})"
        else:
            what = f"nvCOMP {group.algorithm} decoded {actual} bytes, the chunk has {expected}"
        what += f"; {count} bad chunk(s) in this batch, the first named here"
    return ChunkError(
        what,
        store=store,
        array=layout.name,
        key=layout.describe_chunk(plan.chunk_coords_of(layouts, row)),
    )


Explain = Callable[..., ChunkError]  # bad_chunk_error with the batch bound: (index, count, ...)


# -- the device side ------------------------------------------------------------------
_D2H = 2  # cudaMemcpyDeviceToHost


@dataclass
class DecodeCheck:
    """The batch's status check, in flight: ``raise_if_bad`` waits for the
    16-byte result (the decode is complete then) and raises for a bad chunk."""

    event: Any
    result: np.ndarray  # pinned [2] int64, written by the device
    statuses: Any  # device arrays, read again only for the error message
    actual: Any
    explain: Explain
    n: int

    def raise_if_bad(self) -> None:
        self.event.synchronize()
        first, count = int(self.result[0]), int(self.result[1])
        if count == 0:
            return
        status, actual = int(self.statuses[first]), int(self.actual[first])
        raise self.explain(first, count, status, actual)


DEFAULT_TEMP_BUDGET = 1 << 30  # bytes of nvCOMP temp one decode call may use


def call_bounds(
    api: NvcompCApi, algorithm: str, out_nbytes: np.ndarray, budget: int
) -> tuple[np.ndarray, int]:
    """Split a decode group's chunks, in order, into runs that one
    ``nvcompBatched<Alg>DecompressAsync`` call each decodes with at most
    ``budget`` bytes of temp (a run of one chunk may need more: it is decoded
    anyway); ``(bounds [R + 1], temp bytes enough for any run)``.

    nvCOMP 5.3's ``GetTempSizeAsync`` answers ``n`` times a function of the
    largest chunk (zstd: about 3.05x a 1 MiB chunk, 3.1x a 64 KiB one, more for
    tiny chunks; LZ4 and gzip: none), so runs of equal counts fit: two host
    calls per group and batch, whatever its number of chunks.
    """
    n = len(out_nbytes)
    total, biggest = int(out_nbytes.sum()), int(out_nbytes.max())
    need = api.temp_bytes(algorithm, n, biggest, total)
    if need <= budget or n == 1:
        return np.array([0, n], dtype=np.int64), need
    per_chunk = -(-need // n)
    m = max(1, budget // per_chunk)
    bounds = np.append(np.arange(0, n, m, dtype=np.int64), np.int64(n))
    # Every run holds at most m chunks, none larger than the largest.
    return bounds, api.temp_bytes(algorithm, m, biggest, m * biggest)


class DecodeTemp:
    """nvCOMP's temp memory for all of a backend's decoding streams: one device
    buffer, used by one stream at a time, in event order, grown when a call
    needs more; and the ``budget`` each call's temp is held to
    (:func:`call_bounds`), so the buffer stays near ``budget`` bytes however
    many threads decode and however large a batch is.

    :meth:`use` is entered around the enqueue of a batch's decode calls: the
    stream first waits for the event recorded after the buffer's last use on
    another stream; leaving records that event. A buffer replaced while a
    stream may still use it is held until that event has completed.
    :meth:`close` releases it all (call once the streams are synchronized).
    """

    def __init__(self, cp: Any, budget: int = DEFAULT_TEMP_BUDGET) -> None:
        from .lifetimes import InFlight

        if budget < 1:
            raise ValueError(f"decode_temp_budget must be positive, got {budget}")
        self._cp = cp
        self.budget = int(budget)
        self._lock = threading.Lock()
        self._buffer: Any = None
        self._event: Any = None  # recorded after the buffer's last use
        self._stream: Any = None  # the stream of that use
        self._replaced = InFlight(max_entries=2)
        self.peak_nbytes = 0

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.nbytes)

    def use(self, nbytes: int, stream: Any) -> _TempUse:
        """The buffer (at least ``nbytes``) for calls enqueued on ``stream``
        (the current CuPy stream) inside the ``with`` block."""
        return _TempUse(self, nbytes, stream)

    def _enter(self, nbytes: int, stream: Any) -> Any:
        self._lock.acquire()
        try:
            self._replaced.retire()
            if self._event is not None and self._stream is not stream:
                stream.wait_event(self._event)
            if self._buffer is None or self._buffer.nbytes < nbytes:
                old, self._buffer = self._buffer, None
                if old is not None:  # a stream may still read it: held until its event
                    self._replaced.push(self._event, [old])
                size = min(max(nbytes + nbytes // 4, 256), max(self.budget, nbytes))
                self._buffer = self._cp.empty(size, dtype=self._cp.uint8)
                self.peak_nbytes = max(self.peak_nbytes, size)
            return self._buffer
        except BaseException:
            self._lock.release()
            raise

    def _exit(self, stream: Any) -> None:
        try:
            self._event, self._stream = stream.record(), stream
        finally:
            self._lock.release()

    def close(self) -> None:
        """Wait for the replaced buffers' events, then drop every buffer. Idempotent."""
        with self._lock:
            try:
                self._replaced.drain()
            finally:
                self._buffer = self._event = self._stream = None


class _TempUse:
    __slots__ = ("_nbytes", "_stream", "_temp")

    def __init__(self, temp: DecodeTemp, nbytes: int, stream: Any) -> None:
        self._temp, self._nbytes, self._stream = temp, nbytes, stream

    def __enter__(self) -> Any:
        return self._temp._enter(self._nbytes, self._stream)

    def __exit__(self, *exc: object) -> None:
        self._temp._exit(self._stream)


class BatchedDecoder:
    """One stream's nvCOMP C API decoding: owns the status, actual-size and
    result arrays, grown when a batch needs more; the temp memory is the
    backend's :class:`DecodeTemp`, shared by its streams. :meth:`close`
    releases the arrays.

    ``retire(buffers)`` receives buffers replaced while the stream may still use
    them (the caller keeps them until the stream has passed its current work).
    ``empty_pinned(n, dtype)``: pinned host memory (default ``cupyx.empty_pinned``).
    """

    def __init__(
        self,
        cp: Any,
        api: NvcompCApi,
        retire: Callable[[list[Any]], None],
        temp: DecodeTemp,
        empty_pinned: Callable[..., np.ndarray] | None = None,
    ) -> None:
        if empty_pinned is None:
            import cupyx

            empty_pinned = cupyx.empty_pinned
        self._cp = cp
        self.api = api
        self._retire = retire
        self.temp = temp
        self._statuses: Any = None
        self._actual: Any = None
        self._result = empty_pinned(2, dtype=np.int64)

    def _grow(self, n: int) -> None:
        cp = self._cp
        if self._statuses is None or self._statuses.size < n:
            old = [b for b in (self._statuses, self._actual) if b is not None]
            size = max(1 << max(n - 1, 1).bit_length(), 256)
            self._statuses = cp.empty(size, dtype=cp.int32)
            self._actual = cp.empty(size, dtype=cp.uint64)
            if old:
                self._retire(old)

    def decode(
        self,
        groups: Sequence[DecodeGroup],
        table_dev: Any,
        bounds: np.ndarray,
        in_bases: tuple[int, int],
        out_base: int,
        stream: Any,
        explain: Explain,
    ) -> tuple[DecodeCheck, list[Any]]:
        """Enqueue the decode of every group on ``stream`` (current CuPy stream),
        each in calls whose temp fits the budget, and the status check; returns
        the check and the device arrays the stream uses (to be kept alive until
        it has passed them)."""
        cp = self._cp
        n = int(bounds[-1])
        runs, temp_bytes = [], 0
        for group in groups:
            cuts, need = call_bounds(self.api, group.algorithm, group.out_nbytes, self.temp.budget)
            runs.append(cuts)
            temp_bytes = max(temp_bytes, need)
        self._grow(n)
        ptrs = device_pointers(cp, table_dev, in_bases, out_base)
        in_bytes = table_dev[ROW_IN_NBYTES].view(cp.uint64)
        out_bytes = table_dev[ROW_OUT_NBYTES].view(cp.uint64)
        statuses, actual = self._statuses[:n], self._actual[:n]
        base = {
            "in_ptrs": ptrs[0].data.ptr,
            "out_ptrs": ptrs[1].data.ptr,
            "in_bytes": in_bytes.data.ptr,
            "out_bytes": out_bytes.data.ptr,
        }
        with self.temp.use(temp_bytes, stream) as temp:
            for g, group in enumerate(groups):
                first = int(bounds[g])
                cuts = runs[g].tolist()
                for a, b in itertools.pairwise(cuts):
                    lo, m = first + a, b - a
                    status = self.api.decompress(
                        group.algorithm,
                        base["in_ptrs"] + 8 * lo,
                        base["in_bytes"] + 8 * lo,
                        base["out_bytes"] + 8 * lo,
                        actual.data.ptr + 8 * lo,
                        m,
                        temp.data.ptr,
                        temp.nbytes,
                        base["out_ptrs"] + 8 * lo,
                        statuses.data.ptr + 4 * lo,
                        stream.ptr,
                    )
                    if status:  # refused on the host: nothing of this call was enqueued
                        raise explain(lo, m, status, 0, refused=True)
        result = first_bad(cp, statuses, actual, out_bytes)
        cp.cuda.runtime.memcpyAsync(self._result.ctypes.data, result.data.ptr, 16, _D2H, stream.ptr)
        check = DecodeCheck(stream.record(), self._result, statuses, actual, explain, n)
        return check, [ptrs, result]

    def close(self) -> None:
        """Drop the device arrays (call once the stream is synchronized)."""
        self._statuses = self._actual = None
        self._result = None


class PythonApiDecoder:
    """The fallback: nvCOMP's Python API, ``Codec.decode`` of one ``nvcomp.Array``
    per chunk, with a ``DecompressConfig`` from the known sizes when
    ``preconfigure`` (else nvCOMP parses headers and synchronizes the stream).

    Codecs are bound to a stream; they are created per stream used and kept
    with it. :meth:`close` drops them (call once the streams are synchronized).
    """

    def __init__(
        self, cp: Any, store: str, *, preconfigure: bool = True, config_cache_size: int = 64
    ) -> None:
        from collections import OrderedDict

        self._cp = cp
        self._store = store
        self.preconfigure = preconfigure
        self._config_cache_size = config_cache_size
        self._codecs: dict[tuple[int, str], tuple[Any, Any]] = {}  # (id(stream), alg)
        self._configs: OrderedDict = OrderedDict()

    def _codec(self, stream: Any, algorithm: str) -> Any:
        key = (id(stream), algorithm)
        hit = self._codecs.get(key)
        if hit is None or hit[0] is not stream:
            from nvidia import nvcomp

            codec = nvcomp.Codec(
                algorithm=algorithm,
                bitstream_kind=nvcomp.BitstreamKind.RAW,
                device_id=self._cp.cuda.Device().id,
                cuda_stream=stream.ptr,
            )
            hit = self._codecs[key] = (stream, codec)  # the stream kept with its codec
        return hit[1]

    def _config(self, algorithm: str, codec: Any, sizes: tuple[int, ...]) -> Any:
        if not self.preconfigure:
            return None
        key = (id(codec), algorithm, sizes)
        config = self._configs.get(key)
        if config is None:
            try:
                config = codec.decompression_config(codec.compression_config(list(sizes)))
            except Exception as err:  # not offered for this algorithm/bitstream: say so
                warnings.warn(
                    f"zarrdali: nvCOMP {algorithm} cannot be preconfigured with the chunk "
                    f"sizes ({type(err).__name__}: {err}); decoding with header parsing, "
                    f"which synchronizes the stream once per batch.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.preconfigure = False
                return None
            self._configs[key] = config
            if len(self._configs) > self._config_cache_size:
                self._configs.popitem(last=False)
        else:
            self._configs.move_to_end(key)
        return config

    def decode(
        self,
        layouts: Sequence[ArrayLayout],
        plan: BatchPlan,
        groups: Sequence[DecodeGroup],
        bases: tuple[Any, Any],
        decoded: Any,
        stream: Any,
    ) -> None:
        from nvidia import nvcomp

        for group in groups:
            codec = self._codec(stream, group.algorithm)
            ins = zip(
                group.in_source.tolist(),
                group.in_offset.tolist(),
                group.in_nbytes.tolist(),
                strict=True,
            )
            outs = zip(group.out_offset.tolist(), group.out_nbytes.tolist(), strict=True)
            inputs = [bases[src][start : start + n] for src, start, n in ins]
            outputs = [decoded[start : start + n] for start, n in outs]
            kwargs = {}
            config = self._config(group.algorithm, codec, tuple(group.out_nbytes.tolist()))
            if config is not None:
                kwargs["decompression_config"] = config
            try:
                codec.decode(nvcomp.as_arrays(inputs, stream.ptr), out=outputs, **kwargs)
            except Exception as err:  # nvCOMP raises RuntimeError/ValueError of its own
                first = int(group.chunks[0])
                layout = layouts[int(plan.chunk_var[first])]
                raise ChunkError(
                    f"nvCOMP {group.algorithm} could not decode a batch of {len(inputs)} "
                    f"chunks (the first named here): {err}",
                    store=self._store,
                    array=layout.name,
                    key=layout.describe_chunk(plan.chunk_coords_of(layouts, first)),
                ) from err

    def close(self) -> None:
        self._configs.clear()
        self._codecs.clear()


__all__ = [
    "IN_CACHE",
    "IN_STAGING",
    "BatchedDecoder",
    "CApiUnavailableError",
    "DecodeCheck",
    "DecodeTemp",
    "NvcompCApi",
    "PythonApiDecoder",
    "decode_table",
    "device_pointers",
    "first_bad",
    "nvcomp_capi",
]
