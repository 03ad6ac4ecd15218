"""Read-only arrays in shared memory that spawned worker processes map too.

The CPU path's static fields travel to its workers this way instead of as
pickled copies; the training process owns the memory, each worker its map.
"""

from __future__ import annotations

import mmap
import os

import numpy as np


class SharedArray:
    """A read-only array in shared memory (``memfd``) that spawned worker processes
    map too, instead of each holding a pickled copy (the CPU path's static fields).

    The training process makes it with :meth:`of` and owns it; pickled while a
    worker is spawned, it passes its descriptor, and the worker's copy maps the
    memory and owns that map. Each side frees its own with :meth:`close`.
    """

    def __init__(self, fd: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.fd = fd
        self._map: mmap.mmap | None = mmap.mmap(
            fd, max(self.nbytes, 1), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ
        )
        self._array: np.ndarray | None = None
        self.attached = False  # a worker's copy (see _attach_shared)

    @classmethod
    def of(cls, array: np.ndarray) -> SharedArray:
        """A shared copy of ``array``."""
        array = np.ascontiguousarray(array)
        fd = os.memfd_create("zarrdali-constant", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(array.nbytes, 1))
            os.pwrite(fd, memoryview(array.reshape(-1)).cast("B"), 0)
            return cls(fd, array.shape, array.dtype)
        except BaseException:
            os.close(fd)
            raise

    @property
    def array(self) -> np.ndarray:
        """The values, read-only (a view of the map: :meth:`close` refuses to unmap
        while a view is alive rather than leave it dangling)."""
        if self._map is None:
            raise RuntimeError("the shared array is closed")
        if self._array is None:
            self._array = np.frombuffer(self._map, self.dtype, self.nbytes // self.dtype.itemsize)
            self._array = self._array.reshape(self.shape)
        return self._array

    def __reduce__(self):
        from multiprocessing import context, reduction

        if self.fd < 0:
            raise RuntimeError("a closed shared array cannot be sent")
        if context.get_spawning_popen() is None:  # else DupFd would start a fd server
            raise RuntimeError("a shared array is sent only to a process being spawned")
        return _attach_shared, (reduction.DupFd(self.fd), self.shape, self.dtype.str)

    def close(self) -> None:
        """Unmap, and close the descriptor. Idempotent."""
        self._array = None
        mm, self._map = self._map, None
        if mm is not None:
            mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _attach_shared(dup, shape: tuple[int, ...], dtype: str) -> SharedArray:
    shared = SharedArray(dup.detach(), shape, np.dtype(dtype))
    shared.attached = True  # the receiving process's own map, closed by its user
    return shared
