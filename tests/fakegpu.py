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
import os
import types
import zlib
from typing import Any

import numcodecs
import numpy as np

from zarrdali.backends.gpu import decode as gpu_decode
from zarrdali.backends.gpu.plan import GatherTables, gather_reference


class _Ptr:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class DevArray(np.ndarray):
    """A "device" array: numpy, with CuPy's ``.data.ptr``, ``get`` and ``set``."""

    @property
    def data(self) -> _Ptr:  # type: ignore[override]
        return _Ptr(self.ctypes.data)

    def get(self, stream: Any = None) -> np.ndarray:
        return np.array(self)

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        np.copyto(np.asarray(self), np.asarray(arr).reshape(self.shape))


def dev(a: np.ndarray) -> DevArray:
    return np.ascontiguousarray(a).view(DevArray)


class FakeEvent:
    def __init__(self, cuda: FakeCuda, stream: FakeStream) -> None:
        self._cuda = cuda
        self.stream = stream
        self._done = not cuda.hold_events

    @property
    def done(self) -> bool:
        return self._done

    def synchronize(self) -> None:
        self._cuda.host_waits += 1
        self._done = True


class FakeStream:
    _next_ptr = 0x1000

    def __init__(self, cuda: FakeCuda, non_blocking: bool = False) -> None:
        self._cuda = cuda
        FakeStream._next_ptr += 0x10
        self.ptr = FakeStream._next_ptr
        self.events: list[FakeEvent] = []
        self.synchronized = 0

    def record(self) -> FakeEvent:
        event = FakeEvent(self._cuda, self)
        self.events.append(event)
        return event

    def synchronize(self) -> None:
        self.synchronized += 1
        self.complete()

    def complete(self) -> None:
        for event in self.events:
            event._done = True
        self.events.clear()

    def wait_event(self, event: FakeEvent) -> None:
        self._cuda.device_waits += 1

    def __enter__(self) -> FakeStream:
        self._cuda.current.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cuda.current.pop()


class FakeKernel:
    """``zarrdali_pack`` as a loop of copies; ``zarrdali_gather`` as its numpy twin."""

    def __init__(self, cuda: FakeCuda, source: str, name: str) -> None:
        self._cuda = cuda
        self.name = name

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        self._cuda.launches.append(self.name)
        if self.name == "zarrdali_pack":
            src, dst, jobs, n = args
            src, dst = np.asarray(src), np.asarray(dst)
            for s, d, k in np.asarray(jobs).reshape(int(n), 3).tolist():
                dst[d : d + k] = src[s : s + k]
            return
        assert self.name == "zarrdali_gather", self.name
        decoded, tiles, tile_chunks, slots, variables, n_tiles, n_l, n_y, n_x, h, w, out = args
        assert tuple(out.shape[-2:]) == (int(h), int(w))
        gather = GatherTables(
            tiles=np.asarray(tiles),
            tile_chunks=np.asarray(tile_chunks).reshape(int(n_tiles), int(n_l), int(n_y), int(n_x)),
            chunk_slots=np.asarray(slots),
            variables=np.asarray(variables),
            out_shape=tuple(out.shape),
            out_dtype=out.dtype,
        )
        np.asarray(out)[...] = gather_reference(np.asarray(decoded), gather)


class _MemoryPool:
    def __init__(self, cuda: FakeCuda) -> None:
        self._cuda = cuda

    def total_bytes(self) -> int:
        return self._cuda.allocated


class FakeCuda:
    """The fake ``cupy`` and ``cupyx`` modules and their state."""

    def __init__(self) -> None:
        self.hold_events = False
        self.current: list[FakeStream] = []
        self.default_stream = FakeStream(self)
        self.launches: list[str] = []
        self.host_waits = 0
        self.device_waits = 0
        self.allocated = 0
        self.copies: list[tuple[int, int]] = []  # (kind, bytes) of memcpyAsync
        self.cupy = self._cupy()
        self.cupyx = types.ModuleType("cupyx")
        self.pinned = 0  # pinned buffers made

        def empty_pinned(n: int, dtype: Any = np.uint8) -> np.ndarray:
            self.pinned += 1
            return np.zeros(n, dtype=dtype)

        self.cupyx.empty_pinned = empty_pinned

    def complete_events(self) -> None:
        """Every stream has finished its work (no host wait)."""
        for stream in self.streams:
            stream.complete()

    @property
    def streams(self) -> list[FakeStream]:
        return [self.default_stream, *self._streams]

    def _cupy(self) -> types.ModuleType:
        cuda = self
        self._streams: list[FakeStream] = []
        cp = types.ModuleType("cupy")
        for name in ("uint8", "int8", "int32", "int64", "uint64", "float32", "float64"):
            setattr(cp, name, getattr(np, name))
        cp.ndarray = DevArray

        def empty(shape, dtype=np.float64):
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            cuda.allocated += nbytes
            raw = np.full(nbytes, 0xEE, dtype=np.uint8)  # poison: unwritten bytes show
            return raw.view(dtype).reshape(shape).view(DevArray)

        def asarray(a, dtype=None):
            return dev(np.array(a, dtype=dtype))

        cp.empty = empty
        cp.asarray = asarray
        cp.zeros = lambda shape, dtype=np.float64: dev(np.zeros(shape, dtype))
        cp.full = lambda shape, value, dtype=None: dev(np.full(shape, value, dtype))
        for name in ("where", "arange", "count_nonzero", "add", "multiply", "concatenate"):
            setattr(cp, name, getattr(np, name))
        cp.lib = np.lib  # stride_tricks.as_strided
        cp.RawKernel = lambda source, name: FakeKernel(cuda, source, name)
        cp.get_default_memory_pool = lambda: _MemoryPool(cuda)

        def new_stream(non_blocking: bool = False) -> FakeStream:
            stream = FakeStream(cuda, non_blocking)
            cuda._streams.append(stream)
            return stream

        def memcpy_async(dst: int, src: int, n: int, kind: int, stream: int) -> None:
            ctypes.memmove(dst, src, n)
            cuda.copies.append((kind, n))

        runtime = types.SimpleNamespace(
            memcpyAsync=memcpy_async,
            memGetInfo=lambda: (1 << 30, 1 << 31),
            getDeviceCount=lambda: 1,
        )
        cp.cuda = types.SimpleNamespace(
            Stream=new_stream,
            get_current_stream=lambda: cuda.current[-1] if cuda.current else cuda.default_stream,
            runtime=runtime,
            Device=lambda *a: types.SimpleNamespace(id=0),
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
def _inflate(algorithm: str, payload: bytes, capacity: int) -> bytes:
    if algorithm == "Zstd":
        return bytes(numcodecs.zstd.decompress(payload))
    if algorithm == "LZ4":  # a raw block: numcodecs wants the size prefix back
        return bytes(numcodecs.lz4.decompress(capacity.to_bytes(4, "little") + payload))
    if algorithm == "Gzip":
        return zlib.decompress(payload, wbits=31)
    if algorithm == "Deflate":
        return zlib.decompress(payload, wbits=-15)
    raise AssertionError(algorithm)


class FakeCApi(gpu_decode.NvcompCApi):
    """The real library's temp-size and alignment queries (they need no device);
    ``decompress`` follows the batched C API's contract on host addresses:
    reads the arrays of pointers and sizes, decodes each chunk (numcodecs,
    zlib) into its output buffer, writes actual sizes and statuses."""

    def __init__(self, lib=None) -> None:
        super().__init__(lib)
        self.calls: list[tuple[str, int, int]] = []

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
            try:
                data = _inflate(algorithm, payload, int(out_n[i]))
            except Exception:
                status[i], actual[i] = 12, 0  # nvcompErrorCannotDecompress
                continue
            if len(data) > int(out_n[i]):
                status[i], actual[i] = 15, 0  # nvcompErrorOutputBufferTooSmall
                continue
            ctypes.memmove(int(outs[i]), data, len(data))
            status[i], actual[i] = 0, len(data)
        return 0


def install(monkeypatch: Any, *, compat: bool = True, gds: bool = False) -> FakeCuda:
    """Put the fakes in place of CuPy, kvikIO and nvCOMP's C API for one test."""
    import sys

    from zarrdali.backends.gpu import backend

    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "cupy", cuda.cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cuda.cupyx)
    for name, module in fake_kvikio(compat, gds).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backend, "missing_gpu_requirements", lambda: [])
    api = FakeCApi()
    cuda.api = api
    monkeypatch.setattr(backend, "nvcomp_capi", lambda: api)
    return cuda
