"""A CPU stand-in for CuPy, kvikIO and nvCOMP's C API, to run the GPU backend's
own orchestration code on a machine without a GPU.

"Device" arrays are numpy arrays whose ``.data.ptr`` is their host address, so
the backend's pointer arithmetic (``base + offset``), the ctypes-level contract
of nvCOMP's batched C API (arrays of pointers and sizes, statuses, actual
sizes) and the copies between "device" and pinned memory all run on real
addresses. Work runs eagerly when enqueued; events complete only when their
stream is synchronized or the test says so (``FakeCuda.complete_events``), so
the code that holds buffers until an event has passed is exercised too.

What this cannot check: CUDA itself (kernels run as numpy twins: the copy
kernel as a loop, the gather kernel as ``plan.gather_reference``, which
``tests/test_gpu_backend.py`` checks against the kernel's own source), real
stream ordering and races, kvikIO's and nvCOMP's behaviour. The same tests run
on a real GPU with ``-m gpu``.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import threading
import types
import weakref
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

from zarrdali.gpu import decode as gpu_decode
from zarrdali.gpu.describe import GatherFinish, GatherTables, gather_reference


class _Ptr:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class StickyFault(RuntimeError):
    """A device fault: every later call on the device raises, as CUDA's sticky errors do."""


class DevArray(np.ndarray):
    """A "device" array: numpy, with CuPy's ``.data.ptr``, ``get``, ``set``,
    ``device`` and ``__cuda_array_interface__`` (whose stream is read from the
    calling thread's current stream when asked, as CuPy's is)."""

    _fake: FakeCuda | None = None
    _device_id: int = 0

    def __array_finalize__(self, obj: Any) -> None:
        self._fake = getattr(obj, "_fake", None)
        self._device_id = getattr(obj, "_device_id", 0)

    @property
    def data(self) -> _Ptr:  # type: ignore[override]
        return _Ptr(self.ctypes.data)

    @property
    def device(self) -> Any:  # type: ignore[override]
        return types.SimpleNamespace(id=self._device_id)

    @property
    def __cuda_array_interface__(self) -> dict:
        # CAI v3 forbids 0: CuPy reports the legacy default stream as 1
        stream = 1 if self._fake is None else (self._fake.current_stream().ptr or 1)
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "descr": self.dtype.descr,
            "stream": stream,
            "version": 3,
            "strides": None,
            "data": (self.ctypes.data, False),
        }

    def get(self, stream: Any = None) -> np.ndarray:
        return np.array(self)

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        np.copyto(np.asarray(self), np.asarray(arr).reshape(self.shape))


def dev(a: np.ndarray) -> DevArray:
    return np.ascontiguousarray(a).view(DevArray)


class FakeEvent:
    def __init__(self, cuda: FakeCuda, stream: FakeStream | None = None) -> None:
        cuda.check()
        self._cuda = cuda
        self.device = cuda.current_device()
        self.stream = stream
        self._done = stream is None or not cuda.hold_events
        cuda.events_made.append(self.device)

    @property
    def done(self) -> bool:
        self._cuda.check()
        return self._done

    def record(self, stream: FakeStream | None = None) -> None:
        stream = self._cuda.current_stream() if stream is None else stream
        stream._record_into(self)

    def synchronize(self) -> None:
        self._cuda.check()
        self._cuda.host_waits += 1
        self._done = True


class FakeStream:
    _next_ptr = 0x1000

    def __init__(self, cuda: FakeCuda, non_blocking: bool = False, *, null: bool = False) -> None:
        self._cuda = cuda
        if null:
            self.ptr, self.device = 0, -1  # the legacy default stream, on every device
        else:
            cuda.check()
            FakeStream._next_ptr += 0x10
            self.ptr = FakeStream._next_ptr
            self.device = cuda.current_device()
            cuda.streams_made.append(self.device)
        self.events: list[FakeEvent] = []
        self.synchronized = 0
        cuda.by_ptr[self.ptr] = self
        self.__weakref__  # noqa: B018 (weak references are how the fake sees live streams)

    def record(self, event: FakeEvent | None = None) -> FakeEvent:
        if event is None:
            event = FakeEvent(self._cuda, self)
        self._record_into(event)
        return event

    def _record_into(self, event: FakeEvent) -> None:
        self._cuda.check()
        if self.device not in (-1, event.device):
            raise RuntimeError(  # cudaErrorInvalidResourceHandle
                f"event of device {event.device} recorded on a stream of device {self.device}"
            )
        event.stream = self
        event._done = not self._cuda.hold_events
        self.events.append(event)

    def synchronize(self) -> None:
        self._cuda.check()
        self.synchronized += 1
        self.complete()

    def complete(self) -> None:
        for event in self.events:
            event._done = True
        self.events.clear()

    def wait_event(self, event: FakeEvent) -> None:
        self._cuda.check()
        self._cuda.device_waits += 1

    def __enter__(self) -> FakeStream:
        cuda = self._cuda
        if self.device not in (-1, cuda.current_device()):  # as CuPy's check_stream_device_match
            raise RuntimeError(
                f"The device that the stream is created on ({self.device}) does not match "
                f"with the current device ({cuda.current_device()})"
            )
        cuda._tls().streams.setdefault(cuda.current_device(), []).append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        cuda = self._cuda
        cuda._tls().streams[cuda.current_device()].pop()


class FakeKernel:
    """``zarrdali_pack`` as a loop of copies; ``zarrdali_gather`` and
    ``zarrdali_gather_finish`` as their numpy twin (``plan.gather_reference``)."""

    def __init__(self, cuda: FakeCuda, source: str, name: str) -> None:
        self._cuda = cuda
        self.name = name

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        cuda = self._cuda
        cuda.check()
        cuda.check_on_current_device(*(a for a in args if isinstance(a, DevArray)))
        cuda.launches.append(self.name)
        if self.name == "zarrdali_pack":
            src, dst, jobs, n = args
            src, dst = np.asarray(src), np.asarray(dst)
            for s, d, k in np.asarray(jobs).reshape(int(n), 3).tolist():
                dst[d : d + k] = src[s : s + k]
            return
        if self.name == "zarrdali_crc_gate":
            _crc_gate(*args)
            return
        finish = None
        if self.name == "zarrdali_gather_finish":
            decoded, tiles, tile_chunks, slots, variables, levels, fin, stats, *args = args
            *args, normalize, fill_missing, nan_fill, write_mask, out, mask = args
            assert out.dtype == np.float32 and (not write_mask or mask.dtype == np.uint8)
            finish = GatherFinish(
                variables=np.asarray(fin),
                stats=np.asarray(stats),
                normalize=bool(normalize),
                nan_fill=float(nan_fill) if fill_missing else None,
                masks=bool(write_mask),
            )
            args = (decoded, tiles, tile_chunks, slots, variables, levels, *args, out)
        else:
            assert self.name == "zarrdali_gather", self.name
        decoded, tiles, tile_chunks, slots, variables, levels, *args = args
        n_tiles, n_l, n_y, n_x, h, w, out = args
        assert tuple(out.shape[-2:]) == (int(h), int(w))
        gather = GatherTables(
            tiles=np.asarray(tiles),
            tile_chunks=np.asarray(tile_chunks).reshape(int(n_tiles), int(n_l), int(n_y), int(n_x)),
            chunk_slots=np.asarray(slots),
            variables=np.asarray(variables),
            levels=np.asarray(levels),
            out_shape=tuple(out.shape),
            out_dtype=out.dtype,
        )
        if finish is None:
            np.asarray(out)[...] = gather_reference(np.asarray(decoded), gather)
            return
        values, valid = gather_reference(np.asarray(decoded), gather, finish)
        np.asarray(out)[...] = values
        if valid is not None:
            assert mask.shape == out.shape
            np.asarray(mask)[...] = valid


def _crc_gate(staging, jobs, crcs, statuses, n, stand_ins, in_ptrs, in_bytes, bad) -> None:
    """``zarrdali_crc_gate`` (kernels.CRC_GATE_SOURCE), element by element."""
    n = int(n)
    jobs = np.asarray(jobs).reshape(5, n)
    staging = np.asarray(staging)
    crcs, statuses = np.asarray(crcs).view(np.uint32), np.asarray(statuses)
    in_ptrs, in_bytes, bad = np.asarray(in_ptrs), np.asarray(in_bytes), np.asarray(bad)
    for k in range(n):
        offset, nbytes, column, stand_in, stand_in_nbytes = (int(v) for v in jobs[:, k])
        stored = int.from_bytes(staging[offset + nbytes : offset + nbytes + 4].tobytes(), "little")
        failed = int(statuses[k]) != 0 or int(crcs[k]) != stored
        bad[k] = int(failed)
        if failed and column >= 0:
            in_ptrs[column] = int(stand_ins) + stand_in
            in_bytes[column] = stand_in_nbytes


class FakeMemoryPool:
    """One device's pool as CuPy 14's ``SingleDeviceMemoryPool`` keeps it: sizes
    rounded up to 512 bytes, a freed block cached in the *arena of the stream it
    was allocated under* and reused only by allocations under that stream
    (``cupy/cuda/memory.pyx``: ``_arena(stream_ident)``), never given back to
    the device but by :meth:`free_all_blocks` (all arenas, or one stream's).
    A cached block is reused for a request of at least half its size (no
    splitting: CuPy frees split blocks only once merged)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0
        self._used = 0
        self._free: dict[int, list[int]] = {}  # stream ptr -> cached block sizes

    def malloc(self, nbytes: int, stream_ptr: int) -> int:
        size = max(512, -(-nbytes // 512) * 512)
        with self._lock:
            cached = self._free.setdefault(stream_ptr, [])
            fits = [b for b in cached if size <= b < 2 * size]
            if fits:
                size = min(fits)
                cached.remove(size)
            else:
                self._total += size
            self._used += size
        return size

    def free(self, size: int, stream_ptr: int) -> None:
        with self._lock:
            self._used -= size
            self._free.setdefault(stream_ptr, []).append(size)

    def free_all_blocks(self, stream: Any = None) -> None:
        with self._lock:
            keys = list(self._free) if stream is None else [stream.ptr]
            for key in keys:
                self._total -= sum(self._free.pop(key, []))

    def arenas(self) -> set[int]:
        """The streams (pointers) under which blocks were ever allocated."""
        with self._lock:
            return set(self._free)

    def total_bytes(self) -> int:
        return self._total

    def used_bytes(self) -> int:
        return self._used

    def free_bytes(self) -> int:
        return self._total - self._used


class _PoolOfCurrentDevice:
    """``cupy.get_default_memory_pool()``: calls go to the current device's pool."""

    def __init__(self, cuda: FakeCuda) -> None:
        self._cuda = cuda

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cuda.pools[self._cuda.current_device()], name)


class FakeCuda:
    """The fake ``cupy`` and ``cupyx`` modules and their state.

    Per thread, as CUDA and CuPy keep them: the current device (0 in a new
    thread) and each device's stack of current streams. Streams, events and
    allocations belong to the device current when they are made; entering a
    stream of another device raises (as CuPy does), so does recording an event
    on a stream of another device, launching a kernel or calling nvCOMP with
    arrays or a stream of another device. ``device_log`` records, per
    allocation, ``(device, thread name)``.
    """

    def __init__(self, n_devices: int = 1) -> None:
        self.n_devices = n_devices
        self.hold_events = False
        self.fault: str | None = None  # set: a sticky device fault
        self._local = threading.local()
        self.by_ptr: weakref.WeakValueDictionary[int, FakeStream] = weakref.WeakValueDictionary()
        self.streams_made: list[int] = []
        self.events_made: list[int] = []
        self.device_log: list[tuple[int, str]] = []
        self.null_stream = FakeStream(self, null=True)
        self.default_stream = self.null_stream
        self.launches: list[str] = []
        self.compiled: list[tuple[str, str, tuple]] = []
        self.host_waits = 0
        self.device_waits = 0
        self.allocated = 0
        self.pools = [FakeMemoryPool() for _ in range(n_devices)]
        self.pinned_frees = 0
        self.copies: list[tuple[int, int]] = []  # (kind, bytes) of memcpyAsync
        self._streams: weakref.WeakSet[FakeStream] = weakref.WeakSet()  # the live ones
        self.cupy = self._cupy()
        self.cupyx = types.ModuleType("cupyx")
        self.pinned = 0  # pinned buffers made

        def empty_pinned(n: int, dtype: Any = np.uint8) -> np.ndarray:
            self.check()
            self.pinned += 1
            return np.zeros(n, dtype=dtype)

        self.cupyx.empty_pinned = empty_pinned

    # -- per-thread state ---------------------------------------------------------
    def _tls(self) -> Any:
        local = self._local
        if not hasattr(local, "device"):
            local.device, local.device_stack, local.streams = 0, [], {}
        return local

    def current_device(self) -> int:
        return self._tls().device

    def set_device(self, device: int) -> None:
        if not 0 <= device < self.n_devices:
            raise RuntimeError(f"cudaErrorInvalidDevice: {device} of {self.n_devices}")
        self._tls().device = device

    def current_stream(self) -> FakeStream:
        stack = self._tls().streams.get(self.current_device())
        return stack[-1] if stack else self.null_stream

    def check(self) -> None:
        if self.fault is not None:
            raise StickyFault(self.fault)

    def check_on_current_device(self, *arrays: DevArray) -> None:
        device = self.current_device()
        for a in arrays:
            if a._fake is self and a._device_id != device:
                raise RuntimeError(
                    f"an array of device {a._device_id} used with device {device} current"
                )

    def complete_events(self) -> None:
        """Every stream has finished its work (no host wait)."""
        for stream in self.streams:
            stream.complete()

    @property
    def streams(self) -> list[FakeStream]:
        return [self.default_stream, *self._streams]

    # -- the module ------------------------------------------------------------------
    def _alloc(self, shape: Any, dtype: Any) -> DevArray:
        self.check()
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        device = self.current_device()
        stream_ptr = self.current_stream().ptr
        pool = self.pools[device]
        size = pool.malloc(nbytes, stream_ptr)
        self.allocated += nbytes
        self.device_log.append((device, threading.current_thread().name))
        raw = np.full(nbytes, 0xEE, dtype=np.uint8)  # poison: unwritten bytes show
        weakref.finalize(raw, pool.free, size, stream_ptr)
        out = raw.view(dtype).reshape(shape).view(DevArray)
        out._fake, out._device_id = self, device
        return out

    def _cupy(self) -> types.ModuleType:
        cuda = self
        cp = types.ModuleType("cupy")
        for name in ("uint8", "int8", "int32", "int64", "uint64", "float32", "float64"):
            setattr(cp, name, getattr(np, name))
        cp.ndarray = DevArray

        def empty(shape, dtype=np.float64):
            return cuda._alloc(shape, dtype)

        def asarray(a, dtype=None):
            host = np.asarray(a, dtype=dtype)
            out = cuda._alloc(host.shape, host.dtype)
            np.asarray(out)[...] = host
            return out

        def full(shape, value, dtype=None):
            out = cuda._alloc(shape, np.dtype(dtype) if dtype is not None else np.float64)
            np.asarray(out)[...] = value
            return out

        cp.empty = empty
        cp.asarray = asarray
        cp.zeros = lambda shape, dtype=np.float64: full(shape, 0, dtype)
        cp.full = full
        for name in (
            "where", "arange", "count_nonzero", "add", "multiply", "concatenate", "take", "minimum",
        ):  # fmt: skip
            setattr(cp, name, getattr(np, name))
        # views of "device" arrays stay "device" arrays (CuPy's as_strided gives CuPy's)
        strided = partial(np.lib.stride_tricks.as_strided, subok=True)
        cp.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=strided))

        # Compiles as CuPy 14 does: RawKernel and RawModule(code=...) append
        # -ftz=true to the options (cupy/cuda/compiler.py); compile_using_nvrtc
        # passes them as given; RawModule(path=...) loads, compiling nothing.
        # ``cuda.compiled``: (how, source, options) of each compile.
        def raw_kernel(source: str, name: str, options: tuple = ()) -> FakeKernel:
            cuda.check()
            cuda.compiled.append(("RawKernel", source, (*options, "-ftz=true")))
            return FakeKernel(cuda, source, name)

        class RawModule:
            def __init__(self, *, code: str | None = None, path: str | None = None,
                         options: tuple = ()) -> None:  # fmt: skip
                cuda.check()
                if (code is None) == (path is None):
                    raise TypeError("Exactly one of `code` and `path` keyword arguments")
                if code is not None:
                    cuda.compiled.append(("RawModule", code, (*options, "-ftz=true")))
                else:
                    assert Path(path).read_bytes().startswith(b"FAKECUBIN"), path
                self.code = code

            def get_function(self, name: str) -> FakeKernel:
                return FakeKernel(cuda, self.code, name)

        def compile_using_nvrtc(source: str, options: tuple = (), arch: Any = None, **kw: Any):
            cuda.check()
            cuda.compiled.append(("nvrtc", source, tuple(options)))
            return b"FAKECUBIN" + hashlib.sha256(source.encode()).digest(), {}

        cp.RawKernel = raw_kernel
        cp.RawModule = RawModule
        cp.get_default_memory_pool = lambda: _PoolOfCurrentDevice(cuda)

        def free_pinned_blocks() -> None:
            cuda.pinned_frees += 1

        cp.get_default_pinned_memory_pool = lambda: types.SimpleNamespace(
            free_all_blocks=free_pinned_blocks
        )

        def new_stream(non_blocking: bool = False) -> FakeStream:
            stream = FakeStream(cuda, non_blocking)
            cuda._streams.add(stream)
            return stream

        def new_event(block: bool = False, disable_timing: bool = False) -> FakeEvent:
            return FakeEvent(cuda)

        def memcpy_async(dst: int, src: int, n: int, kind: int, stream: int) -> None:
            cuda.check()
            ctypes.memmove(dst, src, n)
            cuda.copies.append((kind, n))

        runtime = types.SimpleNamespace(
            memcpyAsync=memcpy_async,
            memGetInfo=lambda: (1 << 30, 1 << 31),
            getDeviceCount=lambda: cuda.n_devices,
            getDevice=cuda.current_device,
            setDevice=cuda.set_device,
        )

        class Device:
            """``cupy.cuda.Device(id)``: a context manager, per-thread stack."""

            def __init__(self, device: int | None = None) -> None:
                self.id = cuda.current_device() if device is None else int(device)

            def __enter__(self) -> Device:
                local = cuda._tls()
                local.device_stack.append(local.device)
                cuda.set_device(self.id)
                return self

            def __exit__(self, *exc: Any) -> None:
                local = cuda._tls()
                local.device = local.device_stack.pop()

            def use(self) -> None:
                cuda.set_device(self.id)

            def synchronize(self) -> None:
                cuda.check()
                for stream in cuda.streams:
                    stream.complete()

        cp.cuda = types.SimpleNamespace(
            compiler=types.SimpleNamespace(compile_using_nvrtc=compile_using_nvrtc),
            Stream=new_stream,
            Event=new_event,
            get_current_stream=cuda.current_stream,
            runtime=runtime,
            Device=Device,
        )
        return cp


# -- kvikIO ------------------------------------------------------------------------------
class _Ready:
    def __init__(self, value: int) -> None:
        self._value = value

    def get(self) -> int:
        return self._value


class FakeCuFile:
    opened = 0

    def __init__(self, path: str, flags: str = "r") -> None:
        FakeCuFile.opened += 1
        self._fd = os.open(path, os.O_RDONLY)

    def pread(self, buf: Any, size: int, file_offset: int = 0) -> _Ready:
        view = memoryview(np.asarray(buf)).cast("B")
        return _Ready(os.preadv(self._fd, [view[:size]], file_offset))

    def close(self) -> None:
        os.close(self._fd)


def fake_kvikio(compat: bool = True, gds: bool = False) -> dict[str, types.ModuleType]:
    """``kvikio``, ``kvikio.defaults`` and ``kvikio.cufile_driver`` of the 26.x API."""
    settings = {"num_threads": 1, "task_size": 4 << 20, "gds_threshold": 1 << 20}
    kvikio = types.ModuleType("kvikio")
    kvikio.CuFile = FakeCuFile
    defaults = types.ModuleType("kvikio.defaults")
    defaults.set = lambda config, *value: settings.update(
        config if isinstance(config, dict) else {config: value[0]}
    )
    defaults.get = settings.__getitem__
    defaults.is_compat_mode_preferred = lambda: compat
    driver = types.ModuleType("kvikio.cufile_driver")

    def get(name: str) -> Any:
        if name != "is_gds_available":
            raise KeyError(name)
        if gds is None:
            raise RuntimeError("cuFile is not available")
        return gds

    driver.get = get
    kvikio.defaults, kvikio.cufile_driver = defaults, driver
    kvikio.settings = settings
    return {"kvikio": kvikio, "kvikio.defaults": defaults, "kvikio.cufile_driver": driver}


# -- nvCOMP's C API ----------------------------------------------------------------------
def _lz4_block(src: bytes, capacity: int) -> bytes:
    """A raw LZ4 block of any decoded size up to ``capacity`` (nvCOMP's contract;
    numcodecs wants the exact size)."""
    out, i, n = bytearray(), 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        literals = token >> 4
        if literals == 15:
            while True:
                literals += src[i]
                i += 1
                if src[i - 1] != 255:
                    break
        out += src[i : i + literals]
        i += literals
        if i >= n:
            break
        offset = src[i] | src[i + 1] << 8
        i += 2
        length = token & 15
        if length == 15:
            while True:
                length += src[i]
                i += 1
                if src[i - 1] != 255:
                    break
        if not 0 < offset <= len(out):
            raise ValueError("bad LZ4 match offset")
        for _ in range(length + 4):
            out.append(out[-offset])
        if len(out) > capacity:
            raise ValueError("LZ4 block larger than its buffer")
    if len(out) > capacity:
        raise ValueError("LZ4 block larger than its buffer")
    return bytes(out)


def _inflate(algorithm: str, payload: bytes, capacity: int) -> bytes:
    if algorithm == "Zstd":
        return bytes(numcodecs.zstd.decompress(payload))
    if algorithm == "LZ4":  # a raw block: numcodecs wants its exact size in front
        try:
            return bytes(numcodecs.lz4.decompress(capacity.to_bytes(4, "little") + payload))
        except Exception:  # a block decoding to fewer bytes than its buffer holds
            return _lz4_block(payload, capacity)
    if algorithm == "Gzip":
        return zlib.decompress(payload, wbits=31)
    if algorithm == "Deflate":
        return zlib.decompress(payload, wbits=-15)
    raise AssertionError(algorithm)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _rejected_reliably(algorithm: str, payload: bytes, capacity: int) -> bool:
    """A corrupt payload nvCOMP is known to reject with a status: a zstd frame
    whose only defect is its magic number. nvCOMP's headers make any other
    corrupt input undefined behaviour (``zstd.h``, ``lz4.h``: "Providing a
    corrupt buffer for decompression will result in undefined behavior")."""
    if algorithm != "Zstd" or payload[:4] == ZSTD_MAGIC:
        return algorithm in ("Gzip", "Deflate")  # zlib streams: checked, no UB modelled
    try:
        _inflate(algorithm, ZSTD_MAGIC + payload[4:], capacity)
    except Exception:
        return False
    return True


class FakeCApi(gpu_decode.NvcompCApi):
    """The real library's temp-size and alignment queries (they need no device);
    ``decompress`` follows the batched C API's contract on host addresses:
    reads the arrays of pointers and sizes, decodes each chunk (numcodecs,
    zlib) into its output buffer, writes actual sizes and statuses.

    Undefined behaviour is a sticky device fault (``cuda.fault``: every later
    call on the device raises :class:`StickyFault`): a corrupt payload other
    than a zstd frame with a bad magic number, a misaligned pointer, a stream
    of another device than the current one."""

    def __init__(self, lib=None) -> None:
        super().__init__(lib)
        self.calls: list[tuple[str, int, int]] = []
        self.crc_calls: list[int] = []  # chunks per nvcompBatchedCRC32Async call
        self.inputs: list[bytes] | None = None  # a list: every payload decompress reads
        self.cuda: FakeCuda | None = None

    def _call(self, name: str, *args: Any) -> int:
        """The CRC32 functions on host addresses (the real library needs a
        device for them); the rest through the real library."""
        if name == "nvcompBatchedCRC32GetHeuristicConf":
            _, n, conf, max_bytes, _ = args
            conf._obj.kernel_kind, conf._obj.bytes_per_read, conf._obj.blocks_per_msg = 0, 4, 1
            return 0 if n > 0 and max_bytes > 0 else 10  # nvcompErrorInvalidValue
        if name == "nvcompBatchedCRC32Async":
            return self._crc32_async(*args)
        return super()._call(name, *args)

    def _crc32_async(self, in_ptrs, in_bytes, n, crcs, opts, segment_kind, statuses, stream):
        """``nvcompBatchedCRC32Async``: each chunk's checksum by the spec in ``opts``
        (CRC32-C: the crc32c package; CRC32/PKZIP: zlib), whole messages only."""
        import crc32c

        cuda = self.cuda
        if cuda is not None:
            cuda.check()
        spec = opts.spec
        preset = (spec.poly, spec.init, spec.ref_in, spec.ref_out, spec.xorout)
        algorithms = {
            (0x1EDC6F41, 0xFFFFFFFF, True, True, 0xFFFFFFFF): crc32c.crc32c,
            (0x04C11DB7, 0xFFFFFFFF, True, True, 0xFFFFFFFF): zlib.crc32,
        }
        if preset not in algorithms or segment_kind != 0 or bytes(opts.reserved).strip(b"\0"):
            return 10  # nvcompErrorInvalidValue (here: a spec the twin does not model)
        checksum = algorithms[preset]
        self.crc_calls.append(int(n))

        def view(address: int, ctype: Any) -> np.ndarray:
            return np.ctypeslib.as_array((ctype * int(n)).from_address(address))

        ptrs, sizes = view(in_ptrs, ctypes.c_uint64), view(in_bytes, ctypes.c_uint64)
        out, status = view(crcs, ctypes.c_uint32), view(statuses, ctypes.c_int32)
        for i in range(int(n)):
            out[i] = checksum(ctypes.string_at(int(ptrs[i]), int(sizes[i])))
            status[i] = 0
        return 0

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
        cuda = self.cuda
        if cuda is not None:
            cuda.check()
            owner = cuda.by_ptr.get(stream)
            if owner is not None and owner.device not in (-1, cuda.current_device()):
                raise RuntimeError(
                    f"nvCOMP called on a stream of device {owner.device} with device "
                    f"{cuda.current_device()} current"
                )
        self.calls.append((algorithm, n, temp_bytes))

        def view(address: int, ctype: Any) -> np.ndarray:
            return np.ctypeslib.as_array((ctype * n).from_address(address))

        ins, in_n = view(in_ptrs, ctypes.c_uint64), view(in_bytes, ctypes.c_uint64)
        outs, out_n = view(out_ptrs, ctypes.c_uint64), view(out_bytes, ctypes.c_uint64)
        actual, status = view(actual_bytes, ctypes.c_uint64), view(statuses, ctypes.c_int32)
        alignment = self.alignments[algorithm]
        for i in range(n):
            if int(ins[i]) % alignment[0] or int(outs[i]) % alignment[1]:
                status[i], actual[i] = 17, 0  # nvcompErrorAlignment
                continue
            payload = ctypes.string_at(int(ins[i]), int(in_n[i]))
            if self.inputs is not None:
                self.inputs.append(payload)
            try:
                data = _inflate(algorithm, payload, int(out_n[i]))
            except Exception:
                if cuda is not None and not _rejected_reliably(algorithm, payload, int(out_n[i])):
                    cuda.fault = (
                        f"undefined behaviour: a corrupt {algorithm} payload given to nvCOMP"
                    )
                status[i], actual[i] = 12, 0  # nvcompErrorCannotDecompress
                continue
            if len(data) > int(out_n[i]):
                status[i], actual[i] = 15, 0  # nvcompErrorOutputBufferTooSmall
                continue
            ctypes.memmove(int(outs[i]), data, len(data))
            status[i], actual[i] = 0, len(data)
        return 0


def install(
    monkeypatch: Any, *, compat: bool = True, gds: bool = False, n_devices: int = 1
) -> FakeCuda:
    """Put the fakes in place of CuPy, kvikIO and nvCOMP's C API for one test."""
    import sys

    from zarrdali.gpu import backend

    cuda = FakeCuda(n_devices)
    monkeypatch.setitem(sys.modules, "cupy", cuda.cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cuda.cupyx)
    for name, module in fake_kvikio(compat, gds).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backend, "missing_gpu_requirements", lambda: [])
    api = FakeCApi()
    api.cuda = cuda
    cuda.api = api
    monkeypatch.setattr(backend, "nvcomp_capi", lambda: api)
    return cuda


# -- reference cycles --------------------------------------------------------------------
def gpu_owning_types(*extra: type) -> tuple[type, ...]:
    """The classes whose instances own GPU memory, streams or events (directly or
    through what they hold): the engine's, the fakes', and ``extra`` (CuPy's
    own on a real GPU). Not ``feed.StreamHandle``: DALI's graph keeps it in its
    reference cycles by design, and once its feed is closed it holds nothing."""
    from zarrdali.gpu import backend, cache, decode, feed, lifetimes, read

    return (
        backend.GpuBackend,
        backend._ThreadState,
        decode.BatchedDecoder,
        decode.DecodeTemp,
        decode.PythonApiDecoder,
        lifetimes.InFlight,
        lifetimes.GuardedBuffers,
        cache.GpuChunkCache,
        feed.CudaFeed,
        feed.FeedStreams,
        feed.BufferRing,
        feed.Slot,
        feed.FedArray,
        read.KvikioReader,
        read.PinnedReader,
        FakeStream,
        FakeEvent,
        DevArray,
        *extra,
    )


def gpu_garbage(*extra: type) -> list[str]:
    """Run the collector, keeping what it finds unreachable (``DEBUG_SAVEALL``):
    the names of the GPU-owning objects among them, i.e. those that only the
    collector would have freed, at a time and in a thread of its choosing."""
    owning = gpu_owning_types(*extra)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [type(obj).__name__ for obj in gc.garbage if isinstance(obj, owning)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


class BackgroundCollector:
    """``gc.collect()`` from a thread of its own at random moments (seeded) while
    a block runs: the collector then runs in the middle of any other thread's
    work, as it may in training. A finalizer of a GPU-owning object caught in a
    cycle would run there, at that moment (what crashed the first GPU path)."""

    def __init__(self, seed: int = 11, max_pause_s: float = 0.02) -> None:
        import random

        self._rng = random.Random(seed)
        self._max_pause = max_pause_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.collections = 0

    def _run(self) -> None:
        while not self._stop.wait(self._rng.random() * self._max_pause):
            gc.collect()
            self.collections += 1

    def __enter__(self) -> BackgroundCollector:
        self._thread = threading.Thread(target=self._run, name="gc-at-random-points", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
