"""Stores that are not local directories: URLs, zarr ``Store`` objects, obstore stores.

A URL (``s3://``, ``gs://``, ``az://``, ``http(s)://``) is opened with obstore
when it is installed (one client for metadata and chunk bytes), else with
fsspec through zarr-python. A zarr ``Store`` object (obstore-backed,
fsspec-backed, an Icechunk session's store) is used as given. zarr-python reads
the metadata either way, each of its reads a request of zarrdali's engine
(:mod:`zarrdali.io.bounded`); :mod:`zarrdali.io.sources` reads the chunks.

Also here: the translation of fsspec-style ``storage_options`` to obstore's
names, and how errors of the storage libraries are told apart (access refused,
throttling, transient, a connection that never reached the store) and described
in a few words, so every caller words them alike.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from zarrdali.errors import ConfigError

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


# The client of chunk requests does not retry: zarrdali's engine does (and counts
# it), bounding each attempt by what the store usually takes (io/flow.py).
NO_RETRY: dict[str, Any] = {
    **DEFAULT_RETRY,
    "max_retries": 0,
    "retry_timeout": timedelta(seconds=1),
}


def obstore_for_requests(store: Any, timeout_s: float) -> Any:
    """``store`` (an obstore store) as a client that never retries by itself and
    times a request out only after ``timeout_s`` (zarrdali's engine retries and
    re-sends stalled requests sooner). Stores without a network client (local,
    memory) are returned as they are."""
    from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

    options = dict(getattr(store, "client_options", None) or {})
    options["timeout"] = timedelta(seconds=timeout_s + 10)  # zarrdali's deadline comes first
    if isinstance(store, HTTPStore):
        return HTTPStore.from_url(store.url, client_options=options, retry_config=NO_RETRY)
    if isinstance(store, (S3Store, GCSStore, AzureStore)):
        return type(store)(
            prefix=store.prefix,
            config=store.config,
            client_options=options,
            retry_config=NO_RETRY,
            credential_provider=store.credential_provider,
        )
    return store


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


def store_label(zstore: Any) -> str:
    """A name for messages: the store's own string (URL-like for obstore and fsspec),
    without the ``user:password@`` of a URL."""
    return redact_url(str(zstore))


def is_picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # any store-specific refusal means: cannot go to a worker process
        return False
    return True


# -- keeping secrets out of what is printed or written ---------------------------

REDACTED = "<redacted>"
# Option names whose values are settings, never credentials: shown as they are
# (URLs without their user:password@ part). Any other value is redacted.
_SHOWN_OPTIONS = frozenset(
    {
        "endpoint",
        "endpoint_url",
        "region",
        "region_name",
        "anon",
        "skip_signature",
        "allow_http",
        "virtual_hosted_style_request",
        "use_ssl",
        "client_kwargs",
        "client_options",
        "config_kwargs",
        "timeout",
        "connect_timeout",
        "retry_config",
        "requester_pays",
        "default_fill_cache",
        "use_listings_cache",
        "asynchronous",
    }
)
_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "sas")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """``text`` without the ``user:password@`` of any URL in it."""
    return _USERINFO.sub(f"{REDACTED}@", text)


def _names_secret(name: object) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact_options(options: Any) -> Any:
    """``storage_options`` fit to print or write: a value is shown only when its
    name is a known setting (endpoint, region, client_kwargs, ...) and names no
    secret (key, secret, token, password, credential): inside it too, names of
    secrets are redacted, and URLs lose their ``user:password@``. Every other
    value becomes ``"<redacted>"``."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        return REDACTED
    return {
        name: (
            REDACTED
            if _names_secret(name) or str(name).lower() not in _SHOWN_OPTIONS
            else _cleaned(value)
        )
        for name, value in options.items()
    }


def _cleaned(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: REDACTED if _names_secret(k) else _cleaned(v) for k, v in value.items()}
    if isinstance(value, str):
        return redact_url(value)
    return value


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line fit to record: the JSON of ``--*storage-options`` redacted
    (:func:`redact_options`), URLs without ``user:password@``."""
    out: list[str] = []
    pending = False
    for arg in argv:
        if pending:
            out.append(_redacted_json(arg))
            pending = False
            continue
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag.endswith("storage-options"):
            if eq:
                out.append(f"{flag}={_redacted_json(value)}")
            else:
                out.append(arg)
                pending = True
            continue
        out.append(redact_url(arg))
    return out


def _redacted_json(text: str) -> str:
    try:
        return json.dumps(redact_options(json.loads(text)))
    except ValueError:
        return REDACTED


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
    "connection reset",
    "connection closed",
    "Connection refused",
    "error sending request",  # obstore (reqwest): connect errors and timeouts
    "error decoding response body",
    "timed out",
)
_STATUS_IN_TEXT = re.compile(r"status code: (\d{3})")  # obstore's "non-2xx status code: 503"


def _status(err: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(err, attr, None)
        if isinstance(value, int):
            return value
    found = _STATUS_IN_TEXT.search(str(err))
    return int(found.group(1)) if found else None


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


# What a store says when it asks for fewer requests (S3: 503 SlowDown; GCS: 429
# rateLimitExceeded; Azure: 503 ServerBusy): load, unlike a plain 5xx or a reset.
_THROTTLING_WORDS = (
    "SlowDown",
    "Slow Down",
    "Too Many Requests",
    "TooManyRequests",
    "Throttl",
    "RequestLimitExceeded",
    "rateLimitExceeded",
    "ServerBusy",
    "reduce your request rate",
)


def is_throttling(err: BaseException) -> bool:
    """The store answered that it is throttling this client (429, 503 SlowDown, ...)."""
    if _status(err) == 429:
        return True
    text = str(err)
    return any(word in text for word in _THROTTLING_WORDS)


# Connection failures, told from the text of the error chain (obstore prints the
# whole chain of reqwest/hyper/rustls errors; aiohttp and Python name the OS error).
_DNS_WORDS = (
    "dns error",
    "failed to lookup address",
    "Name or service not known",
    "nodename nor servname",
    "No address associated with hostname",
    "getaddrinfo failed",
    "Cannot connect to host",  # (aiohttp: with one of the words above)
)
_DNS_TEMPORARY = ("Temporary failure in name resolution", "EAI_AGAIN")
_TLS_WORDS = (
    "InvalidContentType",
    "InvalidCertificate",
    "invalid peer certificate",
    "certificate verify failed",
    "CERTIFICATE_VERIFY_FAILED",
    "UnknownIssuer",
    "NotValidForName",
    "WRONG_VERSION_NUMBER",
    "wrong version number",
    "SSLError",
    "tls handshake",
    "TLS handshake",
    "HandshakeFailure",
    "AlertReceived",
)
_REFUSED_WORDS = ("Connection refused", "ConnectionRefused", "connection refused")
_UNREACHABLE_WORDS = (
    "No route to host",
    "Network is unreachable",
    "Host is unreachable",
    "HostUnreachable",
    "NetworkUnreachable",
)
_RESET_WORDS = (
    "Connection reset",
    "connection reset",
    "ConnectionReset",
    "connection closed before message completed",
    "connection closed",
    "Broken pipe",
    "IncompleteMessage",
    "error decoding response body",
)


def _chain_text(err: BaseException) -> str:
    """The text of ``err`` and of the errors it was raised from."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def connect_failure(err: BaseException) -> str | None:
    """What kept a request from reaching the store, if that is what failed:
    ``"dns"`` (the host name does not resolve), ``"tls"`` (the TLS handshake
    failed), ``"refused"`` (nothing listens there) or ``"unreachable"`` (no route
    to the host); None for anything else."""
    text = _chain_text(err)
    names = {cls.__name__ for cls in type(err).__mro__}
    if any(w in text for w in _DNS_TEMPORARY):
        return None  # the resolver hiccuped: worth another try
    if "gaierror" in names or any(w in text for w in _DNS_WORDS[:-1]):
        return "dns"
    if names & {"SSLError", "ClientSSLError", "ClientConnectorCertificateError"} or any(
        w in text for w in _TLS_WORDS
    ):
        return "tls"
    if "ConnectionRefusedError" in names or any(w in text for w in _REFUSED_WORDS):
        return "refused"
    if any(w in text for w in _UNREACHABLE_WORDS):
        return "unreachable"
    return None


def describe_failure(err: BaseException) -> str:
    """The cause of a failed request in a few words, for messages: what a user
    can act on, without the storage client's pages of debug output."""
    kind = connect_failure(err)
    if kind == "dns":
        return "the host name does not resolve (DNS lookup failed)"
    if kind == "tls":
        found = next((w for w in _TLS_WORDS if w in _chain_text(err)), "")
        detail = f" ({found})" if found and found not in ("SSLError", "tls handshake") else ""
        return f"the TLS handshake failed{detail}: is it an https:// URL of a TLS server?"
    if kind == "refused":
        return "the connection was refused (nothing listens at that host and port)"
    if kind == "unreachable":
        return "the host is unreachable (no route to it)"
    status = _status(err)
    if status is not None:
        code = next((w for w in _ACCESS_WORDS + _THROTTLING_WORDS if w in str(err)), "")
        return f"HTTP {status}" + (f" ({code})" if code and str(status) not in code else "")
    text = _chain_text(err)
    if any(w in text for w in _RESET_WORDS):
        return "the connection was reset or closed before the answer was complete"
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)) or "timed out" in text:
        return "the request timed out"
    return short_message(err)


def short_message(err: BaseException) -> str:
    """The first line of an error (obstore appends pages of debug output)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()
