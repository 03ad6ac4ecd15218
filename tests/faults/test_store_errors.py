"""Every way a store can fail to open is a named zarrdali error that says which
store and why, in one sentence: an unreachable host, a refused connection, a
failed TLS handshake, a name that does not resolve, 401/403, no group at the
URL. No exception of the storage library (obstore's ``GenericError``) or of
zarr-python reaches the user, and Zarr v2 keys (``.zattrs``, ``.zmetadata``)
are named only for a store that is Zarr v2.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

import zarrdali
from zarrdali.bench.objectserver import RangeHTTPServer

pytest.importorskip("obstore")

KW = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=4, device="cpu", workers=0)
V2_KEYS = (".zattrs", ".zmetadata", ".zgroup", ".zarray")


def _fails(url: str, error: type[Exception], variables=("sharded",)) -> tuple[str, float]:
    """The constructor's error for ``url``: its message (checked to be one named,
    clean sentence) and how long it took."""
    t0 = time.perf_counter()
    with pytest.raises(error) as info:
        zarrdali.ZarrLoader(url, list(variables), request_timeout=5, **KW)
    took = time.perf_counter() - t0
    message = str(info.value)
    assert type(info.value).__module__ == "zarrdali.errors", type(info.value)
    assert url in message, message
    assert "\n" not in message and "Debug source" not in message, message
    assert "GenericError" not in message and "obstore" not in message, message
    assert not any(key in message for key in V2_KEYS), message
    return message, took


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.time_limit(60)
def test_a_refused_connection(remote_store):
    """Nothing listens there: named at once (a store that never answered is a wrong
    URL, not a restart; retrying is for stores that answered before)."""
    url = f"http://127.0.0.1:{_closed_port()}/{remote_store.name}"
    message, took = _fails(url, zarrdali.StoreUnavailableError)
    assert "connection was refused" in message and "'zarr.json'" in message
    assert took < 5


@pytest.mark.time_limit(60)
def test_a_host_name_that_does_not_resolve():
    url = "http://zarrdali-test.invalid/store.zarr"  # .invalid never resolves (RFC 2606)
    message, took = _fails(url, zarrdali.StoreUnavailableError)
    assert "does not resolve" in message
    assert took < 5


@pytest.mark.time_limit(60)
def test_a_failed_tls_handshake(remote_store):
    """https:// to a server that speaks plain HTTP: the handshake fails, named."""
    with RangeHTTPServer(remote_store.parent) as http:
        url = http.url.replace("http://", "https://") + f"/{remote_store.name}"
        message, took = _fails(url, zarrdali.StoreUnavailableError)
    assert "TLS handshake failed" in message
    assert took < 5


@pytest.mark.time_limit(60)
@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("where", ["/", "/sharded/"])
def test_access_refused(remote_store, status, where):
    """401/403 for everything, or for one array's metadata only: StoreAccessError
    naming the store and the status."""
    with RangeHTTPServer(remote_store.parent) as http:
        http.faults.status[where] = status
        url = f"{http.url}/{remote_store.name}"
        message, _ = _fails(url, zarrdali.StoreAccessError)
    assert f"HTTP {status}" in message, message
    assert ("'sharded/zarr.json'" in message) == (where == "/sharded/"), message


@pytest.mark.time_limit(60)
def test_no_group_at_the_url(remote_store):
    with RangeHTTPServer(remote_store.parent) as http:
        message, _ = _fails(f"{http.url}/nothing.zarr", zarrdali.StoreNotFoundError)
    assert "not a Zarr group" in message and "zarr.json" in message


@pytest.mark.time_limit(60)
def test_an_array_url_is_not_a_group(remote_store):
    with RangeHTTPServer(remote_store.parent) as http:
        message, _ = _fails(f"{http.url}/{remote_store.name}/sharded", zarrdali.StoreNotFoundError)
    assert "is a Zarr array, not a group" in message


@pytest.mark.time_limit(60)
def test_a_server_error_that_persists(remote_store):
    """A store answering 503 to everything: retried until request_timeout, then
    named with the cause."""
    with RangeHTTPServer(remote_store.parent) as http:
        http.faults.status["/"] = 503
        url = f"{http.url}/{remote_store.name}"
        t0 = time.perf_counter()
        with pytest.raises(zarrdali.StoreUnavailableError) as info:
            zarrdali.ZarrLoader(url, ["sharded"], request_timeout=1.5, **KW)
        took = time.perf_counter() - t0
    message = str(info.value)
    assert url in message and "HTTP 503" in message and "no answer within 1.5 s" in message
    assert took < 2.5


@pytest.mark.time_limit(60)
def test_a_zarr_v2_store_is_named_as_such(tmp_path):
    """Only a store that is Zarr v2 gets an answer about Zarr v2."""
    import zarr

    root = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    array = root.create_array("sharded", shape=(6, 8, 8), chunks=(1, 8, 8), dtype="f4")
    array[...] = np.ones((6, 8, 8), "f4")
    url_error = pytest.raises(zarrdali.MetadataError, match="Zarr format 2")
    with RangeHTTPServer(tmp_path) as http, url_error as info:
        zarrdali.ZarrLoader(f"{http.url}/v2.zarr", ["sharded"], request_timeout=5, **KW)
    assert "zarrdali prepare" in str(info.value)
