"""Flow control of a remote source's requests: how many are in flight, when one
has stalled, how long one may take in all.

* :class:`AdaptiveLimit`: the number of requests in flight adapts to what the
  store sustains. It starts at a few and, round by round (a round: as many
  requests as the limit, sent and answered at that limit while it held others
  back), doubles while the median latency stays flat (slow start; up to 32 in
  flight whatever the latency, unless throughput falls), then grows
  by a quarter while throughput grows (Little's law: the limit over the median
  latency, times the share of requests answered), up to ``max_in_flight``.
  Signs of load halve it at once: a throttling answer (429, 503 SlowDown), a
  stalled request, or an answer far slower than usual (a connection dropped by a
  full listen queue waits a second for TCP to try again), whenever the request
  was sent since the last decrease (such an answer comes back seconds later,
  when the limit may have grown twice since; a burst of them halves it once);
  the limit where that happened is tried again only after a while, longer
  each time. Errors that
  may or may not come from load (a plain 5xx, a connection reset or refused)
  count as load only where their share grows with the limit: a round whose
  share of failed requests is significantly above the share measured at the
  lower limit it grew from goes back there (a server at its connection limit),
  while a store that fails a fixed share of requests whatever the load (a busy
  proxy, a flaky link) keeps its limit and the requests are retried at once. A
  small server that drops connections past a queue of 5 then sees a few
  requests at a time; a store whose latency does not grow with load (S3) sees
  ``max_in_flight``, whatever share of its answers fail at random.
* :class:`LatencyBound`: what the store usually takes, from the last
  completed requests: a request not answered within ``stall_factor`` times
  their median (scaled by its size against theirs, between ``min_stall_s``
  and ``max_stall_s``; until 8 requests have completed, 16 times the median
  of the metadata reads, at most ``first_stall_s``) has stalled: it is
  cancelled (which closes its connection), abandoned (never awaited) and sent
  again at once, with its own bound doubled. One hung connection costs about
  ``min_stall_s`` on a store that answers in milliseconds. An answer
  ``slow_factor`` times slower than the median (and at least ``min_slow_s``)
  counts as congestion.
* :class:`RequestPolicy`: the knobs, and ``timeout_s``: the most one request
  may take, its retries (transient errors, with exponential backoff and jitter)
  and re-sends after stalls included. Past it the batch fails with a
  ``ChunkError`` naming the chunk; a store that stays down fails a batch
  within about ``timeout_s``.

Everything here runs on the event loop's thread (zarr-python's loop serves all
of a source's requests), so no lock is needed.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestPolicy:
    """Timeouts and retries of a remote source (seconds)."""

    timeout_s: float = 60.0  # one request, all its attempts: then the batch fails
    min_stall_s: float = 2.0  # a request is never called stalled before this
    max_stall_s: float = 30.0  # ... and always once this has passed
    first_stall_s: float = 5.0  # the bound before any request has told the usual latency
    stall_factor: float = 16.0  # times the usual latency (the median)
    slow_factor: float = 8.0  # an answer this many times slower than usual: congestion
    min_slow_s: float = 0.5  # ... if it took at least this long
    backoff_s: float = 0.1  # first retry delay after a transient error, doubling
    max_backoff_s: float = 5.0
    initial_in_flight: int = 4

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"the request timeout must be positive, got {self.timeout_s} s")
        if not 0 < self.min_stall_s <= self.max_stall_s:
            raise ValueError(
                f"need 0 < min_stall_s <= max_stall_s, got {self.min_stall_s}, {self.max_stall_s}"
            )


class LatencyBound:
    """What the store usually takes, from the durations and sizes of the last
    ``window`` completed data requests (chunks, shard indexes): when a request
    counts as slow (a sign of congestion) and when as stalled (cancelled and
    sent again). Metadata reads (small documents, :meth:`record_first`) tell
    only the stall bound until 8 data requests are known, unscaled by size (a
    document's size says nothing of a chunk's)."""

    known_after = 8  # data requests completed before their median is trusted
    first_after = 3  # metadata reads that set the stall bound until then

    def __init__(self, policy: RequestPolicy, window: int = 256) -> None:
        self.policy = policy
        self._seconds: collections.deque[float] = collections.deque(maxlen=window)
        self._nbytes: collections.deque[int] = collections.deque(maxlen=window)
        self._first: collections.deque[float] = collections.deque(maxlen=16)
        self._usual: tuple[float, float] | None = None  # (median seconds, median bytes)

    def record(self, seconds: float, nbytes: int) -> None:
        self._seconds.append(seconds)
        self._nbytes.append(max(1, nbytes))
        self._usual = None

    def record_first(self, seconds: float) -> None:
        """A metadata read took ``seconds``: a first idea of the store's round trip."""
        self._first.append(seconds)

    def _scaled_usual(self, nbytes: int) -> float | None:
        """The usual latency, scaled by the request's size against the usual size."""
        if len(self._seconds) < self.known_after:
            return None
        if self._usual is None:
            self._usual = (float(np.median(self._seconds)), float(np.median(self._nbytes)))
        seconds, typical = self._usual
        return seconds * max(1.0, nbytes / typical)

    def bound(self, nbytes: int) -> float:
        """Seconds after which a request of ``nbytes`` has stalled."""
        p = self.policy
        usual = self._scaled_usual(nbytes)
        if usual is None:  # not known yet: from the metadata reads, if enough were made
            if len(self._first) < self.first_after:
                return p.first_stall_s
            first = p.stall_factor * float(np.median(self._first))
            return min(p.first_stall_s, max(p.min_stall_s, first))
        return min(p.max_stall_s, max(p.min_stall_s, p.stall_factor * usual))

    def slow(self, seconds: float, nbytes: int) -> bool:
        """Whether a request that took ``seconds`` was far slower than usual (a
        dropped connection retransmitted, a queue at the server)."""
        p = self.policy
        usual = self._scaled_usual(nbytes)
        return usual is not None and seconds > max(p.min_slow_s, p.slow_factor * usual)


class AdaptiveLimit:
    """Requests in flight, limited by a window between 1 and ``max_limit`` that
    grows while throughput grows and halves on congestion (see the module's
    text). :meth:`acquire` waits for room (first come, first served) and returns
    a token for :meth:`release`.

    Throughput at a limit ``L`` is measured by Little's law, ``L`` over the
    median latency of a round of ``L`` requests sent and answered (or failed) at
    that limit while it held requests back, times the share answered (medians:
    one slow answer does not sway it). The limit doubles (slow start, until the
    median latency grows by ``queueing``: requests queue at the server), then
    grows by a quarter (at least one) while throughput grows by at least
    ``gain`` of that (growing by 25% must gain 12.5%, measured on at least
    ``min_round`` requests). Where it does not pay it stays; where throughput
    fell (below ``worse``), the share of failed requests grew significantly
    (``errors_grew``) or it congested it goes back (congestion: halves); either
    way it tries to grow past that limit again only after ``probe_rounds``
    rounds, twice as many after each congestion or try that fails again (up to
    ``max_probe_rounds``; a try that pays starts afresh): a try that costs a
    dropped connection (a second) is not repeated every few batches. A first
    round with many failures and no other limit to compare with steps down
    once to tell whether they come from load. ``adaptive=False``: always
    ``max_limit``.
    """

    gain = 0.5  # of the growth in limit, what throughput must gain for growth to pay
    worse = 0.8  # throughput this much lower: more in flight hurt, go back
    min_round = 16  # requests (at least) a measurement is the median of
    queueing = 1.25  # slow start ends where the median latency grows this much
    # ... but not below this many in flight (doubling stops there only where
    # throughput fell or signs of load came): latency that grows with a few requests
    # in flight comes as often from CPU as from a queue more requests would only
    # lengthen: a Python server's threads taking turns at its GIL, a client decoding
    # on every core. Against a local S3 server (benchmarks/remote_bench.py) the old
    # rule stopped at 8: 0.94 and 0.81 of a plain client's bytes/s at 5 and 20 ms per
    # request; 32: 0.90-1.03 and 0.93-0.98 (benchmarks/results/remote-cpu-2core).
    # A store that cannot take 32 says so by signs of load (dropped connections,
    # throttling, errors that grow with the limit): those halve it as before.
    slow_start_floor = 32
    probe_rounds = 64
    max_probe_rounds = 1024
    noisy = 0.1  # a failure share above this, with nothing to compare: step down to tell
    sure = 3.5  # standard errors: failures at a limit held that grew with it

    def __init__(self, max_limit: int, initial: int = 4, *, adaptive: bool = True) -> None:
        if max_limit < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_limit}")
        self.max_limit = max_limit
        self.adaptive = adaptive
        self.limit = min(max_limit, max(1, initial)) if adaptive else max_limit
        self.slow_start = True
        self.in_flight = 0
        self.peak = 0
        self.decreases = 0
        self._round = 0  # bumped by each change of the limit
        self._decreased_at = 0  # the round the last decrease started
        self._latencies: list[float] = []  # of this round
        self._failed = 0  # requests of this round that failed (errors not known to be load)
        self._fresh = False  # this round is the first at a limit it grew to
        self._rate: dict[int, float] = {}  # limit -> requests/s there
        self._failures: dict[int, list[int]] = {}  # limit -> [failed, requests] there
        self._latency: dict[int, float] = {}  # limit -> median latency there
        self._came_from: int | None = None  # the limit it grew from (None: fell to it)
        self._ceiling: int | None = None  # a limit where growing did not pay, or congested
        self._held = 0  # rounds held below the ceiling
        self._patience = self.probe_rounds  # rounds to hold before trying the ceiling
        self._probing = False  # at a ceiling tried again
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def current(self) -> int:
        return self.limit

    async def acquire(self) -> int:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # _wake counted this request in flight
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # given room: pass it on
                    self.in_flight -= 1
                    self._wake()
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        self.peak = max(self.peak, self.in_flight)
        return self._round

    def release(self, token: int, outcome: str, seconds: float = 0.0) -> None:
        """``outcome``: ``"ok"`` (answered in ``seconds``), ``"congested"`` (a
        throttling answer, a stall or an answer far slower than usual),
        ``"failed"`` (an error that may or may not come from load: a plain 5xx,
        a connection reset or refused) or ``"other"`` (an answer that says
        nothing about load)."""
        busy = self.in_flight + len(self._waiters) >= self.limit
        self.in_flight -= 1
        if self.adaptive and outcome == "congested":
            # Sent since the last decrease (a slow answer comes back seconds after
            # it was sent, when the limit may have grown since): halve. Sent
            # before it: that burst was answered already.
            if token >= self._decreased_at:
                self._congested()
        elif self.adaptive and token == self._round and busy and outcome in ("ok", "failed"):
            # Sent under the current limit while it held others back: a measurement.
            if outcome == "ok":
                self._latencies.append(seconds)
            else:
                self._failed += 1
            if len(self._latencies) + self._failed >= self._round_size():
                self._end_round()
        self._wake()

    def _round_size(self) -> int:
        """Requests a round is measured on: twice as many in the first round at a
        limit it grew to, once requests have failed (telling whether failures grew
        with the limit needs them)."""
        size = max(self.min_round, self.limit)
        return 2 * size if self._fresh and self._failures_seen() else size

    def _failures_seen(self) -> bool:
        return any(failed for failed, _ in self._failures.values())

    def _congested(self) -> None:
        """A sign of load: halve (measured throughput no longer holds; failure
        shares say how the store fails, not how loaded it was: they stay)."""
        self.decreases += 1
        self.slow_start = False
        self._rate.clear()
        self._latency.clear()
        self._stop_at(self.limit, congested=True)
        self._set(max(1, self.limit // 2), came_from=None)
        self._decreased_at = self._round

    @staticmethod
    def errors_grew(here: tuple[int, int], below: tuple[int, int], z: float = 2.5) -> bool:
        """Whether the failure share ``failed / requests`` measured ``here`` is
        significantly above the one measured ``below`` (a one-sided two-proportion
        test at ``z`` standard errors, and at least 5 points apart): failures that
        grow with the load, not a fixed share of requests that fail whatever it."""
        (f1, n1), (f0, n0) = here, below
        p1, p0 = f1 / max(1, n1), f0 / max(1, n0)
        pooled = (f1 + f0) / max(1, n1 + n0)
        se = (pooled * (1 - pooled) * (1 / max(1, n1) + 1 / max(1, n0))) ** 0.5
        return p1 - p0 > max(0.05, z * se)

    def _failures_grew(self, failed: int, n: int, fresh: bool) -> bool:
        """Record this round's failures; go back where they grew with the limit:
        this round against the limits below (just after growing, at 2.5 standard
        errors), or everything measured at this limit (each round, at 3.5: a limit
        fallen to still fails more than the ones below). True: the limit went back."""
        lower = [k for k in self._failures if k < self.limit]
        below = tuple(map(sum, zip(*(self._failures[k] for k in lower), strict=True)))
        here = self._failures.setdefault(self.limit, [0, 0])
        here[0], here[1] = here[0] + failed, here[1] + n
        if here[1] > 1024:  # a long memory, not a stale one
            here[0], here[1] = here[0] // 2, here[1] // 2
        if not lower:
            return False
        if fresh and self._came_from is not None and self.errors_grew((failed, n), below):
            back = self._came_from  # failures grew as it grew: back
        elif self.errors_grew((here[0], here[1]), below, z=self.sure):
            back = max(lower)  # a limit that fails more than the ones below: down
        else:
            return False
        self.decreases += 1
        self.slow_start = False
        self._stop_at(self.limit, congested=True)
        self._set(back, came_from=None)
        self._decreased_at = self._round
        return True

    def _end_round(self) -> None:
        """A round of requests at this limit is in: grow, hold, or go back."""
        failed, n = self._failed, len(self._latencies) + self._failed
        fresh, self._fresh = self._fresh, False
        if not self._latencies:  # nothing answered in a whole round: the store is down
            self._latencies, self._failed = [], 0
            self._congested()
            return
        latency = max(1e-6, float(np.median(self._latencies)))
        self._latencies, self._failed = [], 0
        rate = self.limit / latency  # Little's law (failures in it are judged apart)
        if self._failures_grew(failed, n, fresh):
            return
        before = None if self._came_from is None else self._rate.get(self._came_from)
        floor = self.slow_start and self.limit < self.slow_start_floor
        if self.slow_start and not floor and self._came_from in self._latency:
            # Latency rising: requests queue at the server; grow gently from here
            # (doubling into a server's cliff costs dropped connections).
            self.slow_start = latency < self.queueing * self._latency[self._came_from]
        self._rate[self.limit], self._latency[self.limit] = rate, latency
        step = 2 * self.limit if self.slow_start else self.limit + max(1, self.limit // 4)
        if before is not None:
            grew = self.limit / self._came_from - 1
            if rate < self.worse * before:
                # More in flight hurt: back to where it came from; try again later.
                self.slow_start = False
                self._stop_at(self.limit)
                self._set(self._came_from, came_from=None)
                return
            if rate < (1 + self.gain * grew) * before and not floor:
                # It did not pay (or too little to tell): stay, grow again later.
                self.slow_start = False
                self._stop_at(self.limit + max(1, self.limit // 4))
                self._came_from = None
                return
        elif failed > self.noisy * n and self.limit > 1 and len(self._failures) == 1:
            # Many failures and no other limit to compare with: one step down tells
            # whether they come from load (growing back compares the two).
            self._set(max(1, self.limit // 2), came_from=None)
            return
        if self._probing:  # the ceiling tried again paid: patience starts afresh
            self._probing, self._patience = False, self.probe_rounds
        if self._ceiling is not None and step >= self._ceiling:
            if self._held < self._patience:
                self._held += 1
                return
            step, self._ceiling, self._probing = self._ceiling, None, True
        if self.limit < self.max_limit:
            self._set(min(self.max_limit, step), came_from=self.limit)

    def _stop_at(self, ceiling: int, congested: bool = False) -> None:
        """Growing to ``ceiling`` did not pay, or congested: hold below it for a
        while (twice as long after each congestion or failed try)."""
        if self._probing or congested:
            self._patience = min(self.max_probe_rounds, 2 * self._patience)
        self._probing = False
        self._ceiling, self._held = ceiling, 0

    def _set(self, limit: int, came_from: int | None) -> None:
        self.limit = limit
        self._came_from = came_from
        self._fresh = came_from is not None and limit > came_from
        self._round += 1
        self._latencies, self._failed = [], 0

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # (a cancelled waiter is done)
                self.in_flight += 1
                waiter.set_result(None)
