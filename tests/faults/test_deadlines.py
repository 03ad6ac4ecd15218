"""Deadlines: every request of a loader, metadata included, is answered within
``request_timeout`` or fails with a named error; a stalled one is abandoned and
sent again within seconds, shard indexes as chunks; nothing a loader waits on
keeps the interpreter from exiting.

Servers: ``SilentServer`` (accepts, never answers) and ``RangeHTTPServer`` with
requests that hang (``zarrdali.bench.objectserver``).
"""

from __future__ import annotations

import time

import pytest
from faultkit import check_batches

import zarrdali
from zarrdali.bench.objectserver import RangeHTTPServer, SilentServer
from zarrdali.io.flow import RequestPolicy

pytest.importorskip("obstore")

KW = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=4, device="cpu", workers=0)


@pytest.mark.time_limit(60)
@pytest.mark.parametrize("timeout", [1.0, 3.0])
def test_the_constructor_fails_within_request_timeout(timeout):
    """An endpoint that accepts connections and never answers: the constructor
    raises within ``request_timeout`` plus a second (it used to wait about two
    minutes whatever request_timeout said, through the storage client's retries,
    then raise obstore's GenericError), naming the store and what did not answer."""
    with SilentServer() as silent:
        url = f"{silent.url}/store.zarr"
        t0 = time.perf_counter()
        with pytest.raises(zarrdali.StoreUnavailableError) as info:
            zarrdali.ZarrLoader(url, ["sharded"], request_timeout=timeout, **KW)
        took = time.perf_counter() - t0
        assert silent.connections >= 1
    assert took < timeout + 1.0, took
    message = str(info.value)
    assert f"no answer within {timeout:g} s" in message and "request_timeout" in message
    assert url in message and "'zarr.json'" in message, message
    assert info.value.store == url


@pytest.mark.time_limit(90)
def test_a_hung_shard_index_read_is_sent_again_within_seconds(remote_store):
    """The first two requests for two shards are never answered: the constructor's
    first index read (the stall bound is known from the metadata reads by then)
    and one during the epoch. Each costs the bound and twice it (2 + 4 s) instead
    of waiting for the connection to close (minutes); batches are exact."""
    with RangeHTTPServer(remote_store.parent) as http:
        url = f"{http.url}/{remote_store.name}"
        zarrdali.ZarrLoader(url, ["sharded"], **KW).close()  # imports: not part of it
        http.faults.hang.update({"/sharded/c/0/0/0": 2, "/sharded/c/2/1/1": 2})
        t0 = time.perf_counter()
        with zarrdali.ZarrLoader(url, ["sharded"], **KW) as ld:
            built = time.perf_counter() - t0
            assert ld.backend.stats()["timeouts"] == 2
            check_batches(ld, remote_store, ["sharded"])
            stats = ld.backend.stats()
        epoch = time.perf_counter() - t0 - built
    assert http.faults.hang == {"/sharded/c/0/0/0": 0, "/sharded/c/2/1/1": 0}
    assert stats["timeouts"] == 4 and stats["stall_bound_ms"] == 1000 * RequestPolicy().min_stall_s
    assert built < 10 and epoch < 20, (built, epoch)


@pytest.mark.time_limit(120)
def test_a_process_waiting_on_a_hung_request_exits(remote_store, python_child):
    """A loader's threads wait on requests that are never answered (request_timeout
    60 s) when the program ends: the process exits at once. Interpreter shutdown
    joins pool threads; they used to wait for the request (and the next queued
    batch's) before the process could end."""
    with RangeHTTPServer(remote_store.parent) as http:
        http.faults.hang["/plain/c/"] = 10**6  # every chunk request of 'plain' hangs
        code = f"""
import threading, time
import zarrdali
loader = zarrdali.ZarrLoader(
    "{http.url}/{remote_store.name}", ["plain"], input_steps=2, target_steps=1,
    tile=(8, 8), batch_size=4, device="cpu", workers=0, request_timeout=60,
)
threading.Thread(target=next, args=(iter(loader),), daemon=True).start()
time.sleep(1.5)  # the batch's requests are in flight
print("leaving", time.time(), flush=True)
"""
        child = python_child(code, timeout=100)
        ended = time.time()
        hung = [path for path, _ in http.requests if "/plain/c/" in path]
    assert child.returncode == 0, child.stderr[-3000:]
    leaving = float(child.stdout.split("leaving", 1)[1].split()[0])
    assert hung, "the batch's requests were made"
    assert ended - leaving < 10, f"exit took {ended - leaving:.1f} s"
