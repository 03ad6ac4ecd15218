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

(opts: 64-byte structs passed by value; all zeros is each algorithm's default),
and the batched CRC32 of ``include/nvcomp/crc32.h``::

    nvcompStatus_t nvcompBatchedCRC32Async(
        const void* const* d_in_ptrs, const size_t* d_in_bytes, size_t num_chunks,
        uint32_t* d_crc32, nvcompBatchedCRC32Opts_t opts,
        nvcompCRC32SegmentKind_t segment_kind, nvcompStatus_t* d_statuses,
        cudaStream_t stream)
    nvcompStatus_t nvcompBatchedCRC32GetHeuristicConf(
        const size_t* d_in_bytes, size_t num_chunks,
        nvcompCRC32KernelConf_t* kernel_conf, size_t max_in_bytes, cudaStream_t stream)

(opts: 128 bytes by value, the ``nvcompCRC32_C`` preset: the crc32c of Zarr's
``crc32c`` codec; the kernel configuration asked once per size bucket).

:class:`BatchedDecoder` decodes a batch with O(1) Python: the host builds one
``[5, N]`` int64 table of the batch's decode groups (:func:`decode_table`:
payload source, offset and size, output offset and size per chunk), sent
with the batch's other tables in one copy (:mod:`.upload`), and the device
computes the pointer arrays from it (:func:`device_pointers`: ``base +
offset``, with CuPy). Chunks that carry a crc32c are checked first
(:func:`crc_table`: ``nvcompBatchedCRC32Async`` over their staged bytes, then
``zarrdali_crc_gate`` compares each with its stored checksum and points the
decode of a chunk that fails at a valid stand-in stream, :data:`STAND_INS`:
corrupt input to nvCOMP is undefined behaviour). Then
``nvcompBatched<Alg>DecompressAsync`` per algorithm, on the batch's stream, in
calls whose temp fits a budget (:func:`call_bounds`; nvCOMP's zstd temp is
about 3x the decoded bytes), into the stream's own temp buffer
(:class:`DecodeTemp`), and into status, actual-size and checksum arrays the
decoder owns and grows when a batch needs more (released by
:meth:`BatchedDecoder.close`). One check per batch (:func:`batch_check`: the
first chunk that failed its crc32c, or its decode, and the counts, 48 bytes
copied to the batch's own pinned memory): :meth:`DecodeCheck.raise_if_bad`
names the array and key of that chunk in a
:class:`~zarrdali.errors.ChunkError`, where the batch is handed on.

:class:`PythonApiDecoder` is the fallback (``GpuBackend(decode="python")``, or
when the C API cannot be loaded): nvCOMP's Python ``Codec.decode``, one
``nvcomp.Array`` per chunk.

VERIFIED WITHOUT A GPU (``tests/test_gpu_decode.py``): the prototypes and
struct layouts against the 5.3 headers (parsed, and compiled with g++:
function types, ``sizeof``/``offsetof``, enum values, default opts = zeros),
the temp-size and alignment queries through the real library (they run
without a device; the CRC32 ones answer nvcompErrorCudaError there), the
table, pointer, checksum and status arithmetic with numpy. The
whole decode path as the backend drives it runs on a CPU stand-in
(``tests/fakecuda.py``: numpy arrays at real host addresses, the batched
call emulated on those addresses with numcodecs; ``tests/test_gpu_engine.py``):
it checks which pointers, sizes and counts reach the call, the status check
and the error naming the chunk, the crc32c of each checked chunk (the
stand-in's twin computes it as the ``opts`` say) and that one that fails its
checksum never reaches the decoder. NOT VERIFIED until a GPU runs the
``gpu``-marked tests: nvCOMP's decompression and CRC32 themselves, the same
arithmetic in CuPy, and the Python-API fallback after the move.
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

from zarrdali.batch.plan import BatchPlan
from zarrdali.errors import ChunkError
from zarrdali.gpu.describe import IN_CACHE, IN_STAGING, DecodeGroup
from zarrdali.store.open import ArrayLayout

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


class CRC32Spec(ctypes.Structure):
    """``nvcompCRC32Spec_t`` (``include/nvcomp/crc32.h``)."""

    _fields_ = [
        ("poly", ctypes.c_uint32),
        ("init", ctypes.c_uint32),
        ("ref_in", ctypes.c_bool),
        ("ref_out", ctypes.c_bool),
        ("xorout", ctypes.c_uint32),
        ("reserved", ctypes.c_char * 16),
    ]


class CRC32KernelConf(ctypes.Structure):
    """``nvcompCRC32KernelConf_t``."""

    _fields_ = [
        ("kernel_kind", ctypes.c_int),  # nvcompCRC32KernelKind_t
        ("bytes_per_read", ctypes.c_int32),
        ("blocks_per_msg", ctypes.c_int32),
        ("reserved", ctypes.c_char * 20),
    ]


class BatchedCRC32Opts(ctypes.Structure):
    """``nvcompBatchedCRC32Opts_t`` (128 bytes, passed by value)."""

    _fields_ = [
        ("spec", CRC32Spec),
        ("kernel_conf", CRC32KernelConf),
        ("reserved", ctypes.c_char * 64),
    ]


# ``nvcompCRC32_C`` (CRC-32/ISCSI): the crc32c of Zarr's ``crc32c`` codec.
CRC32_C = {"poly": 0x1EDC6F41, "init": 0xFFFFFFFF, "ref_in": True, "ref_out": True,
           "xorout": 0xFFFFFFFF}  # fmt: skip
CRC32_ONLY_SEGMENT = 0  # nvcompCRC32OnlySegment: each chunk is a whole message
CRC32_PROTOTYPES: dict[str, list[Any]] = {
    "nvcompBatchedCRC32Async": [
        ctypes.c_void_p,  # const void* const* device_input_chunk_ptrs
        ctypes.c_void_p,  # const size_t* device_input_chunk_bytes
        ctypes.c_size_t,  # num_chunks
        ctypes.c_void_p,  # uint32_t* device_crc32_ptr
        BatchedCRC32Opts,  # opts, by value
        ctypes.c_int,  # nvcompCRC32SegmentKind_t segment_kind
        ctypes.c_void_p,  # nvcompStatus_t* device_statuses
        ctypes.c_void_p,  # cudaStream_t
    ],
    "nvcompBatchedCRC32GetHeuristicConf": [
        ctypes.c_void_p,  # const size_t* device_input_chunk_bytes (NULL: max given)
        ctypes.c_size_t,  # num_chunks
        ctypes.POINTER(CRC32KernelConf),  # kernel_conf (host, written)
        ctypes.c_size_t,  # max_input_chunk_bytes
        ctypes.c_void_p,  # cudaStream_t (ignored when the max is given)
    ],
}


def crc32c_opts(conf: CRC32KernelConf) -> BatchedCRC32Opts:
    """The CRC32-C preset with a kernel configuration, everything else zeroed."""
    return BatchedCRC32Opts(spec=CRC32Spec(**CRC32_C), kernel_conf=conf)


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
        wanted = {name: types for a in DECOMPRESS_OPTS for name, types in prototypes(a).items()}
        wanted.update(CRC32_PROTOTYPES)
        missing = []
        for name, argtypes in wanted.items():
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
        self._crc_confs: dict[tuple[int, int], CRC32KernelConf] = {}

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

    def crc32_conf(self, n: int, max_bytes: int) -> CRC32KernelConf:
        """nvCOMP's heuristic kernel configuration for ``n`` chunks of at most
        ``max_bytes`` (a host call: it asks the current device's properties, no
        stream work), kept per power-of-two bucket of both."""
        key = (1 << max(n - 1, 0).bit_length(), 1 << max(max_bytes - 1, 0).bit_length())
        conf = self._crc_confs.get(key)
        if conf is None:
            conf = CRC32KernelConf()
            name = "nvcompBatchedCRC32GetHeuristicConf"
            status = self._call(name, None, key[0], ctypes.byref(conf), key[1], None)
            if status:
                raise RuntimeError(f"{name}({key[0]}, {key[1]}) returned {status_name(status)}")
            self._crc_confs[key] = conf
        return conf

    def crc32(
        self,
        in_ptrs: int,
        in_bytes: int,
        n: int,
        crcs: int,
        statuses: int,
        stream: int,
        max_bytes: int,
    ) -> int:
        """Enqueue the crc32c (nvCOMP's CRC32-C preset) of ``n`` chunks on
        ``stream``: device arrays of input pointers and sizes in, of uint32
        checksums and statuses out; the call's status."""
        opts = crc32c_opts(self.crc32_conf(n, max_bytes))
        return self._call(
            "nvcompBatchedCRC32Async",
            in_ptrs,
            in_bytes,
            n,
            crcs,
            opts,
            CRC32_ONLY_SEGMENT,
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


# The batch's check, one int64 array the device fills and the host reads once.
CHECK_FIRST = 0  # first decode-table column whose decode failed (n: none)
CHECK_COUNT = 1  # how many failed
CHECK_STATUS = 2  # nvCOMP's status of the first that failed
CHECK_ACTUAL = 3  # its decoded size
CHECK_CRC_FIRST = 4  # first crc32c row whose checksum differs (K: none)
CHECK_CRC_COUNT = 5
N_CHECK = 6


def batch_check(xp: Any, statuses: Any, actual: Any, expected: Any, crc_bad: Any = None) -> Any:
    """``[N_CHECK]`` int64, computed where the arrays live (``CHECK_*``): the
    first bad decode (:func:`first_bad`) with its status and decoded size, and
    the first chunk whose crc32c differs (``crc_bad``: nonzero where it does)
    and how many did. Everything the error message needs: the host reads this
    array only, once the batch's work has run."""
    out = xp.zeros(N_CHECK, dtype=np.int64)
    n = statuses.shape[0]
    if n:
        out[CHECK_FIRST : CHECK_COUNT + 1] = first_bad(xp, statuses, actual, expected)
        at = xp.minimum(out[CHECK_FIRST : CHECK_FIRST + 1], np.int64(n - 1))
        out[CHECK_STATUS] = xp.take(statuses, at)[0]
        out[CHECK_ACTUAL] = xp.take(actual, at)[0].astype(np.int64)
    if crc_bad is not None and crc_bad.shape[0]:
        k = crc_bad.shape[0]
        bad = crc_bad != 0
        out[CHECK_CRC_FIRST] = xp.where(bad, xp.arange(k, dtype=np.int64), np.int64(k)).min()
        out[CHECK_CRC_COUNT] = xp.count_nonzero(bad)
    return out


def crc_chunk_error(
    store: str,
    layouts: Sequence[ArrayLayout],
    plan: BatchPlan,
    crc_chunks: np.ndarray,
    index: int,
    count: int,
) -> ChunkError:
    """The :class:`ChunkError` for row ``index`` of the batch's crc32c jobs (the
    CPU path's message for the same chunk, and how many failed)."""
    row = int(crc_chunks[index])
    layout = layouts[int(plan.chunk_var[row])]
    return ChunkError(
        f"crc32c checksum mismatch in the chunk (checked on the GPU before decoding; "
        f"{count} chunk(s) of this batch failed their checksum, the first named here)",
        store=store,
        array=layout.name,
        key=layout.describe_chunk(plan.chunk_coords_of(layouts, row)),
    )


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
ExplainCrc = Callable[[int, int], ChunkError]  # crc_chunk_error with the batch bound


# -- crc32c on the device ---------------------------------------------------------------
# A valid stream of each algorithm that decodes to one zero byte: what the decoder
# reads in place of a chunk whose crc32c is wrong (corrupt input to nvCOMP is
# undefined behaviour; this is not, and its one byte fails the size check too).
STAND_INS: dict[str, bytes] = {
    "Zstd": bytes.fromhex("28b52ffd200109000000"),  # frame, content size 1, one raw block
    "LZ4": bytes.fromhex("1000"),  # raw block: one literal
    "Gzip": bytes.fromhex("1f8b08000000000002036300008def02d201000000"),
    "Deflate": bytes.fromhex("630000"),  # raw deflate, fixed Huffman
}
STAND_IN_ALIGN = 16


def stand_in_layout() -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The stand-ins in one buffer, each aligned, and ``{algorithm: (offset, bytes)}``."""
    blob, where = b"", {}
    for algorithm, frame in STAND_INS.items():
        blob += b"\0" * (-len(blob) % STAND_IN_ALIGN)
        where[algorithm] = (len(blob), len(frame))
        blob += frame
    return blob, where


# Columns of the crc32c jobs the device reads (the gate kernel's `jobs`).
CRC_OFFSET = 0  # staging offset of the stored chunk
CRC_NBYTES = 1  # its bytes before the trailing crc32c
CRC_COLUMN = 2  # its decode-table column (-1: not decoded by nvCOMP, e.g. uncompressed)
CRC_STAND_IN = 3  # offset of its algorithm's stand-in
CRC_STAND_IN_NBYTES = 4
N_CRC_FIELDS = 5


def crc_table(
    crc_jobs: np.ndarray, groups: Sequence[DecodeGroup], bounds: np.ndarray
) -> np.ndarray:
    """``[N_CRC_FIELDS, K]`` int64 (rows ``CRC_*``): the batch's crc32c jobs
    (``crc_jobs``: offset, bytes, from :func:`~.plan.describe_batch`) with the
    decode column of each and where its algorithm's stand-in is (numpy over
    the groups)."""
    k = len(crc_jobs)
    table = np.zeros((N_CRC_FIELDS, k), dtype=np.int64)
    if not k:
        return table
    table[CRC_OFFSET] = crc_jobs[:, 0]
    table[CRC_NBYTES] = crc_jobs[:, 1]
    table[CRC_COLUMN] = -1
    _, where = stand_in_layout()
    for g, group in enumerate(groups):
        rows = group.crc_row
        if rows is None:
            continue
        mine = np.flatnonzero(rows >= 0)
        if len(mine):
            table[CRC_COLUMN, rows[mine]] = int(bounds[g]) + mine
            table[CRC_STAND_IN, rows[mine]], table[CRC_STAND_IN_NBYTES, rows[mine]] = where[
                group.algorithm
            ]
    return table


# -- the device side ------------------------------------------------------------------
_D2H = 2  # cudaMemcpyDeviceToHost


@dataclass
class DecodeCheck:
    """The batch's check, in flight: the device writes its :func:`batch_check`
    into ``result`` (pinned, this batch's own) before ``event``.
    :meth:`raise_if_bad` waits for the event (the decode is complete then) and
    raises for a chunk whose crc32c or decode failed; :meth:`failed` reads the
    result once the event has completed, without waiting."""

    event: Any
    result: np.ndarray  # pinned [N_CHECK] int64, written by the device
    explain: Explain
    explain_crc: ExplainCrc | None = None

    def failed(self) -> bool:
        """Whether a chunk failed (call once ``event`` has completed)."""
        return bool(self.result[CHECK_COUNT] or self.result[CHECK_CRC_COUNT])

    def raise_if_bad(self) -> None:
        self.event.synchronize()
        result = [int(v) for v in self.result]
        if result[CHECK_CRC_COUNT] and self.explain_crc is not None:  # the cause: first
            raise self.explain_crc(result[CHECK_CRC_FIRST], result[CHECK_CRC_COUNT])
        if result[CHECK_COUNT]:
            first, count = result[CHECK_FIRST], result[CHECK_COUNT]
            raise self.explain(first, count, result[CHECK_STATUS], result[CHECK_ACTUAL])


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
    """nvCOMP's temp memory of one decoding stream (each loading thread's state
    has its own: the decodes of two threads' batches overlap, none waits for
    the other's temp): one device buffer, grown when a call needs more; and the
    ``budget`` each call's temp is held to (:func:`call_bounds`), so the buffer
    stays near ``budget`` bytes however large a batch is.

    :meth:`use` is entered around the enqueue of a batch's decode calls: were
    the buffer used from another stream (a state serves one stream at a time,
    but another may come), that stream first waits for the event recorded
    after its last use; leaving records that event. A buffer replaced while a
    stream may still use it is held until that event has completed.
    :meth:`close` releases it all (call once the streams are synchronized).
    """

    def __init__(self, cp: Any, budget: int = DEFAULT_TEMP_BUDGET) -> None:
        from zarrdali.gpu.lifetimes import InFlight

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


@dataclass(frozen=True, eq=False)
class CrcWork:
    """A batch's crc32c jobs for :meth:`BatchedDecoder.decode`: the device copy
    of their :func:`crc_table` (``[N_CRC_FIELDS, K]``), the staging buffer they
    read, the largest chunk, and the error for the first that fails."""

    table: Any
    n: int
    staging: Any
    max_nbytes: int
    explain: ExplainCrc


class BatchedDecoder:
    """One stream's nvCOMP C API decoding: owns its temp memory (a
    :class:`DecodeTemp`), the status, actual-size and crc32c arrays, grown when
    a batch needs more, and the stand-in streams; :meth:`close` releases them.

    ``retire(buffers)`` receives buffers replaced while the stream may still use
    them (the caller keeps them until the stream has passed its current work).
    ``empty_pinned(n, dtype)``: pinned host memory (default ``cupyx.empty_pinned``).
    ``kernels``: the backend's compiled kernels (the crc32c gate's).
    """

    def __init__(
        self,
        cp: Any,
        api: NvcompCApi,
        retire: Callable[[list[Any]], None],
        temp: DecodeTemp,
        empty_pinned: Callable[..., np.ndarray] | None = None,
        kernels: Any = None,
    ) -> None:
        if empty_pinned is None:
            import cupyx

            empty_pinned = cupyx.empty_pinned
        if kernels is None:
            from zarrdali.gpu.gather import Kernels

            kernels = Kernels(cp)
        self._cp = cp
        self.api = api
        self._retire = retire
        self.temp = temp
        self._empty_pinned = empty_pinned
        self._kernels = kernels
        self._statuses: Any = None
        self._actual: Any = None
        self._crc: Any = None  # [3, K] int32: checksums (as uint32), statuses, bad flags
        self._stand_ins: Any = None

    def _grow(self, n: int, k: int) -> None:
        cp = self._cp
        old = []
        if self._statuses is None or self._statuses.size < n:
            old += [b for b in (self._statuses, self._actual) if b is not None]
            size = max(1 << max(n - 1, 1).bit_length(), 256)
            self._statuses = cp.empty(size, dtype=cp.int32)
            self._actual = cp.empty(size, dtype=cp.uint64)
        if k and (self._crc is None or self._crc.shape[1] < k):
            old += [self._crc] if self._crc is not None else []
            self._crc = cp.empty((3, max(1 << max(k - 1, 1).bit_length(), 256)), dtype=cp.int32)
        if old:
            self._retire(old)

    def stand_ins(self) -> Any:
        """The device copy of :func:`stand_in_layout`'s buffer (made once)."""
        if self._stand_ins is None:
            blob, _ = stand_in_layout()
            self._stand_ins = self._cp.asarray(np.frombuffer(blob, dtype=np.uint8))
        return self._stand_ins

    def decode(
        self,
        groups: Sequence[DecodeGroup],
        table_dev: Any,
        bounds: np.ndarray,
        in_bases: tuple[int, int],
        out_base: int,
        stream: Any,
        explain: Explain,
        crc: CrcWork | None = None,
    ) -> tuple[DecodeCheck, list[Any]]:
        """Enqueue on ``stream`` (current CuPy stream): the crc32c of ``crc``'s
        chunks and the gate that hands the decoder a stand-in for each that
        fails; the decode of every group, in calls whose temp fits the budget;
        the batch's check into pinned memory of its own. Returns the check and
        the device arrays the stream uses (keep them until it has passed them)."""
        cp = self._cp
        n = int(bounds[-1])
        k = 0 if crc is None else crc.n
        runs, temp_bytes = [], 0
        for group in groups:
            cuts, need = call_bounds(self.api, group.algorithm, group.out_nbytes, self.temp.budget)
            runs.append(cuts)
            temp_bytes = max(temp_bytes, need)
        self._grow(n, k)
        keep: list[Any] = []
        ptrs = device_pointers(cp, table_dev, in_bases, out_base)
        in_bytes = table_dev[ROW_IN_NBYTES].view(cp.uint64)
        out_bytes = table_dev[ROW_OUT_NBYTES].view(cp.uint64)
        statuses, actual = self._statuses[:n], self._actual[:n]
        crc_bad = None
        if k:
            crc_bad = self._crc[2, :k]
            keep += self._check_crc(crc, ptrs[0], in_bytes, stream)
        base = {
            "in_ptrs": ptrs[0].data.ptr,
            "out_ptrs": ptrs[1].data.ptr,
            "in_bytes": in_bytes.data.ptr,
            "out_bytes": out_bytes.data.ptr,
        }
        if groups:
            with self.temp.use(temp_bytes, stream) as temp:
                for g, group in enumerate(groups):
                    first = int(bounds[g])
                    for a, b in itertools.pairwise(runs[g].tolist()):
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
        result = batch_check(cp, statuses, actual, out_bytes, crc_bad)
        host = self._empty_pinned(N_CHECK, dtype=np.int64)  # this batch's: checks outlive it
        cp.cuda.runtime.memcpyAsync(
            host.ctypes.data, result.data.ptr, host.nbytes, _D2H, stream.ptr
        )
        check = DecodeCheck(stream.record(), host, explain, None if crc is None else crc.explain)
        return check, [ptrs, result, host, *keep]

    def _check_crc(self, crc: CrcWork, in_ptrs: Any, in_bytes: Any, stream: Any) -> list[Any]:
        """nvCOMP's crc32c of the staged chunks, then the gate kernel: a chunk
        whose checksum (or the call's status) is wrong gets its flag set and its
        decode input replaced by its algorithm's stand-in (``in_ptrs``,
        ``in_bytes``: the decode table's, on the device)."""
        from zarrdali.gpu.kernels import CRC_GATE_SOURCE, THREADS

        cp, k, table = self._cp, crc.n, crc.table
        staging = crc.staging.data.ptr
        crc_ptrs = cp.add(table[CRC_OFFSET].view(cp.uint64), np.uint64(staging))
        crc_bytes = table[CRC_NBYTES].view(cp.uint64)
        crcs, statuses, bad = self._crc[0, :k], self._crc[1, :k], self._crc[2, :k]
        status = self.api.crc32(
            crc_ptrs.data.ptr,
            crc_bytes.data.ptr,
            k,
            crcs.data.ptr,
            statuses.data.ptr,
            stream.ptr,
            crc.max_nbytes,
        )
        if status:  # refused on the host: nothing enqueued, nothing decoded yet
            raise RuntimeError(
                f"nvcompBatchedCRC32Async({k} chunks) returned {status_name(status)}"
            )
        stand_ins = self.stand_ins()
        gate = self._kernels.get("zarrdali_crc_gate", CRC_GATE_SOURCE)
        gate(
            (-(-k // THREADS),),
            (THREADS,),
            (crc.staging, table, crcs, statuses, np.int32(k),
             np.uint64(stand_ins.data.ptr), in_ptrs, in_bytes, bad),
        )  # fmt: skip
        return [crc_ptrs, stand_ins]

    def close(self) -> None:
        """Drop the device arrays (call once the stream is synchronized)."""
        self._statuses = self._actual = self._crc = self._stand_ins = None


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
    "CrcWork",
    "DecodeCheck",
    "DecodeTemp",
    "NvcompCApi",
    "PythonApiDecoder",
    "decode_table",
    "device_pointers",
    "first_bad",
    "nvcomp_capi",
]
