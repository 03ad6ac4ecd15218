"""Run batch loading ahead of the consumer in background threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BatchPrefetcher:
    """``get(k)`` returns ``load(k)``, having started ``load(k+1 .. k+depth)`` already.

    Batches are requested in order (DALI asks for iteration 0, 1, 2, ...).
    An exception raised while loading batch k is raised again by ``get(k)``
    with its original traceback.
    """

    def __init__(
        self, load: Callable[[int], Any], n_batches: int, depth: int = 2, workers: int = 2
    ) -> None:
        self._load = load
        self._n = n_batches
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="zarrdali-prefetch")
        self._futures: dict[int, Future] = {}
        self._next = 0  # next batch index not yet submitted
        self._lock = threading.Lock()
        self._closed = False

    def _submit_until(self, k: int) -> None:
        while self._next < min(k, self._n):
            self._futures[self._next] = self._pool.submit(self._load, self._next)
            self._next += 1

    def get(self, k: int) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("prefetcher is closed")
            if k not in self._futures:  # out of order (DALI asks in order): load it now
                self._futures[k] = self._pool.submit(self._load, k)
                self._next = max(self._next, k + 1)
            self._submit_until(k + 1 + self._depth)
            future = self._futures.pop(k)
        try:
            return future.result()
        finally:
            # A load's error holds this frame in its traceback and the future
            # holds the error: without this, the two form a reference cycle
            # (keeping this prefetcher alive) that only the collector breaks.
            future = None

    def close(self) -> None:
        """Cancel the loads not started, wait for the running ones, join the
        threads and drop the loaded batches not asked for. Idempotent."""
        with self._lock:
            self._closed = True
            futures, self._futures = self._futures, {}
        for f in futures.values():
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        futures.clear()  # batches loaded ahead, released once no thread runs
        self._load = None
