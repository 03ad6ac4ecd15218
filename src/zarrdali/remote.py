"""Stores that are not local directories: URLs, zarr ``Store`` objects, obstore stores.

A URL (``s3://``, ``gs://``, ``az://``, ``http(s)://``) is opened with obstore
when it is installed (one client for metadata and chunk bytes), else with
fsspec through zarr-python. A zarr ``Store`` object (obstore-backed,
fsspec-backed, an Icechunk session's store) is used as given. zarr-python reads
the metadata either way; :mod:`zarrdali.backends.sources` reads the chunks.

Also here: the translation of fsspec-style ``storage_options`` to obstore's
names, and how errors of the storage libraries are told apart (access refused,
transient, missing), so every caller words them alike.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import ConfigError

OBSTORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure", "http", "https")

# Retries of obstore's own client (5xx, 429, connection errors, timeouts), with
# exponential backoff and jitter. A retry_config in storage_options replaces it.
DEFAULT_RETRY: dict[str, Any] = {
    "max_retries": 10,
    "backoff": {
        "init_backoff": timedelta(milliseconds=100),
        "max_backoff": timedelta(seconds=15),
        "base": 2,
    },
    "retry_timeout": timedelta(minutes=2),
}

# fsspec (s3fs/gcsfs) option names -> obstore's, so one storage_options works with both.
_FSSPEC_TO_OBSTORE = {
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
    "endpoint_url": "endpoint",
    "region_name": "region",
}


def is_url(store: object) -> bool:
    return isinstance(store, str) and "://" in store and not store.startswith("file://")


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def obstore_available() -> bool:
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def obstore_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` as keyword arguments of ``obstore.store.from_url``.

    fsspec's names (``key``, ``secret``, ``endpoint_url``, ``anon``,
    ``client_kwargs``) are translated; obstore's own pass through.
    """
    opts = dict(storage_options or {})
    client_kwargs = opts.pop("client_kwargs", None) or {}
    opts.update({k: v for k, v in client_kwargs.items() if k in _FSSPEC_TO_OBSTORE})
    for old, new in _FSSPEC_TO_OBSTORE.items():
        if old in opts:
            opts.setdefault(new, opts.pop(old))
    if opts.pop("anon", False):
        opts["skip_signature"] = True
    client = dict(opts.pop("client_options", None) or {})
    endpoint = str(opts.get("endpoint", ""))
    if scheme(url) == "http" or endpoint.startswith("http://"):
        client.setdefault("allow_http", True)  # plain HTTP only where asked for by the URL
    if client:
        opts["client_options"] = client
    opts.setdefault("retry_config", DEFAULT_RETRY)
    return opts


def open_obstore(url: str, storage_options: Mapping[str, Any] | None):
    """An obstore store for ``url`` (the root of the Zarr store)."""
    import obstore.exceptions
    from obstore.store import from_url

    try:
        return from_url(url, **obstore_options(url, storage_options))
    except (obstore.exceptions.UnknownConfigurationKeyError, ValueError, TypeError) as err:
        raise ConfigError(
            f"cannot open {url!r} with obstore: {short_message(err)}. storage_options take "
            f"obstore's names (e.g. access_key_id, secret_access_key, endpoint, region) or "
            f"fsspec's (key, secret, endpoint_url, client_kwargs, anon)."
        ) from err


def zarr_store_for(
    store: Any, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = True
):
    """A zarr ``Store`` for a URL or a store object (obstore or zarr); read-only by default."""
    from zarr.abc.store import Store
    from zarr.storage import FsspecStore, ObjectStore

    if isinstance(store, Store):
        return store
    if is_url(store):
        if scheme(store) in OBSTORE_SCHEMES and obstore_available():
            return ObjectStore(open_obstore(store, storage_options), read_only=read_only)
        try:
            return FsspecStore.from_url(store, storage_options=storage_options, read_only=read_only)
        except ImportError as err:
            raise ConfigError(
                f"cannot open {store!r}: {err}. Install obstore (`pip install obstore`, "
                f"or zarrdali[remote]) or the fsspec implementation for this scheme."
            ) from err
    if type(store).__module__.startswith("obstore"):
        return ObjectStore(store, read_only=read_only)
    raise ConfigError(
        f"cannot open a store from {type(store).__name__}: pass a path, a URL, a zarr.Group, "
        f"a zarr Store (e.g. an Icechunk session's store) or an obstore store."
    )


def bucket_missing(zstore: Any) -> bool:
    """Whether a store that holds no group lacks its bucket (zarr-python does not say)."""
    inner = getattr(zstore, "store", None)
    if not type(inner).__module__.startswith("obstore"):
        return False
    import obstore

    try:
        obstore.get_range(inner, "zarr.json", start=0, length=1)  # GET: 404 with a body
    except Exception as err:  # the answer is in the message; any other failure: unknown
        return "NoSuchBucket" in str(err)
    return False


def store_label(zstore: Any) -> str:
    """A name for messages: the store's own string (URL-like for obstore and fsspec)."""
    return str(zstore)


def is_picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # any store-specific refusal means: cannot go to a worker process
        return False
    return True


# -- telling errors apart ------------------------------------------------------

_ACCESS_STATUS = {401, 403}
_ACCESS_WORDS = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "Forbidden",
    "Unauthorized",
    "403 Forbidden",
    "401 Unauthorized",
)
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_WORDS = (
    "SlowDown",
    "Too Many Requests",
    "Service Unavailable",
    "ServiceUnavailable",
    "RequestTimeout",
    "InternalError",
    "Throttl",
    "Connection reset",
)


def _status(err: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(err, attr, None)
        if isinstance(value, int):
            return value
    return None


def is_access_error(err: BaseException) -> bool:
    """The store refused the request: denied, or credentials missing or wrong."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"PermissionDeniedError", "UnauthenticatedError", "PermissionError"}:
        return True
    if _status(err) in _ACCESS_STATUS:
        return True
    text = str(err)
    return any(word in text for word in _ACCESS_WORDS)


def is_transient(err: BaseException) -> bool:
    """Worth retrying: throttling (429, 503 SlowDown), server errors, dropped connections."""
    if isinstance(err, (FileNotFoundError, PermissionError)) or is_access_error(err):
        return False
    if _status(err) in _TRANSIENT_STATUS:
        return True
    if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    try:
        import aiohttp

        if isinstance(err, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    except ImportError:
        pass
    text = str(err)
    return any(word in text for word in _TRANSIENT_WORDS)


def short_message(err: BaseException) -> str:
    """The first line of an error (obstore appends pages of debug output)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


@dataclass(frozen=True)
class StoreRef:
    """How to (re)open a store: all a worker process needs, picklable.

    ``store`` is a path, a URL or a picklable zarr/obstore store object.
    """

    store: Any
    storage_options: Mapping[str, Any] | None = None
    cache_dir: str | None = None
    cache_bytes: int | None = None
    max_in_flight: int = 64

    def open(self):
        """``(group, name, source)``: the group, a name for messages, its byte source."""
        from .backends.sources import make_source
        from .store import open_group

        group, name = open_group(self.store, self.storage_options)
        source = make_source(
            group,
            name,
            max_in_flight=self.max_in_flight,
            cache_dir=self.cache_dir,
            cache_bytes=self.cache_bytes,
        )
        return group, name, source
