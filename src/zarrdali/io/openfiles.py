"""Open file descriptors per reading thread, for ``os.pread`` of many files.

Each thread keeps its own descriptors (so none is closed while another thread
reads it), least recently used closed past ``max_open``; descriptors left by
threads that ended are closed when the next thread registers, the rest by
:meth:`OpenFiles.close`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict


class OpenFiles:
    """File descriptors per thread (a pool thread reads many files), least
    recently used closed past ``max_open`` per thread; :meth:`close` closes all."""

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[tuple[threading.Thread, OrderedDict[str, int]]] = []

    def fd(self, path: str) -> int:
        fds = getattr(self._local, "fds", None)
        if fds is None:
            fds = self._local.fds = OrderedDict()
            with self._lock:
                # Threads come and go: close what ended ones left open.
                alive = []
                for thread, theirs in self._all:
                    if thread.is_alive():
                        alive.append((thread, theirs))
                    else:
                        _close_all(theirs)
                self._all = [*alive, (threading.current_thread(), fds)]
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY)
            if len(fds) > self.max_open:
                os.close(fds.popitem(last=False)[1])
        else:
            fds.move_to_end(path)
        return fd

    def close(self) -> None:
        """Close every thread's descriptors (call once no thread reads)."""
        with self._lock:
            for _, fds in self._all:
                _close_all(fds)
            self._all = []


def _close_all(fds: OrderedDict[str, int]) -> None:
    while fds:
        os.close(fds.popitem()[1])
