"""One host-to-device copy per batch for the engine's small tables.

A batch's device work reads a handful of small host-built tables: the decode
table, the crc32c jobs, the four gather tables and the finishing kernel's two,
the copy jobs (payload packing, uncompressed chunks, cache admissions). Each
uploaded on its own costs a pageable staging copy, a host-to-device copy and
its synchronization; :class:`BatchUpload` packs them into one pinned buffer
(from the calling thread's ring of two, reused once the device has read it)
and one device buffer, with one ``cudaMemcpyAsync`` on the batch's stream.
The launches then take device views of it: the upload is the function the
launches already call (``upload(host_array) -> device array``), which returns
the view of a packed array, and uploads any other array alone (counted too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from zarrdali.gpu.lifetimes import GuardedBuffers

ALIGN = 16  # bytes: every table starts aligned in the packed buffers
_H2D = 1  # cudaMemcpyHostToDevice


class BatchUpload:
    """The packed upload of one batch's tables (see the module doc).

    ``add(*arrays)`` registers host arrays (the same objects are looked up
    later; one not C-contiguous is left out), ``send(stream)`` enqueues the one
    copy on ``stream``, and
    calling the object with an added array returns its device view.
    ``pinned``: the thread's ring of pinned staging buffers; ``on_upload(nbytes)``
    counts each copy (``TransferCounter.control_upload``).
    """

    def __init__(self, cp: Any, pinned: GuardedBuffers, on_upload: Callable[[int], None]) -> None:
        self._cp = cp
        self._pinned = pinned
        self._on_upload = on_upload
        self._arrays: dict[int, tuple[np.ndarray, int]] = {}  # id -> (array, offset)
        self._nbytes = 0
        self.device: Any = None  # the device buffer, once sent (the caller keeps it alive)

    def add(self, *arrays: np.ndarray | None) -> None:
        if self.device is not None:
            raise RuntimeError("the batch's tables were sent already")
        for array in arrays:
            if array is None or id(array) in self._arrays or not array.size:
                continue
            if not array.flags.c_contiguous:  # a launch makes its own contiguous copy:
                continue  # that one goes alone
            self._nbytes = -(-self._nbytes // ALIGN) * ALIGN
            self._arrays[id(array)] = (array, self._nbytes)
            self._nbytes += array.nbytes

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def send(self, stream: Any) -> Any:
        """Copy every added array to the device in one copy on ``stream``; the
        device buffer (None when nothing was added)."""
        if self.device is not None or not self._arrays:
            return self.device
        k, host = self._pinned.acquire(self._nbytes)
        try:
            for array, offset in self._arrays.values():
                host[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
            self.device = self._cp.empty(self._nbytes, dtype=self._cp.uint8)
            self._cp.cuda.runtime.memcpyAsync(
                self.device.data.ptr, host.ctypes.data, self._nbytes, _H2D, stream.ptr
            )
        except BaseException:
            self._pinned.release(k, None)
            raise
        self._pinned.release(k, stream.record())  # reused once the copy has run
        self._on_upload(self._nbytes)
        return self.device

    def __call__(self, array: np.ndarray) -> Any:
        """The device copy of ``array``: its view in the sent buffer, or (not
        added) an upload of its own."""
        if not array.size:  # nothing to copy
            return self._cp.empty(array.shape, dtype=array.dtype)
        hit = self._arrays.get(id(array))
        if hit is None or hit[0] is not array or self.device is None:
            self._on_upload(array.nbytes)
            return self._cp.asarray(array)
        _, offset = hit
        view = self.device[offset : offset + array.nbytes].view(array.dtype)
        return view.reshape(array.shape)
