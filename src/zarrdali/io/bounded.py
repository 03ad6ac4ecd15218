"""zarr-python's reads of a remote store through zarrdali's request engine.

zarr-python opens the group and reads what zarrdali does not read itself: the
``zarr.json`` documents (``metadata.read_document`` too goes through the
group's store), the arrays zarrdali does not decode, static fields and time
coordinates. Through :class:`BoundedStore` each of those reads is one request
of the store's :class:`~zarrdali.io.sources.RemoteSource`, like every
chunk and shard index: the same deadline (``request_timeout``), stall bound
(a stalled request abandoned and sent again), retries and in-flight limit. A
read that fails raises :class:`~zarrdali.errors.StoreUnavailableError` naming
the store, the key and the cause (or ``StoreAccessError`` for refused
credentials), never the storage library's own exception. Listing a store
(only used to name what it holds in an error message) is bounded by the same
deadline per entry.

The wrapped store is zarr-python's own (``ObjectStore`` on an obstore client
whose retries are off, an ``FsspecStore``, an Icechunk session's store, ...):
anything zarr-python reads, it reads as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from zarr.abc.store import Store
from zarr.storage import WrapperStore

from zarrdali.errors import StoreUnavailableError
from zarrdali.io.sources import ObjectReadError, RemoteSource


class BoundedStore(WrapperStore):
    """A zarr ``Store`` whose reads are requests of ``source`` (see the module)."""

    def __init__(self, store: Store, source: RemoteSource | None = None) -> None:
        super().__init__(store)
        if source is None:
            raise ValueError("a BoundedStore needs the RemoteSource that makes its requests")
        self.source = source

    def _with_store(self, store: Store) -> BoundedStore:
        return type(self)(store, self.source)

    @property
    def inner(self) -> Store:
        """The wrapped zarr store."""
        return self._store

    def __getattr__(self, name: str) -> Any:
        # What the wrapped store has (an ObjectStore's client, an Icechunk store's
        # session, an FsspecStore's fs): reached through the wrapper as before.
        if name.startswith("__") or name == "_store":
            raise AttributeError(name)
        return getattr(self._store, name)

    def __str__(self) -> str:  # messages name the store, not the wrapper
        return str(self._store)

    def __repr__(self) -> str:
        return f"BoundedStore({self._store!r})"

    @property
    def _supports_sync_io(self) -> bool:  # zarr >= 3.2: never bypass the engine
        return False

    async def _bounded(self, key: str, make: Callable[[], Any]) -> Any:
        try:
            return await self.source.request(key, make)
        except ObjectReadError as err:
            raise StoreUnavailableError(
                f"cannot read store {self.source.name!r}: {err.reason} (reading {key!r})",
                store=self.source.name,
                cause=err.reason,
            ) from err

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await self._bounded(key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]
    ) -> list[Any]:
        reads = [self.get(key, prototype, byte_range) for key, byte_range in key_ranges]
        return list(await asyncio.gather(*reads))

    async def exists(self, key: str) -> bool:
        return await self._bounded(key, lambda: self._store.exists(key))

    # zarr's defaults built on ``get`` (the wrapper's would forward to the inner store)
    _get_many = Store._get_many
    if hasattr(Store, "get_ranges"):  # zarr >= 3.2
        get_ranges = Store.get_ranges

    def list(self) -> AsyncIterator[str]:
        return self._listing(self._store.list(), "")

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._listing(self._store.list_prefix(prefix), prefix)

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self._listing(self._store.list_dir(prefix), prefix)

    async def _listing(self, entries: AsyncIterator[str], prefix: str) -> AsyncIterator[str]:
        timeout = self.source.policy.timeout_s
        while True:
            try:
                entry = await asyncio.wait_for(entries.__anext__(), timeout)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise StoreUnavailableError(
                    f"cannot list store {self.source.name!r}: no answer within {timeout:g} s "
                    f"(request_timeout; listing {prefix or 'its root'!r})",
                    store=self.source.name,
                    cause="no answer",
                ) from None
            yield entry


def unwrap(zstore: Any) -> Any:
    """The store a :class:`BoundedStore` wraps (any other store as it is)."""
    return zstore.inner if isinstance(zstore, BoundedStore) else zstore
