"""A cache disk that fills up or turns read-only: the cache stops writing (one
warning naming the directory and the error), the loader keeps serving exact
batches from the store, no half-written entry stays, and a read-only cache
still hits.

Disks made here: a small tmpfs (mounted by root; the tests that need one skip,
saying so, where this process may not mount), and a file size limit
(``RLIMIT_FSIZE``) in a child process, which needs no privilege.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from faultkit import check_batches, remount, tmpfs

import zarrdali
from zarrdali.bench.objectserver import RangeHTTPServer

pytest.importorskip("obstore")

KW = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=8, device="cpu", workers=0)
VARIABLES = ["sharded", "plain"]


def _epoch(url: str, store, cache_dir, variables=VARIABLES) -> tuple[dict, list[str]]:
    """An epoch checked against zarr-python; the source's stats and the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with zarrdali.ZarrLoader(url, variables, cache_dir=cache_dir, **KW) as loader:
            check_batches(loader, store, variables)
            stats = loader.backend.stats()
    return stats, [str(w.message) for w in caught if "cache_dir" in str(w.message)]


def _leftovers(directory) -> list:
    return [p for p in directory.rglob(".tmp-*")]


@pytest.mark.time_limit(120)
def test_a_full_disk_stops_the_cache_not_the_loader(remote_store, tmp_path):
    with tmpfs(tmp_path / "disk", 64 << 10) as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (the RLIMIT_FSIZE test covers writes that fail)")
        cache = disk / "cache"
        with RangeHTTPServer(remote_store.parent) as http:
            url = f"{http.url}/{remote_store.name}"
            stats, warned = _epoch(url, remote_store, cache)
            assert len(warned) == 1, warned
            assert str(cache) in warned[0] and "ENOSPC" in warned[0], warned[0]
            # Writes already under way when the disk fills fail too (seen: 2 under load);
            # after them the cache writes no more, and says so once.
            assert stats["cache_bytes_written"] > 0 and 1 <= stats["cache_write_errors"] <= 4
            assert not _leftovers(cache), "no half-written entry stays"
            # Another loader: what fitted is read from the cache, the rest from the store.
            http.requests.clear()
            again, warned = _epoch(url, remote_store, cache)
            assert again["cache_hits"] > 0 and len(warned) == 1
            assert len(http.requests) < stats["requests"]
            assert not _leftovers(cache)


@pytest.mark.time_limit(120)
def test_a_read_only_cache_still_hits(remote_store, tmp_path):
    with tmpfs(tmp_path / "disk", 16 << 20) as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (root with mount rights is needed)")
        cache = disk / "cache"
        with RangeHTTPServer(remote_store.parent) as http:
            url = f"{http.url}/{remote_store.name}"
            first, warned = _epoch(url, remote_store, cache)
            assert first["cache_write_errors"] == 0 and not warned
            remount(disk, "ro")
            http.requests.clear()
            stats, warned = _epoch(url, remote_store, cache)
            assert not warned, "nothing to write: no warning"
            assert stats["cache_hits"] > 0 and stats["cache_misses"] == 0, stats
            assert not [p for p, _ in http.requests if "/c/" in p], "every chunk from the cache"
            # A store never cached: its directory cannot be made; served from the store.
            other = remote_store.parent / "other.zarr"
            if not other.exists():
                other.symlink_to(remote_store.name)
            stats, warned = _epoch(f"{http.url}/other.zarr", remote_store, cache)
            assert len(warned) == 1 and "EROFS" in warned[0] and str(cache) in warned[0]
            assert stats["cache_hits"] == 0 and stats["requests"] > 0


@pytest.mark.time_limit(120)
def test_writes_past_the_file_size_limit_stop_the_cache(remote_store, tmp_path, python_child):
    """No privilege needed: a child process whose file size limit is 0 bytes (every
    cache write fails with EFBIG; SIGXFSZ ignored, as a job's limit would be set)."""
    cache = tmp_path / "cache"
    with RangeHTTPServer(remote_store.parent) as http:
        code = f"""
import json, resource, signal, warnings, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
import zarrdali
from faultkit import check_batches
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with zarrdali.ZarrLoader("{http.url}/{remote_store.name}", {VARIABLES!r},
                             cache_dir={str(cache)!r}, **{KW!r}) as loader:
        n = check_batches(loader, __import__("pathlib").Path({str(remote_store)!r}), {VARIABLES!r})
        stats = loader.backend.stats()
print(json.dumps({{"batches": n, "stats": stats,
                  "warned": [str(w.message) for w in caught if "cache_dir" in str(w.message)]}}))
"""
        child = python_child(code, timeout=100)
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["batches"] > 0
    assert len(out["warned"]) == 1 and "EFBIG" in out["warned"][0], out["warned"]
    assert str(cache) in out["warned"][0]
    assert out["stats"]["cache_bytes_written"] == 0 and out["stats"]["cache_write_errors"] == 1
    assert not _leftovers(cache), "no half-written entry stays"
