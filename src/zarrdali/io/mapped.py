"""Read-only memory maps of a local store's files, leased batch by batch.

Decoding straight from a file's pages in the page cache spares the copy that
``pread`` makes of every encoded byte (about 10 MB and 2 ms per batch of the
sharded sample store on the 2-core machine). A batch *leases* the maps of the
files it reads: a leased map is never unmapped, so the raw addresses the
decoders are given stay valid until the lease is released. Past ``max_maps``
the least recently used maps that no lease holds are unmapped.

A file that cannot be mapped (a file system without mmap) is read with
``pread`` instead; its lease entry says so (``mapped`` is False).

Maps reflect the file as it is on disk: a file truncated while it is mapped
makes reading the lost pages fault (SIGBUS), so a store must not be rewritten
in place while a loader reads it. Every chunk's range is checked against the
file's size when it is leased, so a file that was short all along gives a
named error.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np


class _Map:
    """One file's map (or the fact that it has none) and how many leases hold it."""

    __slots__ = ("_mm", "array", "base", "mapped", "pins", "size", "view")

    def __init__(self, path: str) -> None:
        self.pins = 0
        self._mm: mmap.mmap | None = None
        self.array: np.ndarray | None = None
        self.view: memoryview | None = None
        self.base = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            if self.size:
                try:
                    self._mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                except (OSError, ValueError):
                    self._mm = None  # read with pread instead
        finally:
            os.close(fd)  # the map keeps the file's pages; the descriptor is not needed
        self.mapped = self._mm is not None or self.size == 0
        if self._mm is not None:
            self.view = memoryview(self._mm)
            self.array = np.frombuffer(self._mm, dtype=np.uint8)
            self.base = self.array.ctypes.data

    def close(self) -> None:
        if self._mm is None:
            return
        self.view.release()
        self.array = self.view = None
        mm, self._mm = self._mm, None
        # A slice that outlived its batch (held by an exception's traceback)
        # keeps the pages mapped until that last reference goes.
        with contextlib.suppress(BufferError):
            mm.close()


class MapLease:
    """The maps of one batch's files, valid until :meth:`release`.

    ``base`` (int64, per file; 0 where unmapped), ``size`` (int64, the file's
    size) and ``mapped`` (bool) are in the order of the paths leased.
    """

    def __init__(self, owner: MappedFiles, maps: list[_Map]) -> None:
        self._owner = owner
        self._maps = maps
        self.base = np.array([m.base for m in maps], dtype=np.int64)
        self.size = np.array([m.size for m in maps], dtype=np.int64)
        self.mapped = np.array([m.mapped for m in maps], dtype=bool)

    def view(self, file: int) -> memoryview:
        """The whole of leased file ``file`` as bytes (it must be mapped)."""
        view = self._maps[file].view
        return view if view is not None else memoryview(b"")

    def release(self) -> None:
        """Let the maps go (idempotent)."""
        maps, self._maps = self._maps, []
        if maps:
            self._owner._release(maps)


class MappedFiles:
    """Maps of files shared by all threads, least recently used unmapped past
    ``max_maps`` once no lease holds them; :meth:`close` unmaps everything."""

    def __init__(self, max_maps: int = 4096) -> None:
        self.max_maps = max_maps
        self._maps: OrderedDict[str, _Map] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def lease(self, paths: Iterable[str]) -> MapLease:
        """Map (or find mapped) every path and hold the maps for one batch.

        Raises the ``OSError`` of a file that cannot be opened; the caller
        names the chunk.
        """
        held: list[_Map] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("the store's file maps were closed")
            try:
                for path in paths:
                    entry = self._maps.get(path)
                    if entry is None:
                        entry = self._maps[path] = _Map(path)
                    else:
                        self._maps.move_to_end(path)
                    entry.pins += 1
                    held.append(entry)
            except BaseException:
                self._unpin(held)
                raise
            self._evict()
        return MapLease(self, held)

    def _release(self, maps: list[_Map]) -> None:
        with self._lock:
            self._unpin(maps)
            self._evict()

    @staticmethod
    def _unpin(maps: list[_Map]) -> None:
        for entry in maps:
            entry.pins -= 1

    def _evict(self) -> None:
        """Unmap least recently used maps no lease holds, down to ``max_maps``."""
        excess = len(self._maps) - self.max_maps
        if excess <= 0:
            return
        idle = []
        for path, entry in self._maps.items():  # oldest first
            if entry.pins == 0:
                idle.append(path)
                if len(idle) == excess:
                    break
        for path in idle:
            self._maps.pop(path).close()

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        """Unmap every file (call once no thread reads). Idempotent."""
        with self._lock:
            self._closed = True
            maps, self._maps = list(self._maps.values()), OrderedDict()
        for entry in maps:
            entry.close()
