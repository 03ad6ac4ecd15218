"""Where the stored bytes of a batch's chunks are, as arrays.

Every *storage object* (a shard file, or a chunk file of an unsharded array) is
described once by a table row: its path and, per inner chunk, ``(offset,
nbytes)``; ``nbytes == -1`` marks an inner chunk never written or a file that
does not exist (the fill value). Shard indexes are read from the files; an
unsharded chunk's row is its file size. Rows are cached per variable in
fixed-size numpy tables and looked up by fancy indexing, so locating a batch
costs a few numpy calls per variable; only objects seen for the first time cost
a read (or a ``stat``) each. When a table is full, the rows least recently used
make room (never one the current batch needs): memory is bounded by
``budget_bytes`` (or one batch, if that is more) and reported by
:meth:`ChunkLocator.stats`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import crc32c
import numpy as np

from zarrdali.batch.plan import BatchPlan, chunk_grid4, natural_coords, unique_inverse
from zarrdali.errors import ChunkError
from zarrdali.io.ranges import MAX_UNKNOWN_SIZE, within
from zarrdali.io.sources import MISSING, WHOLE, ByteSource, LocalSource, ObjectReadError
from zarrdali.store.open import ArrayLayout

_EMPTY = 2**64 - 1  # shard index entry of an inner chunk that was never written
__all__ = ["MISSING", "WHOLE", "ChunkLocations", "ChunkLocator", "storage_shape4"]


def storage_shape4(layout: ArrayLayout) -> tuple[int, int, int, int]:
    """Inner chunks per storage object along ``(t, level, y, x)`` (all ones unsharded)."""
    if layout.shard is None:
        return (1, 1, 1, 1)
    return layout.canonical(layout.shard.chunks_per_shard)


def inner_strides4(layout: ArrayLayout) -> tuple[int, int, int, int]:
    """Entries of the shard index between neighbouring inner chunks along
    ``(t, level, y, x)``: the index is in the shard's stored C order."""
    per = layout.shard.chunks_per_shard if layout.shard is not None else (1,) * len(layout.shape)
    strides = [1] * len(per)
    for axis in range(len(per) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * per[axis + 1]
    t, level, y, x = layout.canonical(strides)
    return t, level if layout.has_levels else 0, y, x


@dataclass(frozen=True, eq=False)
class ChunkLocations:
    """Per chunk of a plan: which file (index into ``paths``), where, how long.

    ``file`` is -1 for chunks that are not read by the fast path (``fast`` is
    False: zarr-python reads them) and for missing chunks (``missing``).
    ``paths`` are file paths (local store) or keys (remote store; see
    :mod:`~zarrdali.io.sources`); ``nbytes`` is ``WHOLE`` for an unsharded
    chunk of a remote store: its object is read whole, whatever its size.
    """

    file: np.ndarray  # [N] int64
    offset: np.ndarray  # [N] int64
    nbytes: np.ndarray  # [N] int64
    missing: np.ndarray  # [N] bool
    fast: np.ndarray  # [N] bool
    paths: np.ndarray  # [F] object (str)
    keys: np.ndarray  # [F] object (str): store keys, for messages
    file_var: np.ndarray  # [F] int64: the variable each file belongs to

    @property
    def present(self) -> np.ndarray:
        """Chunks the fast path reads from a file."""
        return self.fast & ~self.missing


def _dense_unique(slots: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """``unique_inverse`` of small non-negative integers below ``capacity``: by
    marking them in a table when that is small, else by sorting."""
    if capacity > 16 * len(slots) + 1024:
        return unique_inverse(slots)
    seen = np.zeros(capacity, dtype=bool)
    seen[slots] = True
    rank = np.cumsum(seen) - 1
    return np.flatnonzero(seen), rank[slots]


class _ObjectTable:
    """Cached storage-object rows of all variables: slots of ``(offset, nbytes)``
    per inner chunk, found through a dense object-id → slot array."""

    def __init__(self, n_objects: int, entries_per_object: int, max_capacity: int) -> None:
        self.entries_per_object = entries_per_object
        self.slot_of = np.full(n_objects, -1, dtype=np.int64)
        self.capacity = 0
        self.entries = np.empty((0, entries_per_object, 2), dtype=np.int64)
        self.paths = np.empty(0, dtype=object)
        self.keys = np.empty(0, dtype=object)
        self.object_of = np.empty(0, dtype=np.int64)  # slot -> object id (-1: free)
        self.stamp = np.empty(0, dtype=np.int64)  # slot -> last batch that used it
        self.max_capacity = max_capacity
        self._grow(min(64, max_capacity))

    @property
    def nbytes(self) -> int:
        return self.slot_of.nbytes + self.entries.nbytes + self.stamp.nbytes * 2

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.entries = np.concatenate(
            [self.entries, np.empty((extra, self.entries_per_object, 2), dtype=np.int64)]
        )
        self.paths = np.concatenate([self.paths, np.empty(extra, dtype=object)])
        self.keys = np.concatenate([self.keys, np.empty(extra, dtype=object)])
        self.object_of = np.concatenate([self.object_of, np.full(extra, -1, dtype=np.int64)])
        self.stamp = np.concatenate([self.stamp, np.full(extra, -1, dtype=np.int64)])
        self.capacity = capacity

    def free_slots(self, n: int, keep: np.ndarray, now: int) -> np.ndarray:
        """``n`` slots to fill: free ones first, then the least recently used
        ones not in ``keep`` (growing the table past its budget if it must)."""
        usable = self.stamp < now
        usable[keep] = False
        candidates = np.flatnonzero(usable)
        free = int((self.object_of < 0).sum())
        if (free < n and self.capacity < self.max_capacity) or len(candidates) < n:
            # Grow (doubling, up to the budget; past it only as far as this batch needs).
            old = self.capacity
            want = max(min(2 * old, self.max_capacity), old + n - free)
            self._grow(max(want, old + n - len(candidates)))
            candidates = np.concatenate([candidates, np.arange(old, self.capacity)])
        chosen = candidates[np.argsort(self.stamp[candidates], kind="stable")[:n]]
        evicted = self.object_of[chosen]
        self.slot_of[evicted[evicted >= 0]] = -1
        return chosen


class ChunkLocator:
    """Locates the chunks of :class:`BatchPlan` s of one store (thread-safe).

    ``source`` reads new shard indexes and chunk sizes (default: the local files,
    read with ``map_fn``, e.g. a thread pool's ``map``); ``budget_bytes`` bounds
    the cached rows of all variables.
    """

    def __init__(
        self,
        store_name: str,
        layouts: Sequence[ArrayLayout],
        *,
        map_fn: Callable[[Callable, Iterable], Iterable] = map,
        budget_bytes: int = 64 << 20,
        source: ByteSource | None = None,
    ) -> None:
        self._store = store_name
        self.layouts = list(layouts)
        self.source = source if source is not None else LocalSource(store_name, map_fn)
        self._lock = threading.Lock()
        self._now = 0
        self.objects_loaded = 0
        self.objects_evicted = 0
        self.fast = np.array([layout.fast_path for layout in self.layouts], dtype=bool)
        # Per variable: inner chunks per object and objects along (t, level, y, x).
        self._per_object = np.array([storage_shape4(lay) for lay in self.layouts], dtype=np.int64)
        self._inner_strides = np.array(
            [inner_strides4(lay) for lay in self.layouts], dtype=np.int64
        )
        grids = np.array([chunk_grid4(lay) for lay in self.layouts], dtype=np.int64)
        self._object_grid = -(-grids // self._per_object)
        sizes = np.where(self.fast, self._object_grid.prod(axis=1), 0)
        self._object_base = np.concatenate([[0], np.cumsum(sizes)])
        self._uniform = bool(
            (self._per_object == self._per_object[:1]).all()
            and (self._object_grid == self._object_grid[:1]).all()
            and (self._inner_strides == self._inner_strides[:1]).all()
        )
        per = int(self._per_object.prod(axis=1).max()) if len(self.layouts) else 1
        self._table = _ObjectTable(
            int(self._object_base[-1]), per, max(1, budget_bytes // (per * 16 + 40))
        )

    def stats(self) -> dict[str, int]:
        """Cached rows, their memory, and how many objects were loaded and evicted."""
        return {
            "objects_cached": int((self._table.object_of >= 0).sum()),
            "table_bytes": int(self._table.nbytes),
            "objects_loaded": self.objects_loaded,
            "objects_evicted": self.objects_evicted,
        }

    def locate(self, plan: BatchPlan) -> ChunkLocations:
        n = plan.n_chunks
        var = plan.chunk_var
        fast = self.fast[var]
        if fast.all():  # the usual case: no copies of the plan's arrays
            chunks, coords = np.arange(n), plan.chunk_coords
        else:
            chunks = np.flatnonzero(fast)
            var, coords = var[chunks], plan.chunk_coords[chunks]
        if self._uniform:  # every variable stored alike: one shape for all chunks
            per, grid = self._per_object[0], self._object_grid[0]
            strides = self._inner_strides[0]
        else:
            per, grid = self._per_object[var], self._object_grid[var]
            strides = self._inner_strides[var]
        outer, within = np.divmod(coords, per)
        obj = outer[..., 0]
        for axis in (1, 2, 3):  # C-order flat index over (t, level, y, x)
            obj = obj * grid[..., axis] + outer[..., axis]
        inner = (within * strides).sum(axis=-1)  # the shard index's own (stored) order
        obj = obj + self._object_base[var]
        table = self._table
        with self._lock:
            self._now += 1
            self._load_missing_rows(obj)
            slots = table.slot_of[obj]
            table.stamp[slots] = self._now
            entries = table.entries[slots, inner]
            gone = entries[:, 1] == MISSING
            used, local = _dense_unique(slots[~gone], table.capacity)
            paths, keys = table.paths[used], table.keys[used]
            file_var = self._var_of_object(table.object_of[used])
        file = np.full(n, -1, dtype=np.int64)
        file[chunks[~gone]] = local
        offset = np.zeros(n, dtype=np.int64)
        nbytes = np.zeros(n, dtype=np.int64)
        missing = np.zeros(n, dtype=bool)
        offset[chunks], nbytes[chunks], missing[chunks] = entries[:, 0], entries[:, 1], gone
        return ChunkLocations(file, offset, nbytes, missing, fast, paths, keys, file_var)

    def _var_of_object(self, objects: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._object_base, objects, side="right") - 1

    def _load_missing_rows(self, objects: np.ndarray) -> None:
        """Read the rows of the objects not cached yet (shard indexes, chunk sizes)."""
        table = self._table
        new = np.unique(objects[table.slot_of[objects] < 0])
        if not len(new):
            return
        keep = table.slot_of[objects]
        slots = table.free_slots(len(new), keep[keep >= 0], self._now)
        self.objects_evicted += int((table.object_of[slots] >= 0).sum())
        work = []
        for obj, v in zip(new.tolist(), self._var_of_object(new).tolist(), strict=True):
            layout = self.layouts[v]
            coords = np.unravel_index(obj - self._object_base[v], self._object_grid[v])
            key = layout.encode_key(natural_coords(layout, coords))
            path = self.source.path_of(layout.directory, layout.key_prefix, key)
            work.append((layout, key, path))
        rows = self._read_rows(work)
        for slot, row in zip(slots.tolist(), rows, strict=True):
            table.entries[slot, : len(row)] = row
        table.paths[slots] = [path for _, _, path in work]
        table.keys[slots] = [key for _, key, _ in work]
        table.object_of[slots] = new
        table.slot_of[new] = slots
        self.objects_loaded += len(new)

    def _read_rows(self, work: list[tuple[ArrayLayout, str, str]]) -> list[np.ndarray]:
        """The rows of these objects: one source call per kind of object, so a remote
        source fetches all new shard indexes of a batch concurrently."""
        rows: list[np.ndarray | None] = [None] * len(work)
        groups: dict[tuple, list[int]] = {}
        for k, (layout, _, _) in enumerate(work):
            shard = layout.shard
            kind = None if shard is None else (shard.index_nbytes, shard.index_location)
            groups.setdefault(kind, []).append(k)
        for kind, members in groups.items():
            paths = [work[k][2] for k in members]
            try:
                if kind is None:
                    answers = self.source.chunk_sizes(paths)
                else:
                    answers = self.source.read_indexes(paths, kind[0], kind[1] == "end")
            except ObjectReadError as err:
                layout, key, _ = work[members[paths.index(err.path)]]
                raise ChunkError(err.reason, store=self._store, array=layout.name, key=key) from err
            for k, answer in zip(members, answers, strict=True):
                layout, key, _ = work[k]
                if kind is None:
                    rows[k] = np.array([[0, answer]], dtype=np.int64)
                else:
                    rows[k] = self._parse_index(layout, key, answer)
        return rows

    def _parse_index(
        self, layout: ArrayLayout, key: str, answer: tuple[object, int] | None
    ) -> np.ndarray:
        """The shard's ``[inner chunks, 2]`` (offset, nbytes) rows, C order, checked."""
        shard = layout.shard
        n_inner = int(np.prod(shard.chunks_per_shard))
        if answer is None:  # whole shard missing: every inner chunk is fill value
            return np.tile(np.array([[0, MISSING]], dtype=np.int64), (n_inner, 1))
        raw, size = answer
        raw = bytes(raw)
        n = shard.index_nbytes
        if len(raw) != n:
            what = f"{size} bytes" if size >= 0 else f"shorter than {n} bytes"
            raise ChunkError(
                f"shard file is {what}, smaller than its {n}-byte index",
                store=self._store,
                array=layout.name,
                key=key,
            )
        if shard.index_has_crc32c:
            raw, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
            if crc32c.crc32c(raw) != stored:
                raise ChunkError(
                    "crc32c checksum mismatch in the shard index",
                    store=self._store,
                    array=layout.name,
                    key=key,
                )
        index = np.frombuffer(raw, dtype=np.dtype("u8").newbyteorder(shard.index_byteorder))
        index = index.reshape(n_inner, 2)
        empty = (index[:, 0] == _EMPTY) & (index[:, 1] == _EMPTY)
        # Checked in uint64 without a sum that could wrap. Size unknown (some remote
        # stores): a range past the end reads short later; a bound keeps int64 sums safe.
        limit = size if size >= 0 else MAX_UNKNOWN_SIZE
        bad = ~empty & ~within(index[:, 0], index[:, 1], limit)
        if bad.any():
            k = int(np.argmax(bad))
            where = tuple(int(c) for c in np.unravel_index(k, shard.chunks_per_shard))
            entry = (int(index[k, 0]), int(index[k, 1]))
            end = f"the end of the {size}-byte file" if size >= 0 else f"{limit} bytes"
            raise ChunkError(
                f"shard index points past {end}: (offset, nbytes) = {entry} (inner chunk "
                f"{where} of the shard)",
                store=self._store,
                array=layout.name,
                key=key,
            )
        rows = index.astype(np.int64)  # every entry is now within the file
        rows[empty] = (0, MISSING)
        return rows


class Locators:
    """One :class:`ChunkLocator` per list of layouts a backend is asked about
    (a loader has one; tests and benchmarks may pass others), made on first use."""

    def __init__(self, store_name: str, *, map_fn: Callable = map, source=None) -> None:
        self._store, self._map, self._source = store_name, map_fn, source
        self._lock = threading.Lock()
        self._by_layouts: dict[tuple[int, ...], tuple[Sequence[ArrayLayout], ChunkLocator]] = {}

    def get(self, layouts: Sequence[ArrayLayout]) -> ChunkLocator:
        key = tuple(id(layout) for layout in layouts)
        with self._lock:
            if key not in self._by_layouts:
                locator = ChunkLocator(self._store, layouts, map_fn=self._map, source=self._source)
                self._by_layouts[key] = (layouts, locator)  # layouts kept: ids stay theirs
            return self._by_layouts[key][1]
