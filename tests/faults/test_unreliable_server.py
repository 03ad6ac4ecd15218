"""An HTTP store that misbehaves: a request never answered, a store that goes down,
503s the client would retry silently, a server that ignores ``Range``.

Wanted: exact batches or a ``ChunkError`` naming the chunk, in bounded time;
every retry and stalled request counted in ``loader.backend.stats()``.
Servers run on 127.0.0.1 (``zarrdali.bench.objectserver.RangeHTTPServer``).
"""

from __future__ import annotations

import warnings

import pytest
from faultkit import check_batches

import zarrdali
from zarrdali.bench.objectserver import RangeHTTPServer

pytest.importorskip("obstore")

KW = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=4, device="cpu", workers=0)


def _loader(http, store, variables=("sharded",), **kw):
    return zarrdali.ZarrLoader(f"{http.url}/{store.name}", list(variables), **{**KW, **kw})


@pytest.mark.time_limit(120)
def test_a_hung_connection_costs_seconds_not_minutes(remote_store):
    """One request never answered: it is cancelled after a bound derived from what
    the store usually takes (a few seconds here: requests take milliseconds) and
    sent again; the epoch is exact. (The client used to wait 30 s per attempt, for
    two retry windows of 120 s: this test's time limit would end it.)"""
    with RangeHTTPServer(remote_store.parent) as http, _loader(http, remote_store) as loader:
        check_batches(loader, remote_store, ["sharded"])  # the usual latency, learnt
        bound_s = loader.backend.stats()["stall_bound_ms"] / 1000
        http.faults.hang["/sharded/c/1/"] = 1  # the next request of that shard hangs
        check_batches(loader, remote_store, ["sharded"])
        stats = loader.backend.stats()
    assert http.faults.hang["/sharded/c/1/"] == 0, "the hung request was made"
    assert stats["timeouts"] == 1 and stats["retries"] >= 1
    from zarrdali.io.flow import RequestPolicy

    assert bound_s == RequestPolicy().min_stall_s, "a bound of a few seconds, not 30"


@pytest.mark.time_limit(120)
def test_a_store_that_stays_down_fails_the_batch_within_request_timeout(remote_store):
    with (
        RangeHTTPServer(remote_store.parent) as http,
        _loader(http, remote_store, request_timeout=3.0) as loader,
    ):
        plan = loader.epoch_plan(0)
        http.faults.hang["/sharded/c/"] = 10**6  # every chunk request hangs from now on
        with pytest.raises(zarrdali.ChunkError, match=r"no answer within 3 s") as info:
            loader.load_batch(plan.batch(len(plan) - 1))
    assert info.value.array == "sharded" and info.value.key.startswith("c/")
    assert "request_timeout" in str(info.value)


@pytest.mark.time_limit(120)
def test_retries_are_counted(remote_store):
    """The server answers 503 to the first 7 chunk requests: all retried, all counted."""
    with (
        RangeHTTPServer(remote_store.parent) as http,
        _loader(http, remote_store, variables=("sharded", "plain")) as loader,
    ):
        http.faults.fail["/c/"] = 7
        check_batches(loader, remote_store, ["sharded", "plain"])
        stats = loader.backend.stats()
    assert http.faults.fail["/c/"] == 0
    assert stats["retries"] == 7 and stats["transient_errors"] == 7


@pytest.mark.time_limit(120)
@pytest.mark.parametrize("cached", [False, True])
def test_a_server_that_ignores_range_is_read_whole(remote_store, tmp_path, cached):
    """200 with the whole object for every range request: served exactly, each shard
    fetched once, one warning."""
    options = {"cache_dir": tmp_path / "cache"} if cached else {}
    variables = ["sharded", "plain"]
    with RangeHTTPServer(remote_store.parent) as http:
        http.faults.ignore_range = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _loader(http, remote_store, variables=variables, **options) as ld:
                check_batches(ld, remote_store, variables)
                stats = ld.backend.stats()
        gets = [path for path, _ in http.requests if "/sharded/c/" in path]
        ignored = [w for w in caught if "does not serve byte ranges" in str(w.message)]
        assert len(ignored) == 1, [str(w.message) for w in caught]
        assert stats["ranges_ignored"] == 1
        # Each shard: the refused range request, then the whole object once.
        assert all(gets.count(path) <= 2 for path in gets), sorted(gets)
        if cached:  # a second run reads no chunk from the server
            http.requests.clear()
            with _loader(http, remote_store, variables=variables, **options) as ld:
                check_batches(ld, remote_store, variables)
            assert not [p for p, _ in http.requests if "/c/" in p]
