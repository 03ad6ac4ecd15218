"""A read-through cache (``cache_dir``) that was damaged or tampered with.

A flipped byte, an entry swapped with another's, a truncated entry, an entry
planted at its (predictable) name, a symlink in its place: none may be
served. Each is checked on read (length, identity and crc32c stored with the
bytes), dropped and fetched again; the cache's directories and files are
private to the user and symlinks are not followed.
"""

from __future__ import annotations

import os
import stat

import pytest
from faultkit import check_batches

import zarrdali
from zarrdali.bench.objectserver import RangeHTTPServer
from zarrdali.errors import ConfigError
from zarrdali.io.cache import DiskCache

A = ("sharded/c/0/0/0", 100, 1000)
B = ("sharded/c/0/0/1", 100, 1000)
DATA_A = bytes(range(256)) * 3 + bytes(232)
DATA_B = bytes(reversed(range(256))) * 3 + bytes(232)


def _flip(cache: DiskCache) -> None:
    path = cache._path(*A)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))


def _swap(cache: DiskCache) -> None:
    a, b = cache._path(*A), cache._path(*B)
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(raw_b)
    b.write_bytes(raw_a)


def _truncate(cache: DiskCache) -> None:
    path = cache._path(*A)
    path.write_bytes(path.read_bytes()[:-100])


def _plant_raw(cache: DiskCache) -> None:
    """Bytes of the attacker's choosing at the entry's name (no header)."""
    cache._path(*A).write_bytes(bytes(1000))


def _plant_other_user(cache: DiskCache) -> None:
    """A perfectly formed entry, but another user's file."""
    if os.getuid() != 0:
        pytest.skip("needs root to give a file to another user")
    path = cache._path(*A)
    forged = path.read_bytes()[:32] + bytes(1000)
    tmp = path.with_suffix(".forged")
    tmp.write_bytes(path.read_bytes())  # a valid entry: only its owner gives it away
    os.chown(tmp, 65534, 65534)
    os.replace(tmp, path)
    assert len(forged) == path.stat().st_size


def _symlink(cache: DiskCache) -> None:
    """The entry replaced by a symlink to a valid copy of it elsewhere."""
    path = cache._path(*A)
    elsewhere = cache.directory / "elsewhere"
    elsewhere.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(elsewhere)


@pytest.mark.time_limit(30)
@pytest.mark.parametrize(
    "tamper", [_flip, _swap, _truncate, _plant_raw, _plant_other_user, _symlink]
)
def test_a_damaged_entry_is_dropped_not_served(tmp_path, tamper):
    cache = DiskCache(tmp_path / "cache", "https://example.org/a.zarr", 1 << 20)
    try:
        cache.put(*A, DATA_A)
        cache.put(*B, DATA_B)
        assert cache.get(*A) == DATA_A
        tamper(cache)
        assert cache.get(*A) is None, "a damaged entry was served"
        assert cache.stats()["cache_dropped"] == 1
        assert not os.path.lexists(cache._path(*A)), "the damaged entry stays"
        cache.put(*A, DATA_A)  # fetched again
        assert cache.get(*A) == DATA_A
        assert cache.get(*B) in (DATA_B, None)  # B was swapped too: dropped, never wrong
    finally:
        cache.close()


@pytest.mark.time_limit(30)
def test_entries_and_directories_are_private(tmp_path):
    os.umask(old := os.umask(0o022))  # the usual umask: 0644 files, 0755 directories
    cache = DiskCache(tmp_path / "cache", "store", 1 << 20)
    try:
        cache.put(*A, DATA_A)
        entry = cache._path(*A)
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600
        for directory in (entry.parent, cache.root):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    finally:
        cache.close()
        os.umask(old)


@pytest.mark.time_limit(30)
def test_a_store_directory_that_is_not_ours_is_refused(tmp_path):
    planted = DiskCache(tmp_path / "cache", "store", 1 << 20)
    planted.close()
    root = planted.root
    os.rename(root, tmp_path / "real")
    root.symlink_to(tmp_path / "real")  # the store's directory swapped for a symlink
    with pytest.raises(ConfigError, match="not a private directory"):
        DiskCache(tmp_path / "cache", "store", 1 << 20)
    if os.getuid() == 0:  # planted by another user
        root.unlink()
        root.mkdir()
        os.chown(root, 65534, 65534)
        with pytest.raises(ConfigError, match="uid 65534"):
            DiskCache(tmp_path / "cache", "store", 1 << 20)


@pytest.mark.time_limit(120)
@pytest.mark.parametrize("tamper", ["flip", "swap", "truncate"])
def test_a_loader_refetches_what_it_finds_damaged(remote_store, tmp_path, tamper):
    """End to end: every entry damaged between two runs; the second run serves exact
    values, fetching every damaged range again."""
    cache_dir = tmp_path / "cache"
    kw = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=4, device="cpu", workers=0)
    with RangeHTTPServer(remote_store.parent) as http:
        url = f"{http.url}/{remote_store.name}"
        with zarrdali.ZarrLoader(url, ["sharded", "plain"], cache_dir=cache_dir, **kw) as first:
            check_batches(first, remote_store, ["sharded", "plain"])
        fetched = [r for r in http.requests if "/c/" in r[0]]
        entries = sorted(p for p in cache_dir.rglob("*") if p.is_file())
        contents = [p.read_bytes() for p in entries]
        for k, path in enumerate(entries):
            raw = bytearray(contents[k])
            if tamper == "flip":
                raw[len(raw) // 2 + 16] ^= 0x40
            elif tamper == "swap":
                raw = bytearray(contents[(k + 1) % len(entries)])
            else:
                raw = raw[: len(raw) - 7]
            path.write_bytes(bytes(raw))
        http.requests.clear()
        with zarrdali.ZarrLoader(url, ["sharded", "plain"], cache_dir=cache_dir, **kw) as again:
            check_batches(again, remote_store, ["sharded", "plain"])
            stats = again.backend.stats()
        refetched = {path for path, _ in http.requests if "/c/" in path}
        http.requests.clear()
        with zarrdali.ZarrLoader(url, ["sharded", "plain"], cache_dir=cache_dir, **kw) as third:
            check_batches(third, remote_store, ["sharded", "plain"])
        repaired = [path for path, _ in http.requests if "/c/" in path]
    assert stats["cache_dropped"] >= len(entries)  # (two batches may both find one)
    assert refetched == {path for path, _ in fetched}, "every object fetched again"
    assert repaired == [], "the cache holds good entries again"
