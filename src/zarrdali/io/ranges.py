"""Byte-range arithmetic for reading inner chunks out of shard files.

Neighbouring inner chunks of a shard are usually contiguous on disk; one read
instead of many saves syscalls (and round-trips on remote stores). A gap below
``max_gap`` is read and thrown away, trading bytes for requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A bound on the size of an object whose size a store did not tell (some remote
# stores): offsets and lengths past it are refused, so that every sum and sort
# key computed from them fits an int64.
MAX_UNKNOWN_SIZE = 1 << 44


def within(offset: np.ndarray, nbytes: np.ndarray, size) -> np.ndarray:
    """Whether each range ``[offset, offset + nbytes)`` lies inside ``[0, size)``.

    Computed as ``offset <= size and nbytes <= size - offset``, so that no sum
    wraps: a hostile shard index entry ``(2**64 - 16, 32)`` ends at 16 in uint64
    arithmetic. Works on unsigned or signed arrays (negative values are outside);
    ``size`` is a scalar or an array like ``offset``.
    """
    offset, nbytes = np.asarray(offset), np.asarray(nbytes)
    if offset.dtype.kind == "u" or nbytes.dtype.kind == "u":
        offset, nbytes = offset.astype(np.uint64), nbytes.astype(np.uint64)
        size = np.asarray(size).astype(np.uint64)
        ok = np.ones(offset.shape, dtype=bool)
    else:
        offset, nbytes = offset.astype(np.int64), nbytes.astype(np.int64)
        size = np.asarray(size).astype(np.int64)
        ok = (offset >= 0) & (nbytes >= 0)
    ok &= offset <= size
    return ok & (nbytes <= size - np.minimum(offset, size))


@dataclass(frozen=True, eq=False)
class CoalescedReads:
    """Ranges of many files merged into reads, as arrays (see :func:`coalesce_arrays`).

    ``order`` lists the requested ranges sorted by (file, offset); read ``r``
    serves ``order[bounds[r]:bounds[r + 1]]`` and covers ``[start[r], end[r])``
    of file ``file[r]``.
    """

    order: np.ndarray
    bounds: np.ndarray
    file: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.file)

    @property
    def nbytes(self) -> np.ndarray:
        return self.end - self.start


def coalesce_arrays(
    file: np.ndarray, offset: np.ndarray, nbytes: np.ndarray, max_gap: int
) -> CoalescedReads:
    """Ranges of many files merged into reads, with numpy: no Python per range.

    Ranges of the same file whose gap is at most ``max_gap`` bytes share a read.
    """
    file = np.asarray(file, dtype=np.int64)
    offset = np.asarray(offset, dtype=np.int64)
    end = offset + np.asarray(nbytes, dtype=np.int64)
    # One sort key, (file, offset) in mixed radix: cheaper than np.lexsort.
    span = int(end.max()) + 1 if len(end) else 1
    order = np.argsort(file * span + offset, kind="stable")
    f, lo, hi = file[order], offset[order], end[order]
    # Furthest byte reached so far within the same file (ranges may overlap).
    reach = np.empty_like(hi)
    if len(hi):
        span = int(hi.max()) + max_gap + 1
        running = np.maximum.accumulate(f * span + hi)
        reach = running - f * span
    new = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        new[1:] = (f[1:] != f[:-1]) | (lo[1:] - reach[:-1] > max_gap)
    starts = np.flatnonzero(new)
    bounds = np.append(starts, len(order))
    read_end = np.maximum.reduceat(hi, starts) if len(starts) else hi[:0]
    return CoalescedReads(order, bounds, f[starts], lo[starts], read_end)
