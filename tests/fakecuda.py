"""A fake of the CuPy calls the GPU feed makes, that records GPU ordering.

Nothing runs on a device: every operation enqueued on a :class:`FakeStream` is
recorded with a vector clock, so a test can ask whether one operation is
ordered before another on the GPU timeline (``happens_before``), the way CUDA
orders them: in stream order, and across streams only through an event
recorded on one stream and waited for by another. Buffers are numpy arrays.

Release order is observable too: events, buffers and streams append to
``device.log`` when they are freed (by reference counting), streams when
they are synchronized.
"""

from __future__ import annotations

import threading
import types
import weakref
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Op:
    stream: int
    seq: int
    clock: dict  # stream id -> last op of that stream ordered before (or being) this one
    what: tuple


def happens_before(a: Op, b: Op) -> bool:
    """``a`` is ordered before ``b`` on the GPU (``b`` cannot start before ``a`` ends)."""
    return a is not b and a.seq <= b.clock.get(a.stream, 0)


class FakeDevice:
    """``cuda_array_interface``: buffers expose one, whose stream entry is the
    calling thread's current stream when it is read (1, the legacy default
    stream, outside any ``with stream``), as CuPy's arrays do."""

    def __init__(self, cuda_array_interface: bool = False) -> None:
        self.cuda_array_interface = cuda_array_interface
        self.lock = threading.Lock()
        self.ops: list[Op] = []
        self.log: list[tuple[str, int]] = []
        self.buffers: dict[int, int] = {}  # address -> id of the buffer allocated there
        self._ids = 0
        self.current = threading.local()
        self.cuda = types.SimpleNamespace(Stream=self.stream, Event=self.event)

    # the module-level names the feed uses: cupy.cuda.Stream, cupy.cuda.Event, cupy.empty
    def stream(self, non_blocking: bool = False) -> FakeStream:
        return FakeStream(self, self._next_id())

    def event(self, block: bool = False, disable_timing: bool = False) -> FakeEvent:
        return FakeEvent(self, self._next_id())

    def empty(self, n: int, dtype=np.uint8) -> np.ndarray:
        buf = np.zeros(n, dtype=dtype)
        if self.cuda_array_interface:
            buf = buf.view(CaiArray)
            buf.device_of = self
        ident = self._next_id()
        weakref.finalize(buf, self.log.append, ("buffer freed", ident))
        with self.lock:
            self.log.append(("buffer allocated", ident))
            # an address freed and allocated again is another buffer
            self.buffers[_address(buf)] = ident
        return buf

    def buffer_id(self, array: np.ndarray) -> int:
        """The buffer an array views (views of one ring slot share it)."""
        return self.buffers[_address(array)]

    def _next_id(self) -> int:
        with self.lock:
            self._ids += 1
            return self._ids

    def ops_with(self, kind: str) -> list[Op]:
        return [op for op in self.ops if op.what[0] == kind]


class FakeStream:
    def __init__(self, device: FakeDevice, ident: int) -> None:
        self.device = device
        self.id = ident
        self.ptr = 0x1000 + ident
        self.clock: dict[int, int] = {}
        device.log.append(("stream created", ident))
        weakref.finalize(self, device.log.append, ("stream freed", ident))

    def enqueue(self, *what) -> Op:
        with self.device.lock:
            seq = self.clock.get(self.id, 0) + 1
            self.clock[self.id] = seq
            op = Op(self.id, seq, dict(self.clock), what)
            self.device.ops.append(op)
            return op

    def wait_event(self, event: FakeEvent) -> None:
        with self.device.lock:
            for stream, seq in event.clock.items():
                self.clock[stream] = max(self.clock.get(stream, 0), seq)

    def synchronize(self) -> None:
        with self.device.lock:
            self.device.log.append(("stream synchronized", self.id))

    def __enter__(self) -> FakeStream:
        stack = getattr(self.device.current, "stack", None)
        if stack is None:
            stack = self.device.current.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.device.current.stack.pop()


class FakeEvent:
    def __init__(self, device: FakeDevice, ident: int) -> None:
        self.device = device
        self.id = ident
        self.clock: dict[int, int] = {}  # never recorded: waiting for it waits for nothing
        weakref.finalize(self, device.log.append, ("event freed", ident))

    def record(self, stream: FakeStream) -> None:
        with self.device.lock:
            self.clock = dict(stream.clock)


class CaiArray(np.ndarray):
    """A host buffer with CuPy's ``__cuda_array_interface__`` behaviour."""

    device_of: FakeDevice | None = None

    def __array_finalize__(self, obj) -> None:
        self.device_of = getattr(obj, "device_of", None)

    @property
    def __cuda_array_interface__(self) -> dict:
        stack = getattr(self.device_of.current, "stack", None) if self.device_of else None
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ctypes.data, False),
            "version": 3,
            "strides": None,
            "stream": stack[-1].ptr if stack else 1,
        }


def _address(array: np.ndarray) -> int:
    base = array
    while base.base is not None:
        base = base.base
    return base.__array_interface__["data"][0]


def check_reuse_order(device: FakeDevice) -> int:
    """Every buffer's writes and DALI's copies alternate on the GPU timeline:
    write 1 → copy 1 → write 2 → copy 2 ... Returns the number of copies checked."""
    writes: dict[int, list[Op]] = {}
    copies: dict[int, list[Op]] = {}
    for op in device.ops:
        if op.what[0] == "write":
            writes.setdefault(op.what[1], []).append(op)
        elif op.what[0] == "copy":
            copies.setdefault(op.what[1], []).append(op)
    checked = 0
    for buf, ws in writes.items():
        cs = copies.get(buf, [])
        assert len(cs) in (len(ws), len(ws) - 1), (buf, len(ws), len(cs))
        for i, c in enumerate(cs):
            assert happens_before(ws[i], c), (
                f"DALI's copy {i} of buffer {buf} may read a half batch"
            )
            if i + 1 < len(ws):
                assert happens_before(c, ws[i + 1]), (
                    f"write {i + 1} of buffer {buf} may overwrite it before DALI's copy {i}"
                )
            checked += 1
    return checked
