"""A local read-through cache of remote bytes: later epochs read the network once.

One file per cached range, named by a hash of (store, object key, offset,
length): content-addressed, so several processes and ranks sharing a
``cache_dir`` write the same names and never need a lock. A file is written
under a temporary name and renamed into place (``os.replace`` is atomic), so a
reader sees a whole entry or none. A hit touches the file's mtime; once the
entries exceed the byte budget, the least recently used are deleted. A file
deleted while another process reads it stays readable to that reader (POSIX).

Every entry is checked when it is read, so a damaged cache costs a refetch,
never wrong values: it starts with a header holding the length of the bytes
fetched, a digest of what they are (store, key, range: an entry copied or
renamed to another entry's name does not pass) and the crc32c of both. A file
that is not a regular file of this user, a symlink (never followed:
``O_NOFOLLOW``), or one whose header, length or checksum does not match is
deleted and counted (``cache_dropped``), and the range fetched again. crc32c
runs at about 5.5 GB/s on one core of the 2-core machine (0.18 ms per MB
cached, on each write and each hit), next to milliseconds per network request.

The cache is private to the user: directories 0700, entries 0600. A store's
directory (``cache_dir/<hash of the store>``) that belongs to another user is
refused (:class:`~zarrdali.errors.ConfigError`); all entries are opened
relative to that directory's descriptor, held until :meth:`DiskCache.close`.

Entries are never revalidated against the store: an object rewritten in place
under the same key keeps its cached bytes until evicted. Icechunk stores are
cached per snapshot, so a new commit does not see old bytes.

The cache degrades, it never fails a batch: a write that fails (a full disk,
a file system that is or became read-only, a quota, any ``OSError``) removes
its temporary file and stops all writing to this cache, with one
``RuntimeWarning`` naming the directory and the error; the loader keeps
reading those ranges from the store. Reads go on: a read-only cache still
hits (the time of a hit is updated where the file system lets it), and a
cache directory that cannot be made at all is a cache that misses.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
import time
import warnings
from pathlib import Path

import crc32c

from zarrdali.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_CACHE_BYTES = 8 << 30
_TMP = ".tmp-"
_STALE_TMP_S = 3600.0
_MAGIC = b"ZDC1"
# magic (4), crc32c of identity + payload (4), payload length (8), identity (16)
_HEADER = 32
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _private_dir(path: str, dir_fd: int | None = None) -> None:
    """Make ``path`` a directory of this user, mode 0700 (created if missing).

    Raises :class:`ConfigError` when it is a symlink, not a directory, or
    another user's."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}"
        raise ConfigError(
            f"cache directory {path!r} is not a private directory of this user ({what}); "
            f"pass a cache_dir of your own."
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700, dir_fd=dir_fd)  # a directory, checked just above


class DiskCache:
    """Byte ranges of one store under ``directory/<hash of namespace>/``.

    ``budget_bytes`` bounds everything this user caches under ``directory``
    (all stores). :meth:`close` releases the directory's descriptor.
    ``writing`` turns False for good at the first write that fails (see the
    module's text).
    """

    def __init__(self, directory: str | os.PathLike, namespace: str, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be positive, got {budget_bytes} bytes")
        self.directory = Path(directory)
        self.namespace = namespace
        self.root = self.directory / _digest(namespace).hex()
        self.budget = budget_bytes
        self._lock = threading.Lock()
        self._since_scan = 0
        self.hits = self.misses = self.bytes_written = self.evicted = self.dropped = 0
        self.write_errors = 0
        self.writing = True
        self._closed = False
        self._fd: int | None = None
        self._subdirs: set[str] = set()  # checked private
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private_dir(str(self.root))
        except ConfigError:
            raise
        except OSError as err:  # read-only, full, not ours to write: a cache that misses
            self._stop_writing(err, "cannot create the cache's directory")
        with contextlib.suppress(OSError):  # (absent: every read misses)
            self._fd = os.open(self.root, _OPEN_DIR)

    def _stop_writing(self, err: OSError, what: str) -> None:
        """A write failed: no more writes to this cache (once, with a warning)."""
        with self._lock:
            self.write_errors += 1
            if not self.writing:
                return
            self.writing = False
        code = errno.errorcode.get(err.errno, str(err.errno)) if err.errno else type(err).__name__
        message = (
            f"cache_dir {str(self.directory)!r}: {what} ({code}: {err.strerror or err}); "
            f"zarrdali stops writing to this cache and reads what is not in it from the "
            f"store (entries already cached are still read)."
        )
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _fd_or_raise(self) -> int:
        if self._closed:
            raise RuntimeError(f"the disk cache {str(self.root)!r} was closed")
        return self._fd

    def _name(self, key: str, start: int, nbytes: int) -> tuple[str, bytes]:
        """The entry's path relative to the store's directory, and its identity."""
        name = _digest(f"{key}\0{start}\0{nbytes}").hex()
        identity = _digest(f"{self.namespace}\0{key}\0{start}\0{nbytes}")
        return f"{name[:2]}/{name}", identity

    def _path(self, key: str, start: int, nbytes: int) -> Path:
        """Where the entry of ``(key, start, nbytes)`` lives (for tests and tools)."""
        return self.root / self._name(key, start, nbytes)[0]

    def get(self, key: str, start: int, nbytes: int) -> memoryview | None:
        """The cached bytes, checked; None when absent or dropped as damaged."""
        name, identity = self._name(key, start, nbytes)
        root = self._fd_or_raise()
        try:
            if root is None:  # no directory: nothing cached
                raise FileNotFoundError(name)
            fd = os.open(name, _OPEN_READ, dir_fd=root)
        except FileNotFoundError:  # never cached, or evicted (maybe by another process)
            with self._lock:
                self.misses += 1
            return None
        except OSError:  # a symlink (ELOOP) or something else in the way
            return self._drop(name)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                return self._drop(name)
            parts, got = [], 0
            while got < st.st_size:  # one read, unless the file was being replaced
                part = os.read(fd, st.st_size - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            view = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
            if got != st.st_size or not self._valid(view, identity):
                return self._drop(name)
            with contextlib.suppress(OSError):  # a read-only file system: a hit all the same
                os.utime(fd)  # most recently used
        except OSError:  # the disk failed under the read: fetched again
            return self._drop(name)
        finally:
            os.close(fd)
        with self._lock:
            self.hits += 1
        return view[_HEADER:]

    @staticmethod
    def _valid(entry: memoryview, identity: bytes) -> bool:
        if len(entry) < _HEADER or entry[:4] != _MAGIC or entry[16:32] != identity:
            return False
        length = int.from_bytes(entry[8:16], "little")
        if length != len(entry) - _HEADER:
            return False
        return crc32c.crc32c(entry[16:]) == int.from_bytes(entry[4:8], "little")

    def _drop(self, name: str) -> None:
        """Delete a damaged entry (the caller fetches the range again; on a
        read-only file system it stays, and is dropped again when read)."""
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self._fd_or_raise())
        with self._lock:
            self.dropped += 1
            self.misses += 1
        return None

    def put(self, key: str, start: int, nbytes: int, data) -> None:
        """Cache ``data`` as the range ``(key, start, nbytes)``; a write that fails
        stops this cache's writing instead of raising (see the module's text)."""
        root = self._fd_or_raise()
        if not self.writing or root is None:
            return
        name, identity = self._name(key, start, nbytes)
        sub = name[:2]
        payload = memoryview(data).cast("B")
        size = payload.nbytes
        crc = crc32c.crc32c(payload, crc32c.crc32c(identity))
        header = _MAGIC + crc.to_bytes(4, "little") + size.to_bytes(8, "little") + identity
        tmp = f"{sub}/{_TMP}{os.getpid()}-{threading.get_ident()}-{name[3:]}"
        try:
            if sub not in self._subdirs:
                _private_dir(sub, dir_fd=root)
                self._subdirs.add(sub)
            fd = os.open(tmp, _OPEN_WRITE, 0o600, dir_fd=root)
        except ConfigError:
            raise
        except OSError as err:
            self._stop_writing(err, "cannot write an entry")
            return
        try:
            try:
                with open(fd, "wb", closefd=False) as f:
                    f.write(header)
                    f.write(payload)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=root, dst_dir_fd=root)
        except OSError as err:  # no half-written entry stays behind
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=root)
            self._stop_writing(err, "cannot write an entry")
            return
        with self._lock:
            self.bytes_written += size
            self._since_scan += size
            scan = self._since_scan > self.budget // 16
            if scan:
                self._since_scan = 0
        if scan:
            self.evict()

    def _own_store_dirs(self) -> list[str]:
        """This user's store directories under ``directory`` (not others', no symlinks)."""
        out = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                        out.append(entry.path)
        return out

    def evict(self) -> None:
        """Delete the least recently used entries until all stores fit the budget."""
        entries = []
        for store_dir in self._own_store_dirs():
            for dirpath, _, files in os.walk(store_dir):  # never follows symlinks
                for name in files:
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:
                        continue
                    entries.append((st.st_mtime, st.st_size, path, name.startswith(_TMP)))
        stale = time.time() - _STALE_TMP_S
        for mtime, _, path, tmp in entries:
            if tmp and mtime < stale:  # left by a writer that died before its rename
                with contextlib.suppress(OSError):
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
            except OSError:  # read-only now: nothing more to evict
                return
            total -= size
            with self._lock:
                self.evicted += 1

    def stats(self) -> dict[str, int]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_bytes_written": self.bytes_written,
            "cache_evicted": self.evicted,
            "cache_dropped": self.dropped,
            "cache_write_errors": self.write_errors,
        }

    def close(self) -> None:
        """Release the store directory's descriptor (idempotent)."""
        fd, self._fd, self._closed = self._fd, None, True
        if fd is not None:
            os.close(fd)
