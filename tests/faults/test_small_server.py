"""A small server: it takes 4 connections at a time and resets the rest, as a
static-file server at its connection limit does (HTTP/1.0: a connection per
request). With a fixed 64 requests in flight most requests are refused and
retried (a queue of 5 that overflows costs seconds per dropped connect instead,
see ``benchmarks/in_flight_bench.py``); the adaptive limit backs off to what
the server sustains (the share of reset connections grows with it), with exact
batches and no tuning.
"""

from __future__ import annotations

import pytest
from faultkit import check_batches

import zarrdali
from zarrdali.bench.objectserver import RangeHTTPServer

pytest.importorskip("obstore")

KW = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=16, device="cpu", workers=0)


def _epoch(store, fixed: int | None = None) -> tuple[dict, int]:
    variables = ["sharded", "plain"]
    with RangeHTTPServer(store.parent) as http:
        http.faults.max_connections = 4
        http.faults.delay_s = 0.02  # requests overlap, as on a busy server
        with zarrdali.ZarrLoader(f"{http.url}/{store.name}", variables, **KW) as loader:
            if fixed is not None:  # the loader before the limit adapted
                from zarrdali.io.flow import AdaptiveLimit

                loader.backend.source.limit = AdaptiveLimit(fixed, adaptive=False)
            check_batches(loader, store, variables)
            return loader.backend.stats(), http.faults.refused


@pytest.mark.time_limit(120)
def test_requests_in_flight_adapt_to_a_small_server(remote_store):
    stats, refused = _epoch(remote_store)
    _, fixed_refused = _epoch(remote_store, fixed=64)
    assert stats["in_flight_decreases"] >= 1 and stats["in_flight_limit"] <= 8
    assert stats["transient_errors"] == refused, "every reset connection counted"
    assert stats["retries"] >= refused, "... and retried"
    assert fixed_refused > 4 * max(refused, 1), (refused, fixed_refused)
    # Resets count as load where their share grows with the limit (issue 28: a
    # flaky proxy's random resets must not halve it), so the limit settles at the
    # server's 4 connections and keeps the few resets of connections overlapping
    # there (about 1 request in 10; 1 in 5 seen with the machine loaded), retried at
    # once, instead of halving below it.
    assert refused <= stats["requests"] // 4, (refused, stats["requests"])
