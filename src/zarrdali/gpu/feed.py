"""The GPU path's epoch source: batches made on side CUDA streams, handed to DALI
through a ring of device buffers, with no host synchronization on the way.

UNVERIFIED on a GPU: written without one; the ordering logic is tested on the
CPU with fake streams and events (``tests/test_feed_ring.py``).

One batch ``k``, with ``depth`` batches loaded ahead:

1. A prefetch thread (on the loader's device, with a non-blocking side stream
   ``S`` leased for the epoch) plans the batch on the host
   (``zarrdali.plan``), takes a free buffer of the ring (``zarrdali.slot``;
   waits only when every buffer is taken), enqueues read and decode on ``S``,
   then, just before the gather writes the buffer, makes ``S`` wait for the
   buffer's ``free`` event (``before_write``), enqueues the gather into it
   (``zarrdali.load``; ``GpuBackend.load_batch(..., out=, stream=S,
   before_write=)``) and records the buffer's ``ready`` event on ``S``. The
   read and decode of a batch so never wait for DALI's copy of the buffer's
   previous batch, nor for anything that copy waited for.
2. DALI's external-source callback for batch ``k`` (main thread,
   :meth:`CudaFeed.get`, ``zarrdali.hand_over``) first records, on the feed
   stream ``F``, the ``free`` event of the buffer handed over before (batch
   ``k - 1``) and puts it back in the ring; then makes ``F`` wait for batch
   ``k``'s ``ready`` event and returns the buffer as a :class:`FedArray`: its
   CUDA array interface taken with ``F`` current, so it names ``F`` as the
   stream its data is ordered on. (A CuPy array computes that entry when it is
   read, from the reading thread's current stream: read by DALI on the main
   thread it would name the legacy default stream, and DALI's copy would then
   wait for everything torch queued there, the previous training step
   included, and the next batch's gather for that copy.)
3. DALI copies batch ``k`` into its own buffer on ``F`` when the callback has
   returned (the external source is built with ``no_copy=False`` and
   ``cuda_stream=F``).

The batch's check (crc32c and decode statuses, a few bytes the device writes
after the decode: :class:`~.decode.DecodeCheck`) is read in step 2, not in
step 1: a load in a prefetch thread runs inside :func:`deferring_checks`, so
the backend hands the check over instead of waiting for it, and the callback
raises for a bad chunk of batch ``k`` before handing ``k`` over. The loading
threads never wait for their own decodes; the callback waits only for batch
``k``'s, loaded ``depth`` batches ahead.

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

Streams live as long as the backend (:class:`FeedStreams`): the feed stream
and the side streams are created once and reused by every epoch. CuPy's
memory pool keeps a freed block in the arena of the stream it was allocated
under (``cupy/cuda/memory.pyx``, ``SingleDeviceMemoryPool._arena``): buffers
allocated under streams made anew each epoch would stay cached under dead
streams, one set per epoch, until ``free_all_blocks()``.

Nothing is freed or reused by the garbage collector: the ring owns every buffer
and event until :meth:`CudaFeed.close`, which (after the pipeline that copies
on ``F`` is shut down) stops the prefetch threads, synchronizes every stream,
then releases the events and the buffers, and gives the side streams back
(a feed that made its own :class:`FeedStreams` closes them last).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from zarrdali.batch.backend import LoadFn
from zarrdali.errors import LoaderClosedError
from zarrdali.gpu.prefetch import BatchPrefetcher
from zarrdali.trace import annotate

_deferred = threading.local()


@contextlib.contextmanager
def deferring_checks():
    """Inside: a backend's ``load_batch`` on a given stream puts its batch check
    (``DecodeCheck``) in the yielded list instead of waiting for it; whoever
    hands the batch on calls ``raise_if_bad()`` on each (this thread only)."""
    checks: list[Any] = []
    outer = getattr(_deferred, "checks", None)
    _deferred.checks = checks
    try:
        yield checks
    finally:
        _deferred.checks = outer


def check_sink() -> list[Any] | None:
    """The list of the innermost :func:`deferring_checks` of this thread, or None."""
    return getattr(_deferred, "checks", None)


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


_PACK_ALIGN = 256  # bytes: each array of a slot starts aligned as cudaMalloc's do


def _packed_offsets(
    shape: tuple[int, ...], dtypes: tuple[np.dtype, ...], n: int | None = None
) -> tuple[list[int], int]:
    """Offsets of one array of ``shape`` (``n`` samples, default ``shape[0]``) per
    dtype, one after another, each aligned; and the bytes they span."""
    n = shape[0] if n is None else n
    offsets, end = [], 0
    for dtype in dtypes:
        end = -(-end // _PACK_ALIGN) * _PACK_ALIGN
        offsets.append(end)
        end += n * math.prod(shape[1:]) * np.dtype(dtype).itemsize
    return offsets, end


def packed_nbytes(
    shape: tuple[int, ...], dtypes: tuple[np.dtype, ...], n: int | None = None
) -> int:
    """Bytes a slot needs for one array of ``shape`` per dtype (``n`` samples)."""
    return _packed_offsets(shape, dtypes, n)[1]


def packed_views(buffer: Any, shape: tuple[int, ...], dtypes: tuple[np.dtype, ...]) -> list:
    """One C-contiguous array of ``shape`` per dtype, packed in a ``uint8`` buffer."""
    offsets, _ = _packed_offsets(shape, dtypes)
    return [
        view(buffer[offset:], shape, dtype) for offset, dtype in zip(offsets, dtypes, strict=True)
    ]


class FedArray:
    """A ring buffer's batch as DALI's GPU external source takes it: the CUDA
    array interface of ``array`` taken while the feed stream was current, so it
    names that stream (see the module doc, step 2). Holds ``array`` (DALI keeps
    this object, hence the buffer, alive until its copy is done)."""

    __slots__ = ("__cuda_array_interface__", "array", "dtype", "shape")

    def __init__(self, array: Any, stream: Any) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        with stream:
            self.__cuda_array_interface__ = array.__cuda_array_interface__

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # For host stand-ins of device arrays only (CuPy refuses implicit copies).
        return np.asarray(self.array, dtype=dtype)


def hand_over(array: Any, stream: Any) -> Any:
    """``array`` as DALI should read it: a :class:`FedArray` naming ``stream``
    when it is a device array (it has a CUDA array interface), else as it is."""
    if hasattr(array, "__cuda_array_interface__"):
        return FedArray(array, stream)
    return array


class FeedStreams:
    """The CUDA streams of a backend's GPU feeds, made once and reused by every
    epoch (see the module doc): the feed stream DALI copies on, and
    non-blocking side streams leased to the loading threads, one each.

    Owned by the backend (or by a :class:`CudaFeed` made without one);
    :meth:`close` synchronizes and drops them. ``cuda``: the CuPy module (or a
    fake); ``device``: a context manager making the loader's device current
    (None: the calling thread's)."""

    def __init__(self, cuda: Any, device: Callable[[], Any] | None = None) -> None:
        self._cuda = cuda
        self.device = device or contextlib.nullcontext
        self._lock = threading.Lock()
        self._feed: Any = None
        self._free: list[Any] = []  # side streams not leased
        self._made = 0
        self._closed = False

    def _new(self) -> Any:
        with self.device():
            stream = self._cuda.cuda.Stream(non_blocking=True)
        self._made += 1
        return stream

    def feed_stream(self) -> Any:
        with self._lock:
            self._check()
            if self._feed is None:
                self._feed = self._new()
            return self._feed

    def lease(self) -> Any:
        """A side stream for one loading thread (back with :meth:`give_back`)."""
        with self._lock:
            self._check()
            return self._free.pop() if self._free else self._new()

    def give_back(self, streams: list[Any]) -> None:
        """Side streams whose work has been synchronized."""
        with self._lock:
            if not self._closed:
                self._free.extend(streams)

    @property
    def made(self) -> int:
        """Streams created so far (the feed stream included)."""
        return self._made

    def _check(self) -> None:
        if self._closed:
            raise LoaderClosedError("the GPU feed's streams are closed")

    def close(self, synchronize: bool = True) -> None:
        """Synchronize every stream (unless the caller just did), then drop them
        (the last references). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = [*self._free, *([self._feed] if self._feed is not None else [])]
            self._free, self._feed = [], None
        errors: list[BaseException] = []
        if synchronize:
            with self.device():
                for stream in streams:
                    _step(errors, stream.synchronize)
        streams.clear()
        if errors:
            raise errors[0]


class _SideStreams:
    """One side stream per loading thread of an epoch, leased from the
    :class:`FeedStreams` (not thread-locals, which would be freed whenever a
    thread ends)."""

    def __init__(self, streams: FeedStreams) -> None:
        self._pool = streams
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
                stream = self._streams[ident] = self._pool.lease()
        return stream

    def take_all(self) -> list[Any]:
        with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
        return streams


Loaded = tuple[tuple[Any, ...], np.ndarray, Slot, tuple[Any, ...]]  # frames, samples, slot, checks


def _load_into_slot(
    k: int,
    *,
    load: LoadFn,
    ring: BufferRing,
    streams: _SideStreams,
    batch_size: int,
    device: Callable[[], Any],
) -> Loaded:
    """In a prefetch thread: batch ``k`` assembled in a ring slot on this thread's
    stream, the slot (its ``ready`` event recorded after the batch), and the
    batch's checks, not yet waited for."""
    with device():
        return _load_on_device(k, load, ring, streams.current(), batch_size)


def _load_on_device(k: int, load: LoadFn, ring: BufferRing, stream: Any, batch_size: int) -> Loaded:
    taken: list[Slot] = []
    waited: list[Slot] = []

    def out_for(shape: tuple[int, ...], *dtypes: np.dtype) -> Any:
        # One array of `shape` per dtype (the batch, and its mask), all in one slot.
        slot = ring.acquire(packed_nbytes(shape, dtypes), packed_nbytes(shape, dtypes, batch_size))
        taken.append(slot)
        arrays = packed_views(slot.buffer, shape, dtypes)
        return arrays[0] if len(arrays) == 1 else arrays

    def before_write() -> None:
        # DALI's copy of the slot's previous batch: waited for just before the
        # gather, so the batch's read and decode do not wait for it.
        for slot in taken:
            if slot not in waited:
                stream.wait_event(slot.free)
                waited.append(slot)

    try:
        with stream, deferring_checks() as checks:
            frames, samples = load(k, out_for=out_for, stream=stream, before_write=before_write)
        if not taken:
            raise RuntimeError("the GPU feed's load did not assemble the batch in a ring slot")
        if len(waited) != len(taken):
            raise RuntimeError("the GPU feed's load wrote its ring slot without before_write()")
        taken[0].ready.record(stream)
    except BaseException:
        before_write()  # the slot's next user must also come after DALI's last copy
        for slot in taken:  # what was enqueued may still write it: the next user waits
            slot.free.record(stream)
            ring.release(slot)
        raise
    return frames, samples, taken[0], tuple(checks)


class CudaFeed:
    """The GPU path's :class:`~zarrdali.gpu.epoch.EpochSource` (see the module doc).

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
        streams: FeedStreams | None = None,
    ) -> None:
        if cuda is None:
            import cupy as cuda

        self._closed = False
        self._close_lock = threading.Lock()
        # The backend's streams, reused by every epoch (else this feed's own).
        self._own_streams = streams is None
        self._streams_pool = FeedStreams(cuda) if streams is None else streams
        self._device = self._streams_pool.device
        self.stream = self._streams_pool.feed_stream()  # DALI copies on this one
        self.cuda_stream = StreamHandle(self.stream)  # what the pipeline is given
        self._streams = _SideStreams(self._streams_pool)
        # Buffers are allocated in the memory pool of the stream that reads them last.
        with self._device():
            self.ring = BufferRing(
                ring_size(depth),
                alloc=partial(_alloc_on, cuda, self.stream, self._device),
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
                device=self._device,
            ),
            n_batches,
            depth=depth,
            workers=workers,
        )

    def get(self, k: int) -> tuple[tuple[Any, ...], np.ndarray]:
        """DALI's callback for batch ``k``: order the feed stream after it, raise
        for a bad chunk of it (the host waits for batch ``k``'s check, written
        after its decode) and hand the frames over naming the feed stream."""
        prefetcher = self._prefetcher
        if self._closed or prefetcher is None:
            raise LoaderClosedError("the epoch's CUDA feed is closed")
        frames, samples, slot, checks = prefetcher.get(k)
        with annotate("zarrdali.hand_over"), self._device():
            # DALI fed the batches handed over before this callback, so their
            # copies are enqueued on the feed stream: free once they have run.
            while self._handed:
                done = self._handed.popleft()
                done.free.record(self.stream)
                self.ring.release(done)
            self.stream.wait_event(slot.ready)
            try:
                for check in checks:
                    check.raise_if_bad()
            except BaseException:  # not handed over: free once the batch's writes are done
                slot.free.record(self.stream)
                self.ring.release(slot)
                raise
            self._handed.append(slot)
            frames = tuple(hand_over(f, self.stream) for f in frames)
        return frames, samples

    def close(self) -> None:
        """Release everything, in order; idempotent. Call after the pipeline built
        with :attr:`cuda_stream` is shut down (nothing copies on it any more).

        1. the prefetch threads: waiters for a slot woken, loads not started
           cancelled, running ones finished, threads joined;
        2. every stream synchronized: no work in flight reads or writes a buffer;
        3. the events, then the ring's buffers; the side streams go back to the
           :class:`FeedStreams` (closed here, streams last, when this feed made it).
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
        side = self._streams.take_all()
        with self._device():
            for stream in (*side, self.stream):
                _step(errors, stream.synchronize)
        self._handed.clear()
        self.ring.release_events()
        self.ring.release_buffers()
        self.cuda_stream.close()
        self.stream = None
        self._streams_pool.give_back(side)
        side.clear()
        if self._own_streams:  # synchronized above
            _step(errors, partial(self._streams_pool.close, synchronize=False))
        if errors:
            raise errors[0]


def _alloc_on(cuda: Any, stream: Any, device: Callable[[], Any], nbytes: int) -> Any:
    with device(), stream:
        return cuda.empty(nbytes, dtype=np.uint8)


def _step(errors: list[BaseException], step: Callable[[], Any]) -> None:
    try:
        step()
    except BaseException as err:  # raised by close() once every step has run
        errors.append(err)


def cuda_device_id(cuda: Any = None) -> int:
    """This rank's GPU: ``LOCAL_RANK`` under torchrun (0 when only one GPU is
    visible to the process, as launchers that give each rank its own
    ``CUDA_VISIBLE_DEVICES`` arrange), else the calling thread's current device
    (which ``torch.cuda.set_device`` sets)."""
    if cuda is None:
        import cupy as cuda

    runtime = cuda.cuda.runtime
    if "LOCAL_RANK" in os.environ:
        rank = int(os.environ["LOCAL_RANK"])
        return 0 if runtime.getDeviceCount() == 1 else rank
    return int(runtime.getDevice())
