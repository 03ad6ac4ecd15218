"""Property tests for byte-range coalescing (``zarrdali.io.ranges``).

``coalesce`` below, one file at a time with a Python loop, is the reference the
vectorized ``coalesce_arrays`` is checked against."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from zarrdali.io.ranges import coalesce_arrays


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


FAST = settings(max_examples=200, deadline=None)

range_lists = st.lists(st.tuples(st.integers(0, 2_000), st.integers(1, 200)), max_size=30)


def check_invariants(ranges, max_gap, reads: list[CoalescedRead]) -> None:
    # members are positions of the input, each exactly once
    members = [m for r in reads for m in r.members]
    assert sorted(members) == list(range(len(ranges)))
    for r in reads:
        assert r.start < r.end
        assert r.nbytes == r.end - r.start
        assert len(r.members) >= 1
        # every member lies inside its read, and the read is no larger than its members
        for m in r.members:
            off, length = ranges[m]
            assert r.start <= off and off + length <= r.end
        assert r.start == min(ranges[m][0] for m in r.members)
        assert r.end == max(sum(ranges[m]) for m in r.members)
        # bytes of the read not covered by any member form gaps of at most max_gap
        spans = sorted((ranges[m][0], sum(ranges[m])) for m in r.members)
        reach = spans[0][1]
        for off, end in spans[1:]:
            assert off - reach <= max_gap
            reach = max(reach, end)
    # reads are sorted and do not overlap
    for a, b in itertools.pairwise(reads):
        assert a.end <= b.start


@FAST
@given(ranges=range_lists, max_gap=st.integers(0, 300))
def test_coalesce_invariants(ranges, max_gap):
    reads = coalesce(ranges, max_gap)
    check_invariants(ranges, max_gap, reads)
    # reads separated by more than max_gap (otherwise they would have been merged)
    for a, b in itertools.pairwise(reads):
        assert b.start - a.end > max_gap


@FAST
@given(ranges=range_lists, max_gap=st.integers(0, 300))
def test_every_range_in_exactly_one_read(ranges, max_gap):
    reads = coalesce(ranges, max_gap)
    for i, (off, length) in enumerate(ranges):
        holding = [r for r in reads if i in r.members]
        assert len(holding) == 1
        containing = [r for r in reads if r.start <= off and off + length <= r.end]
        assert containing == holding


@FAST
@given(
    lengths=st.lists(st.integers(1, 100), min_size=1, max_size=20),
    gaps=st.data(),
    perm=st.randoms(use_true_random=False),
)
def test_max_gap_zero_merges_only_contiguous(lengths, gaps, perm):
    # lay ranges out left to right with gaps of 0 (contiguous) or >= 1 (separated)
    gap_list = gaps.draw(st.lists(st.integers(0, 5), min_size=len(lengths), max_size=len(lengths)))
    ranges, pos = [], 0
    for length, gap in zip(lengths, gap_list, strict=True):
        pos += gap
        ranges.append((pos, length))
        pos += length
    order = list(range(len(ranges)))
    perm.shuffle(order)
    shuffled = [ranges[i] for i in order]
    reads = coalesce(shuffled, 0)
    check_invariants(shuffled, 0, reads)
    # expected groups: break before each range preceded by a positive gap
    n_groups = 1 + sum(1 for g in gap_list[1:] if g > 0)
    assert len(reads) == n_groups
    for r in reads:
        sorted_members = sorted(r.members, key=lambda m: shuffled[m][0])
        for a, b in itertools.pairwise(sorted_members):
            assert sum(shuffled[a]) == shuffled[b][0]  # contiguous inside a read


def test_examples():
    assert coalesce([], 10) == []
    assert coalesce([(0, 4), (4, 4)], 0) == [CoalescedRead(0, 8, (0, 1))]
    assert coalesce([(0, 4), (5, 4)], 0) == [CoalescedRead(0, 4, (0,)), CoalescedRead(5, 9, (1,))]
    assert coalesce([(5, 4), (0, 4)], 1) == [CoalescedRead(0, 9, (1, 0))]
    # a range inside an earlier one does not shrink the read
    assert coalesce([(0, 10), (2, 3), (12, 1)], 2) == [CoalescedRead(0, 13, (0, 1, 2))]


many_files = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 2_000), st.integers(1, 200)), max_size=40
)


@FAST
@given(ranges=many_files, max_gap=st.integers(0, 300))
def test_array_coalescing_equals_per_file_coalescing(ranges, max_gap):
    """The vectorized coalescing makes exactly the reads of :func:`coalesce`, file by file."""
    file = np.array([r[0] for r in ranges], dtype=np.int64)
    offset = np.array([r[1] for r in ranges], dtype=np.int64)
    nbytes = np.array([r[2] for r in ranges], dtype=np.int64)
    reads = coalesce_arrays(file, offset, nbytes, max_gap)
    got = set()
    for r in range(len(reads)):
        members = reads.order[reads.bounds[r] : reads.bounds[r + 1]].tolist()
        assert members, "an empty read"
        assert all(file[m] == reads.file[r] for m in members)
        got.add((int(reads.file[r]), int(reads.start[r]), int(reads.end[r]), frozenset(members)))
    want = set()
    for f in sorted(set(file.tolist())):
        positions = np.flatnonzero(file == f)
        per_file = [(int(offset[p]), int(nbytes[p])) for p in positions]
        for read in coalesce(per_file, max_gap):
            members = frozenset(int(positions[m]) for m in read.members)
            want.add((f, read.start, read.end, members))
    assert got == want
    assert np.all(reads.nbytes > 0)
