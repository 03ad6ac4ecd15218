"""A store's byte source: which one reads it, made and configured.

Local stores are read with preads; a remote store through zarrdali's request
engine (:class:`~zarrdali.io.sources.RemoteSource`), the same one zarr-python's
metadata reads went through (:class:`~zarrdali.io.bounded.BoundedStore`),
optionally behind a disk cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from zarrdali.io.bounded import BoundedStore, unwrap
from zarrdali.io.cache import DEFAULT_CACHE_BYTES, DiskCache
from zarrdali.io.flow import RequestPolicy
from zarrdali.io.remote import obstore_for_requests
from zarrdali.io.sources import (
    ByteSource,
    CachedSource,
    LocalSource,
    ObstoreSource,
    RemoteSource,
    ZarrStoreSource,
)


def cache_namespace(zstore: Any, name: str) -> str:
    """What cached bytes belong to: the store, and for Icechunk its snapshot."""
    session = getattr(unwrap(zstore), "session", None)
    snapshot = getattr(session, "snapshot_id", None)
    return f"{name}@{snapshot}" if snapshot else name


def _policy(request_timeout: float | None) -> RequestPolicy:
    return RequestPolicy(**({} if request_timeout is None else {"timeout_s": request_timeout}))


def bounded_store(
    zstore: Any, name: str, *, max_in_flight: int = 64, request_timeout: float | None = None
):
    """``zstore`` (a remote zarr store) as a :class:`~zarrdali.io.bounded.BoundedStore`:
    zarr-python's reads become requests of the :class:`RemoteSource` that will
    also read the chunks (``make_source`` takes it from there)."""
    from zarr.storage import ObjectStore

    policy = _policy(request_timeout)
    kw = dict(max_in_flight=max_in_flight, policy=policy)
    if isinstance(zstore, ObjectStore):
        # One client that never retries by itself, for zarr-python's reads and ours.
        client = obstore_for_requests(zstore.store, policy.timeout_s)
        source: RemoteSource = ObstoreSource(client, name, **kw)
        if client is not zstore.store:
            zstore = ObjectStore(client, read_only=True)
    else:
        source = ZarrStoreSource(zstore, name, **kw)
    return BoundedStore(zstore, source)


def make_source(
    group: Any,
    name: str,
    *,
    max_in_flight: int = 64,
    cache_dir: str | os.PathLike | None = None,
    cache_bytes: int | None = None,
    request_timeout: float | None = None,
    map_fn: Callable[[Callable, Iterable], Iterable] = map,
) -> ByteSource:
    """The byte source of the store a zarr group was opened from. A group opened
    by :func:`~zarrdali.store.open.open_group` on a remote store already has one (its
    metadata was read through it): that one, set to ``max_in_flight`` and
    ``request_timeout`` (when given).

    ``request_timeout``: the most seconds one remote request may take, retries
    included, before its batch fails (default :class:`RequestPolicy`'s)."""
    from zarr.storage import LocalStore, ObjectStore

    zstore = group.store
    if isinstance(zstore, LocalStore):
        return LocalSource(name, map_fn)
    if isinstance(zstore, BoundedStore):
        source = zstore.source
        policy = source.policy if request_timeout is None else _policy(request_timeout)
        source.configure(max_in_flight, policy)
    else:
        policy = _policy(request_timeout)
        kw = dict(max_in_flight=max_in_flight, policy=policy)
        if isinstance(zstore, ObjectStore):
            store = obstore_for_requests(zstore.store, policy.timeout_s)
            source = ObstoreSource(store, name, **kw)
        else:
            source = ZarrStoreSource(zstore, name, **kw)
    if cache_dir is None:
        return source
    budget = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
    return CachedSource(source, DiskCache(cache_dir, cache_namespace(zstore, name), budget))
