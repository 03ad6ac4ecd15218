"""How long the GPU engine's device and pinned buffers live: explicit, event-driven.

Two small structures, both owned by one thread state of the backend and
released by its ``release()`` (never by the garbage collector):

* :class:`InFlight`: the buffers of the batches a stream may still be using,
  each entry with the event recorded after the batch's last operation. An
  entry is dropped (and its ``on_done`` called, e.g. the chunk cache's
  ``finish``) once its event has completed, polled at the start of the next
  batch; past ``max_entries`` the host waits for the oldest (which bounds the
  GPU memory a state holds by its prefetch depth).
* :class:`GuardedBuffers`: buffers written *outside* stream order (kvikIO's
  threads write device staging; the host writes pinned buffers), reused
  round-robin: before one is handed out again the host waits for the event
  recorded after the device last read it.

Pure Python over anything with CuPy's event interface (``done``,
``synchronize()``), so the logic is tested on the CPU with fake events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Entry:
    event: Any
    buffers: list[Any]
    on_done: Callable[[], None] | None = None


@dataclass
class InFlight:
    """Buffers a stream may still read or write, released in order once passed."""

    max_entries: int = 4
    entries: deque = field(default_factory=deque)

    def push(self, event: Any, buffers: list[Any], on_done: Callable[[], None] | None = None):
        """Hold ``buffers`` until ``event`` has completed, then call ``on_done``."""
        self.entries.append(_Entry(event, [b for b in buffers if b is not None], on_done))
        while len(self.entries) > self.max_entries:
            self.entries[0].event.synchronize()
            self._pop()

    def retire(self) -> int:
        """Release the entries whose events have completed (oldest first, stopping
        at the first that has not); how many were released."""
        n = 0
        while self.entries and self.entries[0].event.done:
            self._pop()
            n += 1
        return n

    def drain(self) -> None:
        """Wait for every entry's event, releasing each; every ``on_done`` runs
        even if a wait raises (the first error is raised at the end)."""
        error: BaseException | None = None
        while self.entries:
            try:
                self.entries[0].event.synchronize()
            except BaseException as err:
                error = error or err
            try:
                self._pop()
            except BaseException as err:
                error = error or err
        if error is not None:
            raise error

    def _pop(self) -> None:
        entry = self.entries.popleft()
        entry.buffers.clear()
        if entry.on_done is not None:
            entry.on_done()

    def __len__(self) -> int:
        return len(self.entries)


class GuardedBuffers:
    """``n`` reusable buffers written outside stream order, each guarded by the
    event recorded after the device work that last read it.

    ``alloc(nbytes)`` makes a buffer; a buffer too small for a request is
    replaced by one ``growth`` times larger (after its event has completed, so
    nothing still reads the old one).
    """

    def __init__(self, alloc: Callable[[int], Any], n: int = 2, growth: float = 1.25) -> None:
        self._alloc = alloc
        self._buffers: list[Any] = [None] * n
        self._events: list[Any] = [None] * n
        self._next = 0
        self._growth = growth
        self.waits = 0  # how often acquire found the buffer still in use

    def acquire(self, nbytes: int) -> tuple[int, Any]:
        """``(k, buffer)`` of at least ``nbytes``, free of pending device reads."""
        k = self._next
        self._next = (k + 1) % len(self._buffers)
        event = self._events[k]
        if event is not None:
            if not event.done:
                self.waits += 1
            event.synchronize()
            self._events[k] = None
        buffer = self._buffers[k]
        if buffer is None or buffer.nbytes < nbytes:
            self._buffers[k] = None  # released before the larger one is made
            buffer = self._buffers[k] = self._alloc(max(int(nbytes * self._growth), nbytes, 256))
        return k, buffer

    def release(self, k: int, event: Any) -> None:
        """Buffer ``k`` is read by device work that ends with ``event``."""
        self._events[k] = event

    def close(self) -> None:
        """Wait for every buffer's event, then drop the buffers."""
        try:
            for event in self._events:
                if event is not None:
                    event.synchronize()
        finally:
            self._events = [None] * len(self._events)
            self._buffers = [None] * len(self._buffers)
