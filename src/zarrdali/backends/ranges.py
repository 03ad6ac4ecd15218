"""Byte-range arithmetic for reading inner chunks out of shard files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CoalescedRead:
    """One read covering ``[start, end)`` that serves several requested ranges."""

    start: int
    end: int
    members: tuple[int, ...]  # positions in the request list

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def coalesce(ranges: Sequence[tuple[int, int]], max_gap: int) -> list[CoalescedRead]:
    """Merge ``(offset, length)`` ranges whose gaps are at most ``max_gap`` bytes.

    Neighbouring inner chunks of a shard are usually contiguous on disk; one
    read instead of many saves syscalls (and round-trips on remote stores). A
    gap below ``max_gap`` is read and thrown away, trading bytes for requests.
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    reads: list[CoalescedRead] = []
    start = end = 0
    members: list[int] = []
    for i in order:
        off, length = ranges[i]
        if members and off - end <= max_gap:
            end = max(end, off + length)
            members.append(i)
            continue
        if members:
            reads.append(CoalescedRead(start, end, tuple(members)))
        start, end, members = off, off + length, [i]
    if members:
        reads.append(CoalescedRead(start, end, tuple(members)))
    return reads
