"""Flow control of a remote source's requests: how many are in flight, when one
has stalled, how long one may take in all.

* :class:`AdaptiveLimit`: the number of requests in flight adapts to what the
  store sustains, as TCP's congestion window does (AIMD): it starts at a few,
  grows by one per completed request while below its threshold (slow start:
  doubling per round trip), then by one per round trip, up to
  ``max_in_flight``; a connection error, a throttling answer (429, 503) or a
  stalled request halves it (once per round: the requests already in flight
  were sent under the old limit). It grows only while the limit is what holds
  requests back, so a batch that needs few requests does not inflate it. A
  small server that drops connections past a queue of 5 then sees a few
  requests at a time; S3 sees ``max_in_flight``.
* :class:`LatencyBound`: what the store usually takes, from the last
  completed requests: a request not answered within ``stall_factor`` times
  their 95th percentile (scaled by its size against theirs, between
  ``min_stall_s`` and ``max_stall_s``; ``first_stall_s`` until 8 requests
  have completed) has stalled: it is cancelled (which
  closes its connection) and sent again at once, with its own bound doubled.
  One hung connection costs about ``min_stall_s`` on a store that answers in
  milliseconds.
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
    first_stall_s: float = 5.0  # the bound before 8 requests have told the usual latency
    stall_factor: float = 8.0  # times the usual latency (95th percentile)
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
    """How long a request may take before it counts as stalled, from the
    durations and sizes of the last ``window`` completed requests."""

    def __init__(self, policy: RequestPolicy, window: int = 256) -> None:
        self.policy = policy
        self._seconds: collections.deque[float] = collections.deque(maxlen=window)
        self._nbytes: collections.deque[int] = collections.deque(maxlen=window)
        self._cached: tuple[float, float] | None = None  # (p95 seconds, median bytes)

    def record(self, seconds: float, nbytes: int) -> None:
        self._seconds.append(seconds)
        self._nbytes.append(max(1, nbytes))
        self._cached = None

    def bound(self, nbytes: int) -> float:
        p = self.policy
        if len(self._seconds) < 8:  # not known yet
            return p.first_stall_s
        if self._cached is None:
            self._cached = (
                float(np.percentile(self._seconds, 95)),
                float(np.median(self._nbytes)),
            )
        p95, typical = self._cached
        scale = max(1.0, nbytes / typical)
        return min(p.max_stall_s, max(p.min_stall_s, p.stall_factor * p95 * scale))


class AdaptiveLimit:
    """Requests in flight, limited by an AIMD window between 1 and ``max_limit``
    (see the module's text). :meth:`acquire` waits for room (first come, first
    served) and returns a token for :meth:`release`."""

    def __init__(self, max_limit: int, initial: int = 4) -> None:
        if max_limit < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_limit}")
        self.max_limit = max_limit
        self.limit = float(min(max_limit, max(1, initial)))
        self.threshold = float(max_limit)  # slow start below it
        self.in_flight = 0
        self.peak = 0
        self.decreases = 0
        self._round = 0  # bumped by each decrease
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    async def acquire(self) -> int:
        if self.in_flight < self.current and not self._waiters:
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

    def release(self, token: int, outcome: str) -> None:
        """``outcome``: ``"ok"`` (answered), ``"congested"`` (connection error,
        throttling, stall) or ``"other"`` (an answer that says nothing about load)."""
        busy = self.in_flight + len(self._waiters) >= self.current
        self.in_flight -= 1
        if outcome == "ok" and busy:  # grow only while the limit holds requests back
            step = 1.0 if self.limit < self.threshold else 1.0 / self.limit
            self.limit = min(float(self.max_limit), self.limit + step)
        elif outcome == "congested" and token == self._round:
            self.threshold = max(1.0, self.limit / 2)
            self.limit = self.threshold
            self._round += 1
            self.decreases += 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.current:
            waiter = self._waiters.popleft()
            if not waiter.done():  # (a cancelled waiter is done)
                self.in_flight += 1
                waiter.set_result(None)
