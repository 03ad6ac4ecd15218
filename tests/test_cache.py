"""The read-through disk cache: exact bytes back, least recently used evicted past the
budget, other processes' entries shared, dead writers' temporary files removed."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from zarrdali.io.cache import DiskCache


def entries(directory) -> list:
    return [p for p in directory.rglob("*") if p.is_file()]


def test_round_trip_and_namespaces(tmp_path):
    a = DiskCache(tmp_path, "s3://bucket/a.zarr", 1 << 20)
    b = DiskCache(tmp_path, "s3://bucket/b.zarr", 1 << 20)
    a.put("t2m/c/0/0/0", 100, 5, b"hello")
    assert a.get("t2m/c/0/0/0", 100, 5) == b"hello"
    assert a.get("t2m/c/0/0/0", 100, 6) is None, "another range is another entry"
    assert b.get("t2m/c/0/0/0", 100, 5) is None, "another store is another namespace"
    again = DiskCache(tmp_path, "s3://bucket/a.zarr", 1 << 20)  # e.g. another process
    assert again.get("t2m/c/0/0/0", 100, 5) == b"hello"
    assert a.stats()["cache_hits"] == 1 and a.stats()["cache_misses"] == 1


def test_least_recently_used_go_first(tmp_path):
    cache = DiskCache(tmp_path, "store", budget_bytes=16 * 1000)
    for k in range(12):
        cache.put(f"k{k}", 0, 1000, bytes(1000))
    old = time.time() - 100
    for k in range(12):  # make the order unambiguous whatever the clock's resolution
        path = cache._path(f"k{k}", 0, 1000)
        os.utime(path, (old + k, old + k))
    assert cache.get("k0", 0, 1000) is not None  # a hit: now the most recently used
    for k in range(12, 20):  # 8 more: some of k1..k11 must go, not k0
        cache.put(f"k{k}", 0, 1000, bytes(1000))
    total = sum(p.stat().st_size for p in entries(tmp_path))
    assert total <= 16 * 1000 + 1000 * 16 // 16 + 1000
    assert cache.get("k0", 0, 1000) is not None, "recently used survives"
    assert cache.get("k1", 0, 1000) is None, "least recently used is evicted"
    assert cache.stats()["cache_evicted"] > 0


def test_stale_temporary_files_are_removed(tmp_path):
    cache = DiskCache(tmp_path, "store", budget_bytes=1 << 20)
    cache.put("k", 0, 3, b"abc")
    stale = cache.root / "ab" / ".tmp-1-2-dead"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = cache.root / "ab" / ".tmp-1-2-alive"
    fresh.write_bytes(b"y")
    cache.evict()
    assert not stale.exists() and fresh.exists()
    assert cache.get("k", 0, 3) == b"abc"


def test_concurrent_writers_and_readers(tmp_path):
    caches = [DiskCache(tmp_path, "store", budget_bytes=50_000) for _ in range(4)]

    def work(i: int) -> None:
        cache = caches[i % 4]
        for k in range(200):
            key = f"k{k % 40}"
            data = cache.get(key, 0, 1000)
            if data is None:
                cache.put(key, 0, 1000, bytes([k % 40]) * 1000)
            else:
                assert data == bytes([k % 40]) * 1000, "a whole entry or none"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert not [p for p in entries(tmp_path) if p.name.startswith(".tmp-")]


def test_budget_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        DiskCache(tmp_path, "store", 0)
