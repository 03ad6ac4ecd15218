"""A local read-through cache of remote bytes: later epochs read the network once.

One file per cached range, named by a hash of (store, object key, offset,
length): content-addressed, so several processes and ranks sharing a
``cache_dir`` write the same names and never need a lock. A file is written
under a temporary name and renamed into place (``os.replace`` is atomic), so a
reader sees a whole entry or none. A hit touches the file's mtime; once the
entries exceed the byte budget, the least recently used are deleted. A file
deleted while another process reads it stays readable to that reader (POSIX).

Entries are never revalidated against the store: an object rewritten in place
under the same key keeps its cached bytes until evicted. Icechunk stores are
cached per snapshot, so a new commit does not see old bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

DEFAULT_CACHE_BYTES = 8 << 30
_TMP = ".tmp-"
_STALE_TMP_S = 3600.0


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class DiskCache:
    """Byte ranges of one store under ``directory/<hash of namespace>/``.

    ``budget_bytes`` bounds everything under ``directory`` (all stores).
    """

    def __init__(self, directory: str | os.PathLike, namespace: str, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be positive, got {budget_bytes} bytes")
        self.directory = Path(directory)
        self.root = self.directory / _digest(namespace)
        self.budget = budget_bytes
        self._lock = threading.Lock()
        self._since_scan = 0
        self.hits = self.misses = self.bytes_written = self.evicted = 0

    def _path(self, key: str, start: int, nbytes: int) -> Path:
        name = _digest(f"{key}\0{start}\0{nbytes}")
        return self.root / name[:2] / name

    def get(self, key: str, start: int, nbytes: int) -> bytes | None:
        path = self._path(key, start, nbytes)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # most recently used
        except FileNotFoundError:  # never cached, or evicted (maybe by another process)
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
        return data

    def put(self, key: str, start: int, nbytes: int, data) -> None:
        path = self._path(key, start, nbytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP}{os.getpid()}-{threading.get_ident()}-{path.name}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        size = memoryview(data).nbytes
        with self._lock:
            self.bytes_written += size
            self._since_scan += size
            scan = self._since_scan > self.budget // 16
            if scan:
                self._since_scan = 0
        if scan:
            self.evict()

    def evict(self) -> None:
        """Delete the least recently used entries until all stores fit the budget."""
        entries = []
        for dirpath, _, files in os.walk(self.directory):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, path, name.startswith(_TMP)))
        stale = time.time() - _STALE_TMP_S
        for mtime, _, path, tmp in entries:
            if tmp and mtime < stale:  # left by a writer that died before its rename
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        entries = [e for e in entries if not (e[3] and e[0] < stale)]
        total = sum(size for _, size, _, _ in entries)
        if total <= self.budget:
            return
        target = self.budget * 9 // 10  # some room, so the next put does not scan again
        for _, size, path, tmp in sorted(entries):
            if total <= target:
                break
            if tmp:
                continue  # another writer's file, renamed into place in a moment
            try:
                os.unlink(path)
            except FileNotFoundError:  # another process evicted it first
                continue
            total -= size
            with self._lock:
                self.evicted += 1

    def stats(self) -> dict[str, int]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_bytes_written": self.bytes_written,
            "cache_evicted": self.evicted,
        }
