"""Hand batches assembled on side CUDA streams to DALI without a host sync.

UNVERIFIED: written without a GPU at hand; the CPU path does not use it.

Each prefetch thread loads its batch on its own non-blocking stream and records
an event when the batch is complete. When DALI asks for batch k, the feed
stream (the one DALI copies the external source's data on) waits on exactly
that event, so DALI never reads a half-written batch and the host never blocks.
A batch's device buffer is kept alive for ``keep_alive`` further batches, the
depth of DALI's queue, so it is not recycled while DALI may still read it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

import numpy as np


class CudaFeed:
    def __init__(self, load: Callable[[int], tuple[Any, np.ndarray]], keep_alive: int) -> None:
        import cupy

        self._cupy = cupy
        self._load = load
        self._local = threading.local()
        self.stream = cupy.cuda.Stream(non_blocking=True)  # DALI copies on this one
        self._alive: collections.deque = collections.deque(maxlen=max(keep_alive, 1) + 1)

    def _thread_stream(self):
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._cupy.cuda.Stream(non_blocking=True)
        return stream

    def load(self, k: int) -> tuple[Any, np.ndarray, Any]:
        """In a prefetch thread: batch ``k`` on this thread's stream, and its event."""
        stream = self._thread_stream()
        with stream:
            frames, samples = self._load(k)
            ready = stream.record()
        return frames, samples, ready

    def hand_over(self, loaded: tuple[Any, np.ndarray, Any]) -> tuple[Any, np.ndarray]:
        """In DALI's callback: order the feed stream after the batch, keep it alive."""
        frames, samples, ready = loaded
        self.stream.wait_event(ready)
        self._alive.append(frames)
        return frames, samples


def cuda_device_id() -> int:
    """This rank's GPU: ``LOCAL_RANK`` under torchrun, else torch's current device."""
    import os

    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    import torch

    return torch.cuda.current_device()
