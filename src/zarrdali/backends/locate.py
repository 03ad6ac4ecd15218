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

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import crc32c
import numpy as np

from ..batchplan import BatchPlan, chunk_grid4, natural_coords, unique_inverse
from ..errors import ChunkError
from ..store import ArrayLayout

_EMPTY = 2**64 - 1  # shard index entry of an inner chunk that was never written
MISSING = -1  # nbytes of a chunk that does not exist


def storage_shape4(layout: ArrayLayout) -> tuple[int, int, int, int]:
    """Inner chunks per storage object along ``(t, level, y, x)`` (all ones unsharded)."""
    if layout.shard is None:
        return (1, 1, 1, 1)
    cps = layout.shard.chunks_per_shard
    return (cps[0], cps[1], cps[2], cps[3]) if len(cps) == 4 else (cps[0], 1, cps[1], cps[2])


@dataclass(frozen=True, eq=False)
class ChunkLocations:
    """Per chunk of a plan: which file (index into ``paths``), where, how long.

    ``file`` is -1 for chunks that are not read by the fast path (``fast`` is
    False: zarr-python reads them) and for missing chunks (``missing``).
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


class _VariableTable:
    """Cached storage-object rows of one variable."""

    def __init__(self, layout: ArrayLayout, capacity: int) -> None:
        self.layout = layout
        self.per_object = storage_shape4(layout)
        self.entries_per_object = int(np.prod(self.per_object))
        grid = chunk_grid4(layout)
        self.object_grid = tuple(-(-g // n) for g, n in zip(grid, self.per_object, strict=True))
        self.slot_of = np.full(int(np.prod(self.object_grid)), -1, dtype=np.int64)
        self.capacity = 0
        self.entries = np.empty((0, self.entries_per_object, 2), dtype=np.int64)
        self.paths = np.empty(0, dtype=object)
        self.keys = np.empty(0, dtype=object)
        self.object_of = np.empty(0, dtype=np.int64)  # slot -> object id (-1: free)
        self.stamp = np.empty(0, dtype=np.int64)
        self._grow(capacity)

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
        if len(candidates) < n:
            old = self.capacity
            self._grow(old + n - len(candidates))
            candidates = np.concatenate([candidates, np.arange(old, self.capacity)])
        chosen = candidates[np.argsort(self.stamp[candidates], kind="stable")[:n]]
        evicted = self.object_of[chosen]
        self.slot_of[evicted[evicted >= 0]] = -1
        return chosen


class ChunkLocator:
    """Locates the chunks of :class:`BatchPlan` s of one store (thread-safe).

    ``map_fn`` runs the reads of new shard indexes (e.g. a thread pool's
    ``map``); ``budget_bytes`` bounds the cached tables of all variables.
    """

    def __init__(
        self,
        store_name: str,
        layouts: Sequence[ArrayLayout],
        *,
        map_fn: Callable[[Callable, Iterable], Iterable] = map,
        budget_bytes: int = 64 << 20,
    ) -> None:
        self._store = store_name
        self.layouts = list(layouts)
        self._map = map_fn
        self._lock = threading.Lock()
        self._now = 0
        self.objects_loaded = 0
        self.objects_evicted = 0
        fast = [layout for layout in self.layouts if layout.fast_path]
        share = budget_bytes // max(len(fast), 1)
        self._tables: list[_VariableTable | None] = []
        for layout in self.layouts:
            if not layout.fast_path:
                self._tables.append(None)
                continue
            row = int(np.prod(storage_shape4(layout))) * 16 + 40
            self._tables.append(_VariableTable(layout, max(1, share // row)))

    def stats(self) -> dict[str, int]:
        """Cached rows, their memory, and how many objects were loaded and evicted."""
        tables = [t for t in self._tables if t is not None]
        return {
            "objects_cached": int(sum((t.object_of >= 0).sum() for t in tables)),
            "table_bytes": int(sum(t.nbytes for t in tables)),
            "objects_loaded": self.objects_loaded,
            "objects_evicted": self.objects_evicted,
        }

    def locate(self, plan: BatchPlan) -> ChunkLocations:
        n = plan.n_chunks
        file = np.full(n, -1, dtype=np.int64)
        offset = np.zeros(n, dtype=np.int64)
        nbytes = np.zeros(n, dtype=np.int64)
        missing = np.zeros(n, dtype=bool)
        fast = np.zeros(n, dtype=bool)
        paths, keys, file_var = [], [], []
        n_files = 0
        with self._lock:
            self._now += 1
            for v, table in enumerate(self._tables):
                if table is None:
                    continue
                mine = np.flatnonzero(plan.chunk_var == v)
                if not len(mine):
                    continue
                fast[mine] = True
                coords = plan.chunk_coords[mine]
                per = np.array(table.per_object, dtype=np.int64)
                objects = np.ravel_multi_index((coords // per).T, table.object_grid)
                inner = np.ravel_multi_index((coords % per).T, table.per_object)
                self._load_missing_rows(table, objects)
                slots = table.slot_of[objects]
                table.stamp[slots] = self._now
                entries = table.entries[slots, inner]
                offset[mine], nbytes[mine] = entries[:, 0], entries[:, 1]
                gone = entries[:, 1] == MISSING
                missing[mine] = gone
                used, local = unique_inverse(slots[~gone])
                file[mine[~gone]] = local + n_files
                n_files += len(used)
                paths.append(table.paths[used])
                keys.append(table.keys[used])
                file_var.append(np.full(len(used), v, dtype=np.int64))
        return ChunkLocations(
            file=file,
            offset=offset,
            nbytes=nbytes,
            missing=missing,
            fast=fast,
            paths=np.concatenate(paths) if paths else np.empty(0, dtype=object),
            keys=np.concatenate(keys) if keys else np.empty(0, dtype=object),
            file_var=np.concatenate(file_var) if file_var else np.empty(0, dtype=np.int64),
        )

    def _load_missing_rows(self, table: _VariableTable, objects: np.ndarray) -> None:
        new = np.unique(objects[table.slot_of[objects] < 0])
        if not len(new):
            return
        keep = table.slot_of[objects]
        slots = table.free_slots(len(new), keep[keep >= 0], self._now)
        self.objects_evicted += int((table.object_of[slots] >= 0).sum())
        layout = table.layout
        coords = np.stack(np.unravel_index(new, table.object_grid), axis=1)
        keys = [layout.encode_key(natural_coords(layout, c)) for c in coords.tolist()]
        paths = [os.path.join(layout.directory, key) for key in keys]
        read = self._read_index if layout.shard is not None else self._stat_chunk
        rows = list(self._map(lambda kp: read(layout, kp[0], kp[1]), zip(keys, paths, strict=True)))
        table.entries[slots] = np.stack(rows)
        table.paths[slots] = paths
        table.keys[slots] = keys
        table.object_of[slots] = new
        table.slot_of[new] = slots
        self.objects_loaded += len(new)

    def _stat_chunk(self, layout: ArrayLayout, key: str, path: str) -> np.ndarray:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return np.array([[0, MISSING]], dtype=np.int64)
        except OSError as err:
            raise ChunkError(
                f"cannot stat: {err}", store=self._store, array=layout.name, key=key
            ) from err
        return np.array([[0, size]], dtype=np.int64)

    def _read_index(self, layout: ArrayLayout, key: str, path: str) -> np.ndarray:
        """The shard's ``[inner chunks, 2]`` (offset, nbytes) rows, C order."""
        shard = layout.shard
        n_inner = int(np.prod(shard.chunks_per_shard))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # whole shard missing: every inner chunk is fill value
            return np.tile(np.array([[0, MISSING]], dtype=np.int64), (n_inner, 1))
        try:
            size = os.fstat(fd).st_size
            n = shard.index_nbytes
            if size < n:
                raise ChunkError(
                    f"shard file is {size} bytes, smaller than its {n}-byte index",
                    store=self._store,
                    array=layout.name,
                    key=key,
                )
            raw = os.pread(fd, n, size - n if shard.index_location == "end" else 0)
        except OSError as err:
            raise ChunkError(
                f"cannot read the shard index: {err}",
                store=self._store,
                array=layout.name,
                key=key,
            ) from err
        finally:
            os.close(fd)
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
        rows = index.astype(np.int64)  # offsets and sizes of real files fit
        rows[empty] = (0, MISSING)
        bad = ~empty & ((index[:, 0] + index[:, 1] > size) | (index[:, 1] > size))
        if bad.any():
            where = tuple(int(c) for c in np.unravel_index(np.argmax(bad), shard.chunks_per_shard))
            raise ChunkError(
                f"shard index points past the end of the {size}-byte file (inner chunk "
                f"{where} of the shard)",
                store=self._store,
                array=layout.name,
                key=key,
            )
        return rows
