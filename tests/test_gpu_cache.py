"""The GPU chunk cache's bookkeeping (:class:`ChunkCache`), exhaustively on the CPU.

Random sequences of batches (``begin``) and batch ends (``finish``, some of
them failed), checked against a model after every step: a key hits exactly
when it is resident and its first batch has finished; what is evicted was
neither pinned nor more recently used than what stays (LRU); payloads larger
than a page are never admitted; the arena never holds two entries in one byte
and never exceeds the budget; the counters add up. The payload bytes
themselves are kept in a bytearray arena at the offsets the cache hands out,
so a hit is also checked to read back exactly the bytes its key was stored with.

The device side of the cache (the arena, copies into it, decoding from it)
runs in ``tests/test_gpu_engine.py`` (on the CPU stand-in, and with ``-m gpu``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zarrdali.gpu.cache import (
    KEY_BITS,
    ChunkCache,
    chunk_keys,
    insert_jobs,
    size_classes,
)

PAGE = 4096


def _payload(key: int, n: int) -> bytes:
    return (np.arange(n, dtype=np.int64) * 7 + key * 13).astype(np.uint8).tobytes()


class Model:
    """The cache under test, what it should hold, and a byte arena."""

    def __init__(self, cache: ChunkCache, sizes: dict[int, int]) -> None:
        self.cache = cache
        self.sizes = sizes
        self.arena = bytearray(cache.capacity)
        self.ready: set[int] = set()  # keys whose inserting batch has finished ok
        self.last_use: dict[int, int] = {}
        self.tick = 0
        self.outstanding: list[tuple[object, list[int], list[int]]] = []  # ticket, hits, inserts
        self.hits = self.hit_bytes = 0

    def pinned(self) -> set[int]:
        return {k for _, hits, ins in self.outstanding for k in (*hits, *ins)}

    def begin(self, keys: list[int]) -> None:
        cache = self.cache
        before = cache.resident()
        pinned = self.pinned()
        self.tick += 1
        nbytes = np.array([self.sizes[k] for k in keys], dtype=np.int64)
        ticket = cache.begin(np.array(keys, dtype=np.int64), nbytes)
        after = cache.resident()
        hits, inserts = [], []
        for key, n, hit, ins in zip(
            keys, nbytes.tolist(), ticket.hit_offset.tolist(), ticket.insert_offset.tolist(),
            strict=True,
        ):  # fmt: skip
            expect_hit = key in before and key in self.ready
            assert (hit >= 0) == expect_hit, key
            if expect_hit:
                assert hit == before[key][0] == after[key][0]
                got = bytes(self.arena[hit : hit + n])
                assert got == _payload(key, n), f"key {key}: the arena lost its bytes"
                hits.append(key)
                self.hits += 1
                self.hit_bytes += n
                self.last_use[key] = self.tick
            else:
                assert hit == -1
            if ins >= 0:
                assert key not in before, "a resident key admitted again"
                assert n <= cache.page_size
                assert after[key] == (ins, n)
                self.arena[ins : ins + n] = _payload(key, n)
                inserts.append(key)
                self.last_use[key] = self.tick
                self.ready.discard(key)
            if n > cache.page_size:
                assert ins == -1, "a payload larger than a page was admitted"
        evicted = set(before) - set(after)
        assert not evicted & pinned, "a pinned entry was evicted"
        assert not evicted & set(hits)
        assert evicted <= self.ready, "an entry still being written was evicted"
        if evicted:  # LRU: nothing evicted was used more recently than an evictable survivor
            survivors = [
                k for k in before if k in after and k in self.ready and k not in pinned
                and k not in hits
            ]  # fmt: skip
            newest_evicted = max(self.last_use[k] for k in evicted)
            assert all(self.last_use[k] >= newest_evicted for k in survivors)
        self.ready -= evicted
        self.outstanding.append((ticket, hits, inserts))
        cache.check()

    def finish(self, i: int, ok: bool) -> None:
        ticket, _, inserts = self.outstanding.pop(i)
        self.cache.finish(ticket, ok)
        self.cache.finish(ticket, ok)  # idempotent
        resident = self.cache.resident()
        if ok:
            self.ready |= set(inserts)
        else:
            assert not set(inserts) & set(resident), "a failed batch's inserts stayed"
        self.cache.check()


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n_pages=st.integers(1, 6), n_keys=st.integers(1, 40))
def test_cache_against_a_model(data, n_pages, n_keys):
    sizes = {
        k: data.draw(st.one_of(st.integers(1, 700), st.integers(1, PAGE + 100)), label=f"size{k}")
        for k in range(n_keys)
    }
    cache = ChunkCache(n_pages * PAGE + data.draw(st.integers(0, PAGE - 1)), page_size=PAGE)
    model = Model(cache, sizes)
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        if model.outstanding and data.draw(st.booleans(), label="finish?"):
            i = data.draw(st.integers(0, len(model.outstanding) - 1), label="which")
            model.finish(i, data.draw(st.sampled_from([True, True, True, False]), label="ok"))
            continue
        keys = data.draw(st.lists(st.integers(0, n_keys - 1), unique=True, max_size=12))
        model.begin(keys)
    while model.outstanding:
        model.finish(0, True)
    stats = cache.stats()
    assert stats["hits"] == model.hits and stats["hit_bytes"] == model.hit_bytes
    assert stats["slot_bytes"] <= stats["capacity"] <= stats["budget"]
    assert stats["resident_bytes"] <= stats["slot_bytes"]
    assert stats["entries"] == len(cache.resident())
    # Nothing is pinned any more: a batch of every key is served whenever its slots
    # fit (hits stay in their pages; the rest needs whole pages of its class).
    everything = [k for k in range(n_keys) if sizes[k] <= PAGE]
    before = cache.resident()
    need = np.array([sizes[k] for k in everything], dtype=np.int64)
    ticket = cache.begin(np.array(everything, dtype=np.int64), need)
    cls = cache.class_of(need)
    hit = np.array([k in before for k in everything], dtype=bool)
    pages = len({before[k][0] // PAGE for k in everything if k in before})
    for c in np.unique(cls[~hit]).tolist():
        pages += -(-int((cls[~hit] == c).sum()) // int(cache.per_page[c]))
    if pages <= cache.n_pages:
        assert np.all((ticket.hit_offset >= 0) | (ticket.insert_offset >= 0))
    cache.check()


def test_lru_order_is_kept():
    cache = ChunkCache(4 * PAGE, page_size=PAGE, evict_fraction=0.01)
    sizes = np.full(4, PAGE, dtype=np.int64)  # one page each: four fit
    for keys in ([0, 1, 2, 3],):
        cache.finish(cache.begin(np.array(keys), sizes))
    cache.finish(cache.begin(np.array([0]), sizes[:1]))  # 0 is now the most recent
    cache.finish(cache.begin(np.array([4]), sizes[:1]))  # evicts the least recent: 1
    assert sorted(cache.resident()) == [0, 2, 3, 4]
    cache.finish(cache.begin(np.array([5, 6]), sizes[:2]))  # then 2 and 3
    assert sorted(cache.resident()) == [0, 4, 5, 6]
    assert cache.stats()["evictions"] == 3


def test_pinned_entries_are_not_evicted_and_misses_are_rejected():
    cache = ChunkCache(2 * PAGE, page_size=PAGE)
    sizes = np.full(2, PAGE, dtype=np.int64)
    held = cache.begin(np.array([0, 1]), sizes)  # both admitted, batch still running
    assert (held.insert_offset >= 0).all()
    other = cache.begin(np.array([2]), sizes[:1])  # no room without evicting a pinned slot
    assert other.insert_offset.tolist() == [-1] and cache.stats()["rejected"] == 1
    again = cache.begin(np.array([0]), sizes[:1])  # being written: neither hit nor insert
    assert again.hit_offset.tolist() == [-1] and again.insert_offset.tolist() == [-1]
    cache.finish(held)
    hit = cache.begin(np.array([0]), sizes[:1])
    assert hit.hit_offset.tolist() == [held.insert_offset[0]]
    cache.check()


def test_size_classes_and_validation():
    classes = size_classes(1 << 22)
    assert classes[0] == 256 and classes[-1] == 1 << 22
    assert np.all(classes % 256 == 0) and np.all(np.diff(classes) > 0)
    assert np.all(classes[1:] / classes[:-1] <= 1.25 + 256 / classes[:-1])  # < 25 % waste
    with pytest.raises(ValueError, match="power of two"):
        ChunkCache(1 << 20, page_size=3000)
    with pytest.raises(ValueError, match="at least one"):
        ChunkCache(100, page_size=PAGE)
    with pytest.raises(ValueError, match="unique"):
        ChunkCache(PAGE, page_size=PAGE).begin(np.array([1, 1]), np.array([1, 1]))


def test_chunk_keys_and_insert_jobs(make_store):
    from storefactory import VarSpec
    from zarrdali.batch.locate import ChunkLocator
    from zarrdali.batch.plan import plan_batch
    from zarrdali.gpu.describe import cacheable_payloads, describe_batch
    from zarrdali.store.open import load_layouts, open_group

    store = make_store(
        VarSpec("a", shape=(12, 21, 33), chunks=(2, 8, 8)),
        VarSpec("b", shape=(12, 21, 33), chunks=(2, 8, 8), compressor="lz4", checksum=True),
        VarSpec("n", shape=(12, 21, 33), chunks=(2, 8, 8), compressor="none"),
    )
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["a", "b", "n"])
    samples = np.array([[0, 0, 0], [3, 13, 25]], dtype=np.int64)
    plan = plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    locations = ChunkLocator(name, layouts).locate(plan)
    rows, length = cacheable_payloads(layouts, plan, locations)
    assert set(plan.chunk_var[rows].tolist()) == {0, 1}  # not the uncompressed array
    assert np.all(
        length[plan.chunk_var[rows] == 1] == locations.nbytes[rows][plan.chunk_var[rows] == 1] - 8
    )
    cache = ChunkCache(1 << 20, page_size=PAGE)
    keys = chunk_keys(cache, layouts, plan, rows)
    assert len(np.unique(keys)) == len(keys)
    assert np.all((keys >> KEY_BITS) == plan.chunk_var[rows])  # names seen in this order
    # The same chunk has the same key whatever the layouts list it comes in.
    alone = load_layouts(group, name, ["b"])
    plan_b = plan_batch(alone, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    keys_b = chunk_keys(cache, alone, plan_b, np.arange(plan_b.n_chunks))
    assert set(keys_b.tolist()) == set(keys[plan.chunk_var[rows] == 1].tolist())
    # Half of them cached: the rest are read, and admitted ones are copied from staging.
    ticket = cache.begin(keys, length)
    cached = np.full(plan.n_chunks, -1, dtype=np.int64)
    cached[rows] = ticket.hit_offset
    desc = describe_batch(layouts, plan, locations, store_name=name, cached=cached)
    jobs = insert_jobs(
        plan.n_chunks,
        desc.read_chunks,
        desc.staging.payload_offset,
        rows,
        ticket.insert_offset,
        length,
    )
    assert len(jobs) == int((ticket.insert_offset >= 0).sum()) == len(rows)
    staged = dict(zip(desc.read_chunks.tolist(), desc.staging.payload_offset.tolist(), strict=True))
    assert jobs[:, 0].tolist() == [staged[r] for r in rows.tolist()]
    assert (
        jobs[:, 1].tolist() == ticket.insert_offset.tolist()
        and jobs[:, 2].tolist() == length.tolist()
    )
    cache.finish(ticket)
    ticket = cache.begin(keys, length)  # all hits now: nothing of a and b is read
    cached[rows] = ticket.hit_offset
    desc = describe_batch(layouts, plan, locations, store_name=name, cached=cached)
    assert set(plan.chunk_var[desc.read_chunks].tolist()) <= {2}
    assert (
        len(
            insert_jobs(
                plan.n_chunks,
                desc.read_chunks,
                desc.staging.payload_offset,
                rows,
                ticket.insert_offset,
                length,
            )
        )
        == 0
    )
