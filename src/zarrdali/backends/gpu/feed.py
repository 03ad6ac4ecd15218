"""Hand batches assembled on side CUDA streams to DALI without a host sync.

UNVERIFIED: written without a GPU at hand; the CPU path does not use it.

Each prefetch thread loads its batch on its own non-blocking stream and records
an event when the batch is complete. When DALI asks for batch k, the feed
stream (the one DALI copies the external source's data on) waits on exactly
that event, so DALI never reads a half-written batch and the host never blocks.
A batch's device buffer is kept alive for ``keep_alive`` further batches, the
depth of DALI's queue, so it is not recycled while DALI may still read it.

The feed owns its streams, the events of the batches handed over and those
buffers, and releases them in :meth:`CudaFeed.close`, after the pipeline that
copies on :attr:`CudaFeed.stream` is shut down and the threads calling
:meth:`CudaFeed.load` are joined.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import LoaderClosedError


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


class CudaFeed:
    def __init__(self, load: Callable[[int], tuple[Any, np.ndarray]], keep_alive: int) -> None:
        import cupy

        self._cupy = cupy
        self._load: Callable[[int], tuple[Any, np.ndarray]] | None = load
        self._lock = threading.Lock()
        self._closed = False
        # One stream per loading thread, owned here (not in thread-locals, which
        # would be freed whenever a thread ends).
        self._thread_streams: dict[int, Any] = {}
        self.stream = cupy.cuda.Stream(non_blocking=True)  # DALI copies on this one
        self.dali_stream = StreamHandle(self.stream)  # what the pipeline is given
        # (frames, ready event) of the batches DALI may still read
        self._alive: collections.deque = collections.deque(maxlen=max(keep_alive, 1) + 1)

    def _thread_stream(self):
        ident = threading.get_ident()
        with self._lock:
            if self._closed:
                raise LoaderClosedError("the epoch's CUDA feed is closed")
            stream = self._thread_streams.get(ident)
            if stream is None:
                stream = self._cupy.cuda.Stream(non_blocking=True)
                self._thread_streams[ident] = stream
        return stream

    def load(self, k: int) -> tuple[Any, np.ndarray, Any]:
        """In a prefetch thread: batch ``k`` on this thread's stream, and its event."""
        stream = self._thread_stream()
        load = self._load
        if load is None:
            raise LoaderClosedError("the epoch's CUDA feed is closed")
        with stream:
            frames, samples = load(k)
            ready = stream.record()
        return frames, samples, ready

    def hand_over(self, loaded: tuple[Any, np.ndarray, Any]) -> tuple[Any, np.ndarray]:
        """In DALI's callback: order the feed stream after the batch, keep it alive."""
        if self._closed:
            raise LoaderClosedError("the epoch's CUDA feed is closed")
        frames, samples, ready = loaded
        self.stream.wait_event(ready)
        self._alive.append((frames, ready))
        return frames, samples

    def close(self) -> None:
        """Wait for the work on every stream of the feed, then release the
        buffers and events DALI may have been reading, then the streams.

        Call once the pipeline built with :attr:`stream` is shut down and no
        thread is in :meth:`load`. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = [*self._thread_streams.values(), self.stream]
            self._thread_streams = {}
        try:
            for stream in streams:
                stream.synchronize()
        finally:
            self._alive.clear()
            self._load = None
            self.dali_stream.close()
            self.stream = None
            streams.clear()


def cuda_device_id() -> int:
    """This rank's GPU: ``LOCAL_RANK`` under torchrun, else torch's current device."""
    import os

    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    import torch

    return torch.cuda.current_device()
