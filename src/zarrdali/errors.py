"""Exceptions raised by zarrdali.

Every error names what it is about (store, variable, chunk key) and, where there
is one, how to fix it. They subclass the builtin a caller would expect
(``FileNotFoundError``, ``KeyError``, ``ValueError``) so ordinary handlers work.
"""

from __future__ import annotations


class ZarrDaliError(Exception):
    """Base class of all zarrdali errors."""


class StoreNotFoundError(ZarrDaliError, FileNotFoundError):
    """The store path or URL does not hold a Zarr v3 group."""


class StoreAccessError(ZarrDaliError, PermissionError):
    """The store refused access: denied, or the credentials are missing or wrong."""


class StoreUnavailableError(ZarrDaliError, ConnectionError):
    """The store could not be read: its host does not resolve or cannot be
    reached, the connection is refused or its TLS handshake fails, it did not
    answer within ``request_timeout``, or it keeps answering with an error. The
    message names the store and the cause; ``store`` and ``cause`` hold them."""

    def __init__(self, message: str, *, store: str = "", cause: str = "") -> None:
        super().__init__(message)
        self.store = store
        self.cause = cause

    def __reduce__(self):  # keyword-only fields: pickled by name
        return _store_unavailable, (str(self), self.store, self.cause)


class VariableNotFoundError(ZarrDaliError, KeyError):
    """A requested variable is not an array of the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ConfigError(ZarrDaliError, ValueError):
    """The loader's configuration cannot be satisfied by the store."""


class MetadataError(ConfigError):
    """An array's (or the group's) ``zarr.json`` is invalid, unsupported, or
    describes more than this machine can hold. Names the store and the array."""

    def __init__(self, message: str, *, store: str, array: str) -> None:
        where = f"array {array!r}" if array else "its group metadata"
        super().__init__(f"{message} (store {store!r}, {where})")
        self.store = store
        self.array = array


class UnknownCodecError(MetadataError):
    """A codec that neither zarrdali nor zarr-python knows (zarr-python's
    ``UnknownCodecError``, with the store and array named)."""


class UnknownDataTypeError(MetadataError):
    """A ``data_type`` that is not a Zarr v3 numeric type zarrdali serves."""


class ChunkError(ZarrDaliError, RuntimeError):
    """A chunk could not be read or decoded.

    Attributes name where it came from so the message can be acted on.
    """

    def __init__(self, message: str, *, store: str, array: str, key: str) -> None:
        super().__init__(f"{message} (store {store!r}, array {array!r}, chunk {key!r})")
        self.message = message
        self.store = store
        self.array = array
        self.key = key

    def __reduce__(self):  # keyword-only fields: pickled (to and from worker processes) by name
        return _chunk_error, (self.message, self.store, self.array, self.key)


class BackendUnavailableError(ZarrDaliError, RuntimeError):
    """A backend (the GPU path) needs something this machine does not have."""


class LoaderClosedError(ZarrDaliError, RuntimeError):
    """A closed loader (or an epoch it closed) was iterated, or its backend used."""


class WorkerDiedError(ZarrDaliError, RuntimeError):
    """A worker process of the CPU path ended while the epoch needed it (killed by
    a signal, such as the out-of-memory killer's SIGKILL, or exited)."""


class ProcessContextError(ZarrDaliError, RuntimeError):
    """A loader used where its threads, worker processes or store client cannot
    exist: after ``os.fork()`` (a forked torch ``DataLoader`` worker), sent to
    another process, or starting worker processes inside a daemonic process.
    The message says what to do instead."""


def _chunk_error(message: str, store: str, array: str, key: str) -> ChunkError:
    return ChunkError(message, store=store, array=array, key=key)


def _store_unavailable(message: str, store: str, cause: str) -> StoreUnavailableError:
    return StoreUnavailableError(message, store=store, cause=cause)
