"""GPU chunk cache: compressed chunk bytes kept on the device across batches and epochs.

``GpuBackend(cache="gpu", cache_budget=...)``: after a chunk's first read its
*payload* (the bytes nvCOMP decodes) is copied from staging into one device
arena of at most ``cache_budget`` bytes; later batches decode it straight from
there (the decode pointer arrays point into the arena) and read no file bytes
for it. Least recently used payloads are evicted to make room. Only what nvCOMP
decodes is cached (compressed chunks of the device path; not uncompressed
chunks, not Blosc or zarr-python's chunks). The store is assumed not to change
while the backend lives.

**Allocator: slabs of size classes.** The arena is cut into pages of
``page_size`` bytes (4 MiB by default, a power of two). Payload sizes vary
(compression ratios differ chunk to chunk), so each page, when taken from the
free pages, is given to one *size class* and cut into equal slots of that
class's size; classes grow geometrically (x1.25, multiples of 256 bytes) from
256 bytes to the page size, so a payload wastes under 25 % of its slot and no
slot straddles a page. A payload larger than a page is not cached. Eviction is
least recently used across all classes, in rounds of at least
``evict_fraction`` of the capacity (so its O(entries) scan is amortized over
many insertions); an evicted slot returns to its class, and a page whose slots
are all free returns to the free pages, where any class can take it. Pages
filled at the same time are evicted at about the same time, so whole pages
come free. Why not one contiguous heap with first-fit: its holes need
compaction (device copies, and pointer updates for batches in flight); why
not fixed slots of the largest payload: compressed payloads are often half of
that or less, which would halve the number of chunks a budget holds.

**Bookkeeping** (:class:`ChunkCache`) is pure numpy and never touches a device:
resident keys sorted (``np.searchsorted`` per batch, O(k log n)), entry
attributes in arrays (offset, size, class, last use, pins, ready), one free
stack per class, the free pages. Keys are int64: a variable id (per array name)
in the high bits, the chunk's index in its array's chunk grid below
(:func:`chunk_keys`).

**Batches in flight.** :meth:`ChunkCache.begin` answers a batch: an arena
offset for each hit, and a slot for each admitted miss (whose payload the
batch copies there after reading it). Both are *pinned* until
:meth:`ChunkCache.finish` (called when the batch's stream has passed its last
use, from the backend's in-flight ring), so no slot a stream may still read or
write is evicted; an admitted payload is served to other batches only after
``finish`` (``ready``); ``finish(ok=False)`` frees a failed batch's slots.

VERIFIED WITHOUT A GPU: :class:`ChunkCache` exhaustively
(``tests/test_gpu_cache.py``, hypothesis: LRU order, the budget, no two
entries overlapping, pins, hit/byte counts, every invariant after every
operation, the payload bytes kept in a bytearray arena) and the whole cached
path of the backend on the CPU stand-in (``tests/test_gpu_engine.py``: batches
equal the CPU backend's across epochs, no file bytes read once warm, small
budgets churn). NOT VERIFIED until a GPU runs the ``gpu``-marked tests:
:class:`GpuChunkCache`'s arena and the device copies into it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zarrdali.batch.plan import BatchPlan, layout_tables
from zarrdali.store.open import ArrayLayout

KEY_BITS = 40  # chunk index bits of a key; the variable id is above them
MIN_SLOT = 256
DEFAULT_PAGE_SIZE = 4 << 20
DEFAULT_EVICT_FRACTION = 1 / 32


def size_classes(page_size: int, min_slot: int = MIN_SLOT, growth: float = 1.25) -> np.ndarray:
    """Slot sizes: multiples of ``min_slot`` growing by about ``growth``, up to ``page_size``."""
    sizes = [min_slot]
    while sizes[-1] < page_size:
        nxt = int(np.ceil(sizes[-1] * growth / min_slot)) * min_slot
        sizes.append(min(max(nxt, sizes[-1] + min_slot), page_size))
    return np.array(sizes, dtype=np.int64)


@dataclass(eq=False)
class CacheTicket:
    """A batch's answer from :meth:`ChunkCache.begin`, per requested key:
    ``hit_offset`` (arena offset of a cached payload, else -1) and
    ``insert_offset`` (slot to copy the read payload into, else -1)."""

    hit_offset: np.ndarray
    insert_offset: np.ndarray
    hit_ids: np.ndarray  # entries pinned as hits
    insert_ids: np.ndarray  # entries pinned as pending inserts
    done: bool = field(default=False)


_EMPTY = np.empty(0, dtype=np.int64)


class ChunkCache:
    """Bookkeeping of the GPU chunk cache (see the module docstring). Thread-safe."""

    def __init__(
        self,
        budget: int,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        min_slot: int = MIN_SLOT,
        growth: float = 1.25,
        evict_fraction: float = DEFAULT_EVICT_FRACTION,
    ) -> None:
        if page_size <= 0 or page_size & (page_size - 1) or page_size < min_slot:
            raise ValueError(f"page_size must be a power of two >= {min_slot}, got {page_size}")
        if budget < page_size:
            raise ValueError(
                f"cache_budget must hold at least one {page_size}-byte page, got {budget} bytes"
            )
        self.budget = int(budget)
        self.page_size = int(page_size)
        self.n_pages = self.budget // self.page_size
        self.capacity = self.n_pages * self.page_size  # the arena's size: <= budget
        self.evict_fraction = float(evict_fraction)
        self.classes = size_classes(self.page_size, min_slot, growth)
        self.per_page = self.page_size // self.classes
        self._lock = threading.Lock()
        # Resident entries: keys sorted, with their entry ids.
        self._keys = _EMPTY
        self._ids = _EMPTY
        # Entry attributes by id (grown by doubling; ids recycled).
        self._e_key = np.zeros(0, dtype=np.int64)
        self._e_offset = np.zeros(0, dtype=np.int64)
        self._e_nbytes = np.zeros(0, dtype=np.int64)
        self._e_class = np.zeros(0, dtype=np.int64)
        self._e_used = np.zeros(0, dtype=np.int64)
        self._e_pins = np.zeros(0, dtype=np.int64)
        self._e_ready = np.zeros(0, dtype=bool)
        self._free_ids = _EMPTY
        # Pages and slots.
        self._page_class = np.full(self.n_pages, -1, dtype=np.int64)
        self._page_live = np.zeros(self.n_pages, dtype=np.int64)
        self._free_pages = np.arange(self.n_pages - 1, -1, -1, dtype=np.int64)  # a stack
        self._free_slots = [_EMPTY for _ in self.classes]  # stacks of offsets
        self._tick = 0
        self._var_ids: dict[str, int] = {}
        self.counters = dict.fromkeys(
            (
                "hits",
                "hit_bytes",
                "misses",
                "miss_bytes",
                "inserts",
                "insert_bytes",
                "evictions",
                "evicted_bytes",
                "rejected",
                "rejected_bytes",
            ),
            0,
        )

    # -- keys ---------------------------------------------------------------------
    def variable_ids(self, names: Sequence[str]) -> np.ndarray:
        """A stable id per array name (assigned on first sight)."""
        with self._lock:
            for name in names:
                if name not in self._var_ids:
                    self._var_ids[name] = len(self._var_ids)
            return np.array([self._var_ids[n] for n in names], dtype=np.int64)

    # -- the batch protocol -------------------------------------------------------
    def begin(self, keys: np.ndarray, nbytes: np.ndarray) -> CacheTicket:
        """Hits and admissions for a batch's ``keys`` (unique) of ``nbytes`` payloads.

        A key is a hit when resident and ready: its payload is at
        ``hit_offset``. A key not resident is admitted when a slot can be found
        (evicting least recently used, unpinned entries): the batch copies its
        payload to ``insert_offset``. A key resident but not ready (another
        batch is writing it) is neither. Hits and admissions stay pinned until
        :meth:`finish`.
        """
        keys = np.asarray(keys, dtype=np.int64)
        nbytes = np.asarray(nbytes, dtype=np.int64)
        if len(np.unique(keys)) != len(keys):
            raise ValueError("a batch's cache keys must be unique")
        with self._lock:
            self._tick += 1
            k = len(keys)
            hit_offset = np.full(k, -1, dtype=np.int64)
            insert_offset = np.full(k, -1, dtype=np.int64)
            if len(self._keys):
                at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
                found = self._keys[at] == keys
                ids = np.where(found, self._ids[at], -1)
            else:
                found = np.zeros(k, dtype=bool)
                ids = np.full(k, -1, dtype=np.int64)
            ready = found.copy()
            ready[found] = self._e_ready[ids[found]]
            hit_ids = ids[ready]
            self._e_pins[hit_ids] += 1
            self._e_used[hit_ids] = self._tick
            hit_offset[ready] = self._e_offset[hit_ids]
            c = self.counters
            c["hits"] += len(hit_ids)
            c["hit_bytes"] += int(nbytes[ready].sum())
            c["misses"] += k - len(hit_ids)
            c["miss_bytes"] += int(nbytes[~ready].sum())
            new = np.flatnonzero(~found)
            insert_ids = _EMPTY
            if len(new):
                offsets = self._allocate(nbytes[new])
                ok = offsets >= 0
                c["rejected"] += int((~ok).sum())
                c["rejected_bytes"] += int(nbytes[new[~ok]].sum())
                insert_ids = self._add_entries(keys[new[ok]], offsets[ok], nbytes[new[ok]])
                insert_offset[new[ok]] = offsets[ok]
            return CacheTicket(hit_offset, insert_offset, hit_ids, insert_ids)

    def finish(self, ticket: CacheTicket, ok: bool = True) -> None:
        """The batch of ``ticket`` is over (its stream has passed its last use of
        the arena): unpin its hits; its admissions become ready (``ok``) or are
        freed (a failed batch). Idempotent per ticket."""
        with self._lock:
            if ticket.done:
                return
            ticket.done = True
            self._e_pins[ticket.hit_ids] -= 1
            ids = ticket.insert_ids
            self._e_pins[ids] -= 1
            if ok:
                self._e_ready[ids] = True
                self.counters["inserts"] += len(ids)
                self.counters["insert_bytes"] += int(self._e_nbytes[ids].sum())
            else:
                self._remove(ids)

    # -- allocation ---------------------------------------------------------------
    def class_of(self, nbytes: np.ndarray) -> np.ndarray:
        """Size class of each payload (``len(classes)``: larger than a page)."""
        return np.searchsorted(self.classes, nbytes, side="left")

    def _allocate(self, nbytes: np.ndarray) -> np.ndarray:
        """A slot offset per payload, -1 where none could be had."""
        cls = self.class_of(nbytes)
        out = np.full(len(nbytes), -1, dtype=np.int64)
        for c in np.unique(cls).tolist():
            if c >= len(self.classes):
                continue  # larger than a page: never cached
            rows = np.flatnonzero(cls == c)
            got = self._take_slots(c, len(rows))
            out[rows[: len(got)]] = got
        return out

    def _take_slots(self, c: int, need: int) -> np.ndarray:
        taken = []
        while need > 0:
            stack = self._free_slots[c]
            if len(stack):
                t = stack[-need:]
                self._free_slots[c] = stack[: len(stack) - len(t)]
                # counted at once: an eviction round below must not free their pages
                np.add.at(self._page_live, t // self.page_size, 1)
                taken.append(t)
                need -= len(t)
                continue
            if len(self._free_pages):
                page = int(self._free_pages[-1])
                self._free_pages = self._free_pages[:-1]
                self._page_class[page] = c
                size = int(self.classes[c])
                slots = page * self.page_size + np.arange(int(self.per_page[c])) * size
                self._free_slots[c] = slots[::-1].copy()  # popped from the end: ascending
                continue
            if not self._evict_round():
                break
        return np.concatenate(taken) if taken else _EMPTY

    def _evict_round(self) -> bool:
        """Evict the least recently used unpinned, ready entries: at least
        ``evict_fraction`` of the capacity in slot bytes. False if none can go."""
        ids = self._ids
        ids = ids[(self._e_pins[ids] == 0) & self._e_ready[ids]]
        if not len(ids):
            return False
        slot_bytes = self.classes[self._e_class[ids]]
        target = max(self.evict_fraction * self.capacity, 1)
        m = int(np.ceil(target / slot_bytes.mean()))
        if m < len(ids):
            ids = ids[np.argpartition(self._e_used[ids], m - 1)[:m]]
        self.counters["evictions"] += len(ids)
        self.counters["evicted_bytes"] += int(self._e_nbytes[ids].sum())
        self._remove(ids)
        return True

    def _remove(self, ids: np.ndarray) -> None:
        """Drop entries ``ids`` (unpinned): free their slots, pages, ids, keys."""
        if not len(ids):
            return
        offsets = self._e_offset[ids]
        classes = self._e_class[ids]
        pages = offsets // self.page_size
        np.subtract.at(self._page_live, pages, 1)
        for c in np.unique(classes).tolist():
            self._free_slots[c] = np.concatenate([self._free_slots[c], offsets[classes == c]])
        empty = np.unique(pages)
        empty = empty[self._page_live[empty] == 0]
        if len(empty):
            for c in np.unique(self._page_class[empty]).tolist():
                stack = self._free_slots[c]
                self._free_slots[c] = stack[~np.isin(stack // self.page_size, empty)]
            self._page_class[empty] = -1
            self._free_pages = np.concatenate([self._free_pages, empty[::-1]])
        keys = self._e_key[ids]
        keep = np.ones(len(self._keys), dtype=bool)
        keep[np.searchsorted(self._keys, keys)] = False
        self._keys, self._ids = self._keys[keep], self._ids[keep]
        self._e_ready[ids] = False
        self._free_ids = np.concatenate([self._free_ids, ids])

    def _add_entries(self, keys: np.ndarray, offsets: np.ndarray, nbytes: np.ndarray):
        n = len(keys)
        if not n:
            return _EMPTY
        if len(self._free_ids) < n:
            self._grow_entries(n - len(self._free_ids))
        ids = self._free_ids[-n:]
        self._free_ids = self._free_ids[: len(self._free_ids) - n]
        self._e_key[ids] = keys
        self._e_offset[ids] = offsets
        self._e_nbytes[ids] = nbytes
        self._e_class[ids] = self.class_of(nbytes)
        self._e_used[ids] = self._tick
        self._e_pins[ids] = 1
        self._e_ready[ids] = False
        order = np.argsort(keys)
        pos = np.searchsorted(self._keys, keys[order])
        self._keys = np.insert(self._keys, pos, keys[order])
        self._ids = np.insert(self._ids, pos, ids[order])
        return ids

    def _grow_entries(self, extra: int) -> None:
        old = len(self._e_key)
        new = max(2 * old, old + extra, 1024)
        for name in ("_e_key", "_e_offset", "_e_nbytes", "_e_class", "_e_used", "_e_pins"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros(new - old, dtype=a.dtype)]))
        self._e_ready = np.concatenate([self._e_ready, np.zeros(new - old, dtype=bool)])
        self._free_ids = np.concatenate([np.arange(new - 1, old - 1, -1), self._free_ids])

    # -- reporting --------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters (hits, bytes served, misses, inserts, evictions, rejected) and
        what is resident now (entries, payload bytes, slot bytes, capacity)."""
        with self._lock:
            ids = self._ids
            return {
                **self.counters,
                "entries": len(ids),
                "resident_bytes": int(self._e_nbytes[ids].sum()),
                "slot_bytes": int(self.classes[self._e_class[ids]].sum()),
                "pages_used": int((self._page_class >= 0).sum()),
                "capacity": self.capacity,
                "budget": self.budget,
            }

    def resident(self) -> dict[int, tuple[int, int]]:
        """``{key: (offset, nbytes)}`` of the resident entries (for tests)."""
        with self._lock:
            ids = self._ids
            return {
                int(k): (int(o), int(n))
                for k, o, n in zip(
                    self._keys.tolist(),
                    self._e_offset[ids].tolist(),
                    self._e_nbytes[ids].tolist(),
                    strict=True,
                )
            }

    def check(self) -> None:
        """Assert every invariant of the bookkeeping (for tests; O(entries))."""
        with self._lock:
            keys, ids = self._keys, self._ids
            assert np.all(np.diff(keys) > 0), "keys not sorted and unique"
            assert np.array_equal(self._e_key[ids], keys), "keys and entries disagree"
            assert len(np.unique(ids)) == len(ids)
            assert not np.isin(ids, self._free_ids).any(), "a resident entry's id is free"
            assert np.all(self._e_pins[ids] >= 0)
            offsets, cls = self._e_offset[ids], self._e_class[ids]
            sizes = self.classes[cls]
            assert np.all(self._e_nbytes[ids] <= sizes), "a payload exceeds its slot"
            assert np.all((offsets >= 0) & (offsets + sizes <= self.capacity))
            pages = offsets // self.page_size
            assert np.all(self._page_class[pages] == cls), "an entry on another class's page"
            within = offsets - pages * self.page_size
            assert np.all(within % sizes == 0) and np.all(within + sizes <= self.page_size)
            assert len(np.unique(offsets)) == len(offsets), "two entries share a slot"
            live = np.bincount(pages, minlength=self.n_pages)
            assert np.array_equal(live, self._page_live), "page counts are off"
            assert int(sizes.sum()) <= self.capacity <= self.budget
            assert len(np.unique(self._free_pages)) == len(self._free_pages)
            assert np.all(self._page_class[self._free_pages] == -1)
            assert np.all(self._page_live[self._page_class == -1] == 0)
            n_free_pages = int((self._page_class == -1).sum())
            assert n_free_pages == len(self._free_pages), "a free page is lost"
            for c, stack in enumerate(self._free_slots):
                assert len(np.unique(stack)) == len(stack), f"class {c}: a slot twice"
                assert not np.isin(stack, offsets).any(), f"class {c}: a used slot is free"
                if len(stack):
                    assert np.all(self._page_class[stack // self.page_size] == c)
                owned = int((self._page_class == c).sum()) * int(self.per_page[c])
                used = int((cls == c).sum())
                assert used + len(stack) == owned, f"class {c}: slots lost"


def chunk_keys(
    cache: ChunkCache, layouts: Sequence[ArrayLayout], plan: BatchPlan, rows: np.ndarray
) -> np.ndarray:
    """Cache keys of plan chunks ``rows``: the array's id (by name) above
    ``KEY_BITS`` bits of the chunk's index in its array's chunk grid."""
    bases = layout_tables(layouts).key_bases
    if np.any(np.diff(bases) > (1 << KEY_BITS)):
        raise ValueError(f"an array has more than 2**{KEY_BITS} chunks: not cacheable")
    var = plan.chunk_var[rows]
    ids = cache.variable_ids([layout.name for layout in layouts])
    return (ids[var] << KEY_BITS) | (plan.chunk_key[rows] - bases[var])


def insert_jobs(
    n_chunks: int,
    read_chunks: np.ndarray,
    payload_offset: np.ndarray,
    rows: np.ndarray,
    insert_offset: np.ndarray,
    length: np.ndarray,
) -> np.ndarray:
    """``[K, 3]`` (staging offset, arena offset, bytes) copies of the admitted
    payloads (``insert_offset >= 0``; every admitted row is read into staging)."""
    admitted = insert_offset >= 0
    if not admitted.any():
        return np.empty((0, 3), dtype=np.int64)
    staged = np.full(n_chunks, -1, dtype=np.int64)
    staged[read_chunks] = payload_offset
    src = staged[rows[admitted]]
    if np.any(src < 0):
        raise ValueError("an admitted chunk was not read into staging")
    return np.stack([src, insert_offset[admitted], length[admitted]], axis=1)


class GpuChunkCache:
    """The device arena (one CuPy allocation of the cache's capacity) and its
    :class:`ChunkCache`; :meth:`close` releases the arena (call it once no
    stream uses it: the backend closes it after its thread states)."""

    def __init__(self, cp: Any, budget: int, **kw: Any) -> None:
        self.book = ChunkCache(budget, **kw)
        self.arena = cp.empty(self.book.capacity, dtype=cp.uint8)

    def stats(self) -> dict[str, int]:
        return self.book.stats()

    def close(self) -> None:
        self.arena = None
