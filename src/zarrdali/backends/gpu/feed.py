"""The GPU path's epoch source: batches made on side CUDA streams, handed to DALI
through a ring of device buffers, with no host synchronization on the way.

UNVERIFIED on a GPU: written without one; the ordering logic is tested on the
CPU with fake streams and events (``tests/test_feed_ring.py``).

One batch ``k``, with ``depth`` batches loaded ahead:

1. A prefetch thread (its own non-blocking stream ``S``) plans the batch on the
   host (``zarrdali.plan``), takes a free buffer of the ring (``zarrdali.slot``;
   waits only when every buffer is taken), makes ``S`` wait for the buffer's
   ``free`` event, enqueues read, decode and gather into it on ``S``
   (``zarrdali.load``; ``GpuBackend.load_batch(..., out=, stream=S)``) and
   records the buffer's ``ready`` event on ``S``.
2. DALI's external-source callback for batch ``k`` (main thread,
   :meth:`CudaFeed.get`, ``zarrdali.hand_over``) first records, on the feed
   stream ``F``, the ``free`` event of the buffer handed over before (batch
   ``k - 1``) and puts it back in the ring; then makes ``F`` wait for batch
   ``k``'s ``ready`` event and returns a view of its buffer.
3. DALI copies batch ``k`` into its own buffer on ``F`` when the callback has
   returned (the external source is built with ``no_copy=False`` and
   ``cuda_stream=F``).

Why that is enough. DALI's ``Pipeline._run_input_callbacks`` calls the callbacks
of an iteration and then feeds their data (``_feed_input`` →
``SetExternalTLInput``) before it returns, so batch ``k`` is fed before DALI
asks for batch ``k + 1``, from the same thread. Feeding a GPU input with
``no_copy=False`` enqueues the copy on the stream given as ``cuda_stream``
inside that call (``InputOperator::CopyUserData``: ``Copy(batch, order)`` and
``cudaEventRecord(..., order.stream())``); DALI's queue then holds its own
copies, never our buffer. Hence:

- DALI's copy of ``k`` runs after the gather of ``k``: it is enqueued on ``F``
  after ``F`` waited for ``ready``, recorded after the gather on ``S``;
- a buffer is written again only after DALI's copy out of it: its ``free``
  event is recorded on ``F`` in the callback of ``k + 1``, after the copy of
  ``k`` was enqueued on ``F``, and the next writer's stream waits for it
  before its first operation on the buffer. (The backend writes ``out`` only
  with work enqueued on ``stream``: kvikIO's reads, which do not follow stream
  order, land in the backend's own staging buffers.)

DALI's ``prefetch_queue_depth`` decides when DALI asks for a batch, not how
long it reads ours, so the ring needs ``depth + 2`` buffers (:func:`ring_size`)
for no thread to wait: ``depth`` loaded or loading ahead, the one being handed
over, and the one handed over before whose ``free`` event is recorded in this
callback. (Were the source ``no_copy=True``, DALI would read the buffer until
the iteration's outputs are released, up to ``prefetch_queue_depth``
iterations later: ``depth + prefetch_queue_depth + 1``, and no event tells when.)
Device memory of the feed: ``ring_size(depth)`` batches, allocated once.

Nothing is freed or reused by the garbage collector: the ring owns every buffer
and event until :meth:`CudaFeed.close`, which (after the pipeline that copies
on ``F`` is shut down) stops the prefetch threads, synchronizes every stream,
then releases the events, the buffers and the streams, in that order.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ...errors import LoaderClosedError
from ...prefetch import BatchPrefetcher
from ...trace import annotate
from ..base import LoadFn


def ring_size(depth: int) -> int:
    """Device buffers a feed loading ``depth`` batches ahead needs (see the module doc)."""
    return max(1, depth) + 2


class StreamHandle:
    """The feed stream as DALI's external source holds it.

    DALI keeps the object given as ``cuda_stream`` in its graph, whose reference
    cycles outlive the pipeline until the collector runs, and reads its handle
    at every copy (``__cuda_stream__``, the CUDA stream protocol). Given the
    CuPy stream itself, the collector would decide when the stream is
    destroyed; given this, DALI holds no stream once the feed has closed it,
    and a use after that raises instead of reaching a destroyed stream.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __cuda_stream__(self) -> tuple[int, int]:
        stream = self._stream
        if stream is None:
            raise LoaderClosedError("the epoch's CUDA feed stream is closed")
        return (0, stream.ptr)

    def close(self) -> None:
        self._stream = None


class Slot:
    """One device buffer of the ring and its two events.

    ``ready``: recorded on the loading stream after the batch's last write;
    ``free``: recorded (on the feed stream, or on the loading stream after a
    failed load) once nothing will read the buffer's current batch any more.
    """

    __slots__ = ("buffer", "free", "index", "ready")

    def __init__(self, index: int, ready: Any, free: Any) -> None:
        self.index = index
        self.buffer: Any = None  # allocated on first use: bytes for a full batch
        self.ready = ready
        self.free = free

    def __repr__(self) -> str:
        return f"<Slot {self.index}>"


class BufferRing:
    """A fixed set of device buffers for batches in flight, reused in turn.

    :meth:`acquire` blocks (host) while every buffer is taken, and raises
    :class:`LoaderClosedError` once the ring is closing; :meth:`release` puts a
    buffer back. A buffer put back is written again only by a stream that first
    waits for its ``free`` event (the caller of :meth:`acquire` does that).
    """

    def __init__(self, size: int, alloc: Callable[[int], Any], new_event: Callable[[], Any]):
        self.size = size
        self._alloc = alloc
        self.slots = [Slot(i, new_event(), new_event()) for i in range(size)]
        self._free: collections.deque[Slot] = collections.deque(self.slots)
        self._cond = threading.Condition()
        self._closing = False
        self.allocations = 0  # buffers allocated (at most ``size``)

    def acquire(self, nbytes: int, capacity: int) -> Slot:
        """A free slot whose buffer holds ``nbytes`` (allocated with ``capacity``
        bytes on first use)."""
        with annotate("zarrdali.slot"), self._cond:
            while not self._free and not self._closing:
                self._cond.wait()
            if self._closing:
                raise LoaderClosedError("the epoch's CUDA feed is closed")
            slot = self._free.popleft()
            if slot.buffer is None:
                self.allocations += 1
        if slot.buffer is None:
            slot.buffer = self._alloc(max(nbytes, capacity))
        elif slot.buffer.nbytes < nbytes:
            self.release(slot)
            raise ValueError(
                f"a batch of {nbytes} bytes does not fit the feed's buffers of "
                f"{slot.buffer.nbytes} bytes (sized for batch_size samples)"
            )
        return slot

    def release(self, slot: Slot) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def cancel_waiters(self) -> None:
        """Make every waiting and later :meth:`acquire` raise."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def release_events(self) -> None:
        for slot in self.slots:
            slot.ready = slot.free = None

    def release_buffers(self) -> None:
        for slot in self.slots:
            slot.buffer = None
        self._free.clear()
        self._alloc = None  # it holds the feed stream


def view(buffer: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """The first bytes of a ``uint8`` buffer as a C-contiguous array of ``shape``."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[:nbytes].view(dtype).reshape(shape)


class _SideStreams:
    """One non-blocking stream per loading thread, owned here (not in
    thread-locals, which would be freed whenever a thread ends)."""

    def __init__(self, new_stream: Callable[[], Any]) -> None:
        self._new = new_stream
        self._lock = threading.Lock()
        self._streams: dict[int, Any] = {}
        self._closed = False

    def current(self) -> Any:
        ident = threading.get_ident()
        with self._lock:
            if self._closed:
                raise LoaderClosedError("the epoch's CUDA feed is closed")
            stream = self._streams.get(ident)
            if stream is None:
                stream = self._streams[ident] = self._new()
        return stream

    def take_all(self) -> list[Any]:
        with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
        return streams


def _load_into_slot(
    k: int, *, load: LoadFn, ring: BufferRing, streams: _SideStreams, batch_size: int
) -> tuple[tuple[Any, ...], np.ndarray, Slot]:
    """In a prefetch thread: batch ``k`` assembled in a ring slot on this thread's
    stream, and the slot (its ``ready`` event recorded after the batch)."""
    stream = streams.current()
    taken: list[Slot] = []

    def out_for(shape: tuple[int, ...], dtype: np.dtype) -> Any:
        per_sample = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        slot = ring.acquire(shape[0] * per_sample, batch_size * per_sample)
        taken.append(slot)
        stream.wait_event(slot.free)  # DALI's copy of the slot's previous batch
        return view(slot.buffer, shape, dtype)

    try:
        with stream:
            frames, samples = load(k, out_for=out_for, stream=stream)
        if not taken:
            raise RuntimeError("the GPU feed's load did not assemble the batch in a ring slot")
        taken[0].ready.record(stream)
    except BaseException:
        for slot in taken:  # what was enqueued may still write it: the next user waits
            slot.free.record(stream)
            ring.release(slot)
        raise
    return frames, samples, taken[0]


class CudaFeed:
    """The GPU path's :class:`~zarrdali.backends.base.EpochSource` (see the module doc).

    ``cuda`` is the CuPy module (tests pass a fake with ``cuda.Stream``,
    ``cuda.Event`` and ``empty``).
    """

    def __init__(
        self,
        load: LoadFn,
        n_batches: int,
        *,
        depth: int,
        batch_size: int,
        workers: int = 2,
        cuda: Any = None,
    ) -> None:
        if cuda is None:
            import cupy as cuda

        self._closed = False
        self._close_lock = threading.Lock()
        self.stream = cuda.cuda.Stream(non_blocking=True)  # DALI copies on this one
        self.cuda_stream = StreamHandle(self.stream)  # what the pipeline is given
        self._streams = _SideStreams(partial(cuda.cuda.Stream, non_blocking=True))
        # Buffers are allocated in the memory pool of the stream that reads them last.
        self.ring = BufferRing(
            ring_size(depth),
            alloc=partial(_alloc_on, cuda, self.stream),
            new_event=partial(cuda.cuda.Event, block=False, disable_timing=True),
        )
        self._handed: collections.deque[Slot] = collections.deque()  # fed, not yet freed
        # The prefetcher refers to the ring and streams, not to this object: no cycle.
        self._prefetcher: BatchPrefetcher | None = BatchPrefetcher(
            partial(
                _load_into_slot,
                load=load,
                ring=self.ring,
                streams=self._streams,
                batch_size=batch_size,
            ),
            n_batches,
            depth=depth,
            workers=workers,
        )

    def get(self, k: int) -> tuple[tuple[Any, ...], np.ndarray]:
        """DALI's callback for batch ``k``: order the feed stream after it (no host wait)."""
        prefetcher = self._prefetcher
        if self._closed or prefetcher is None:
            raise LoaderClosedError("the epoch's CUDA feed is closed")
        frames, samples, slot = prefetcher.get(k)
        with annotate("zarrdali.hand_over"):
            # DALI fed the batches handed over before this callback, so their
            # copies are enqueued on the feed stream: free once they have run.
            while self._handed:
                done = self._handed.popleft()
                done.free.record(self.stream)
                self.ring.release(done)
            self.stream.wait_event(slot.ready)
            self._handed.append(slot)
        return frames, samples

    def close(self) -> None:
        """Release everything, in order; idempotent. Call after the pipeline built
        with :attr:`cuda_stream` is shut down (nothing copies on it any more).

        1. the prefetch threads: waiters for a slot woken, loads not started
           cancelled, running ones finished, threads joined;
        2. every stream synchronized: no work in flight reads or writes a buffer;
        3. the events, then the ring's buffers, then the streams.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        errors: list[BaseException] = []
        self.ring.cancel_waiters()
        prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            _step(errors, prefetcher.close)
        del prefetcher
        streams = [*self._streams.take_all(), self.stream]
        for stream in streams:
            _step(errors, stream.synchronize)
        self._handed.clear()
        self.ring.release_events()
        self.ring.release_buffers()
        self.cuda_stream.close()
        self.stream = None
        streams.clear()
        if errors:
            raise errors[0]


def _alloc_on(cuda: Any, stream: Any, nbytes: int) -> Any:
    with stream:
        return cuda.empty(nbytes, dtype=np.uint8)


def _step(errors: list[BaseException], step: Callable[[], Any]) -> None:
    try:
        step()
    except BaseException as err:  # raised by close() once every step has run
        errors.append(err)


class CudaSourceRole:
    """What a CUDA backend tells the loader: DALI runs on this rank's GPU, a batch
    is one window (the pipeline slices input and target on the device), and
    each epoch's batches come from a :class:`CudaFeed`. ``GpuBackend`` takes it
    as a base class."""

    dali_device = "gpu"
    whole_window = True

    def dali_device_id(self) -> int:
        return cuda_device_id()

    def batch_source(self, load: LoadFn, n_batches: int, *, depth: int, batch_size: int):
        return CudaFeed(load, n_batches, depth=depth, batch_size=batch_size)


def cuda_device_id() -> int:
    """This rank's GPU: ``LOCAL_RANK`` under torchrun, else torch's current device."""
    import os

    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    import torch

    return torch.cuda.current_device()
