"""Reused host buffers the CPU path assembles batches in, and hands to torch as they are.

A :class:`BatchRing` is a few *slots*, each the frame outputs of one batch
(``[B, T, C, H, W]`` float32 input, and target), in one memory map: shared
memory (``memfd``) that worker processes map too, or private memory for the
in-process path. A batch is decoded, normalized and augmented straight into
its slot, and the arrays handed to the user are that slot: nothing copies a
finished batch, and reused slots do not fault their pages in again.

A slot handed to the user is *leased*: each array handed out carries a token
whose death (the user dropped every tensor, view and numpy array of it; torch
keeps the array it was made from alive) gives the slot back. Torch tensors
handed out are therefore never written again while anything refers to them.
When the user keeps more than :attr:`BatchRing.keep` batches, the next ones are
handed out as copies and their slots reused at once, so the ring never grows
and the producer never waits on the user.

The map belongs to the ring: :meth:`BatchRing.close` unmaps it, or, while
leased arrays are alive, the release of the last one does.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_PAGE = mmap.PAGESIZE


def _align(n: int, to: int = _PAGE) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class SlotLayout:
    """Where each output of a batch lies in a slot (full batch shapes): the
    frames, float32, then any per-sample outputs the producer writes too."""

    shapes: tuple[tuple[int, ...], ...]  # [B, ...] per output
    dtypes: tuple[np.dtype, ...]
    offsets: tuple[int, ...]
    nbytes: int  # of one slot, whole pages

    @classmethod
    def of(
        cls, shapes: Sequence[tuple[int, ...]], dtype: np.dtype | Sequence[np.dtype]
    ) -> SlotLayout:
        """``shapes`` with one ``dtype`` for all, or one per output."""
        if isinstance(dtype, (list, tuple)):
            dtypes = tuple(np.dtype(d) for d in dtype)
        else:
            dtypes = (np.dtype(dtype),) * len(shapes)
        if len(dtypes) != len(shapes):
            raise ValueError(f"{len(shapes)} outputs but {len(dtypes)} dtypes")
        offsets, end = [], 0
        for shape, d in zip(shapes, dtypes, strict=True):
            offsets.append(end)
            end = _align(end + int(np.prod(shape)) * d.itemsize, 64)
        return cls(tuple(tuple(s) for s in shapes), dtypes, tuple(offsets), _align(max(end, 1)))

    @property
    def batch_size(self) -> int:
        return self.shapes[0][0]

    def sample_nbytes(self, output: int) -> int:
        # math.prod: np.prod of a tuple costs microseconds, per batch handed out
        return math.prod(self.shapes[output][1:]) * self.dtypes[output].itemsize


class _RawArray:
    """``n`` samples of one output at a raw address, as numpy sees it (no buffer
    export: the ring decides when the map goes). The token of a lease."""

    __slots__ = ("__array_interface__", "__weakref__")

    def __init__(self, address: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.__array_interface__ = {
            "data": (address, False),
            "shape": shape,
            "typestr": dtype.str,
            "version": 3,
        }


class SlotViews:
    """Numpy views of a map's slots, for the code that writes them (the ring's
    owner, a worker process). Only valid while the map is."""

    def __init__(self, layout: SlotLayout, address: int, n_slots: int) -> None:
        self.layout = layout
        self.address = address
        self.n_slots = n_slots

    def arrays(self, slot: int, lo: int = 0, hi: int | None = None) -> list[np.ndarray]:
        """Samples ``lo:hi`` of every output of ``slot`` (default: the whole batch)."""
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} of {self.n_slots}")
        layout = self.layout
        hi = layout.batch_size if hi is None else hi
        if not 0 <= lo <= hi <= layout.batch_size:
            raise IndexError(f"samples {lo}:{hi} of a batch of {layout.batch_size}")
        base = self.address + slot * layout.nbytes
        out = []
        for k, (shape, offset) in enumerate(zip(layout.shapes, layout.offsets, strict=True)):
            start = base + offset + lo * layout.sample_nbytes(k)
            out.append(np.asarray(_RawArray(start, (hi - lo, *shape[1:]), layout.dtypes[k])))
        return out


def _fence() -> object | None:
    """A StreamFence on the current CUDA stream, or None where none can be made
    (CUDA torn down at exit: nothing copies then)."""
    from zarrdali.cpu.pinning import StreamFence

    try:
        return StreamFence()
    except Exception:
        return None


def map_shared(fd: int, nbytes: int) -> tuple[mmap.mmap, int]:
    """Map ``nbytes`` of shared memory ``fd`` read-write; the map and its address."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mm, _address(mm)


def _address(mm: mmap.mmap) -> int:
    probe = np.frombuffer(mm, dtype=np.uint8, count=1)
    address = probe.ctypes.data
    del probe  # releases the buffer export: only the ring closes the map
    return address


class BatchRing:
    """``n_slots`` batch slots of ``layout``; shared with processes when ``shared``.

    ``take()`` a free slot, fill it, then either :meth:`lease` it (the arrays
    handed to the user are the slot) or :meth:`copy_out` and free it. Thread
    safe: leases end in whichever thread drops the last reference.
    """

    def __init__(
        self, layout: SlotLayout, n_slots: int, *, shared: bool, keep: int = 2, pin: bool = False
    ) -> None:
        if n_slots < keep + 1:
            raise ValueError(f"a ring of {n_slots} slots cannot lend {keep} and still load")
        self.layout = layout
        self.n_slots = n_slots
        self.keep = keep  # batches the user may hold without forcing copies
        nbytes = layout.nbytes * n_slots
        self.fd = -1
        if shared:
            self.fd = os.memfd_create("zarrdali-batches", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, nbytes)
                self._map, address = map_shared(self.fd, nbytes)
            except BaseException:
                os.close(self.fd)
                raise
        else:
            self._map = mmap.mmap(-1, nbytes)
            address = _address(self._map)
        # pin: page-locked for CUDA (see pinning.py); a slot handed out is written
        # again only after the copies enqueued before its release are done
        self._registration = None
        if pin:
            from zarrdali.cpu.pinning import HostRegistration

            try:
                self._registration = HostRegistration(address, nbytes)
            except BaseException:
                self._map.close()
                if self.fd >= 0:
                    os.close(self.fd)
                raise
        self._fences: dict[int, object] = {}  # slot -> StreamFence to pass before reuse
        self.pinned = pin
        self.nbytes = nbytes
        self.shared = shared
        self.views = SlotViews(layout, address, n_slots)
        self._lock = threading.RLock()  # a lease may end inside a call that holds it
        self._free: deque[int] = deque(range(n_slots))
        self._leased: dict[int, int] = {}  # slot -> arrays handed out and still alive
        self._closed = False
        self.copies = 0  # batches handed out as copies (the user held `keep` slots)

    # -- the producer's side ------------------------------------------------
    def take(self) -> int | None:
        """A free slot, or None when every slot is loading or leased."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the batch ring is closed")
            if not self._free:
                return None
            slot = self._free.popleft()
            fence = self._fences.pop(slot, None)
        if fence is not None:  # copies from its last batch are done before it is written
            fence.synchronize()
        return slot

    def give_back(self, slot: int) -> None:
        """Return a slot that was taken but not handed out (a failed or unused load)."""
        with self._lock:
            if slot in self._free or slot in self._leased:
                raise ValueError(f"slot {slot} was not taken")
            self._free.append(slot)

    # -- the consumer's side ------------------------------------------------
    def hand_out(self, slot: int, n: int) -> list[np.ndarray]:
        """The first ``n`` samples of ``slot``'s outputs for the user: the slot
        itself (leased until the arrays are dropped) while the user holds fewer
        than ``keep`` leased batches, else copies (the slot is free at once)."""
        with self._lock:
            lend = len(self._leased) < self.keep and not self._closed
            if lend:
                arrays = self.views.arrays(slot, 0, n)
                self._leased[slot] = len(arrays)
                for a in arrays:
                    # the token dies with the last array (and torch tensor) made from it
                    weakref.finalize(a.base, self._lease_ended, slot).atexit = False
                return arrays
        if self.pinned:
            from zarrdali.cpu.pinning import pinned_copy

            arrays = [pinned_copy(a) for a in self.views.arrays(slot, 0, n)]
        else:
            arrays = [a.copy() for a in self.views.arrays(slot, 0, n)]
        with self._lock:
            self.copies += 1
            self._free.append(slot)
        return arrays

    def _lease_ended(self, slot: int) -> None:
        with self._lock:
            if slot not in self._leased:  # a ring set aside in a forked child
                return
            left = self._leased[slot] - 1
            if left:
                self._leased[slot] = left
                return
            del self._leased[slot]
            if self.pinned and not self._closed:
                self._fences[slot] = _fence()
            self._free.append(slot)
            if self._closed and not self._leased:
                self._unmap()

    @property
    def leased(self) -> int:
        """Slots whose arrays the user still holds."""
        with self._lock:
            return len(self._leased)

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
        """Unmap the slots now, or when the last leased array is dropped; close
        the shared memory's descriptor. Call once nothing writes the slots.
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._leased:
                self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _unmap(self) -> None:
        if self._map is None:
            return
        try:
            if self._registration is not None:
                self._registration.close()  # unregistered while still mapped
        finally:
            mm, self._map = self._map, None
            mm.close()

    def forget_after_fork(self) -> None:
        """In a forked child, whose parent owns the ring: close this process's copy
        of the descriptor, never unmap (arrays inherited from the parent may point
        into the map, which stays shared with it), hand nothing out again."""
        self._lock = threading.RLock()  # the parent's may have been held at the fork
        self._closed = True
        self._registration = None  # the parent's; CUDA is not usable in a forked child
        self._fences.clear()
        self._leased.clear()
        self._free.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def mapped(self) -> bool:
        return self._map is not None
