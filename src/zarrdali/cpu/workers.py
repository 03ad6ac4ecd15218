"""Worker processes of the CPU path: parts of batches decoded into shared memory.

Part of the per-chunk work holds Python's GIL, so the CPU path reads and
decodes in processes. Each worker maps the loader's ring of batch slots
(:class:`~zarrdali.cpu.ring.BatchRing`, a ``memfd`` passed to it at spawn)
and loads the *parts* (ranges of samples) of batches it is sent straight
into their place in a slot: decoded, cast, normalized, augmented. Nothing is
copied on the way back; a part's completion is one small message.

The pool is owned by its loader and kept from epoch to epoch (torch's
``persistent_workers``): an epoch is a message to every worker (its number,
first batch and how batches are finished; each worker keeps its open store
and backend and rebuilds only the plan), and the end of an epoch (exhausted,
broken off, failed) abandons the parts still queued and waits for the parts in
hand (:meth:`WorkerPool.end_epoch`), so the ring's slots are free again. The
pool is ended explicitly (:meth:`WorkerPool.close`).

The training process never blocks on a worker without watching it: it waits
on the workers' result pipes and their process sentinels together, so a worker
that dies (killed by the out-of-memory killer, a crash) is reported at once as
a :class:`~zarrdali.errors.WorkerDiedError` naming it and how it died (the
pool is ended; the next epoch starts a new one). A worker whose training
process dies sees its task pipe close and exits. Workers ignore SIGINT:
Ctrl-C is the training process's to handle.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from zarrdali.cpu.ring import BatchRing, SlotLayout, SlotViews, map_shared
from zarrdali.errors import LoaderClosedError, WorkerDiedError, ZarrDaliError

log = logging.getLogger(__name__)

# How long close() lets workers finish their part before ending them.
_GRACE_S = 1.0
# How often a waiting training process looks at the workers' sentinels anyway.
_POLL_S = 1.0
# How long the end of an epoch waits for the parts the workers have in hand
# before it ends them instead (a part stuck on a stalled store).
_DRAIN_S = 10.0

_SPAWN_HINT = (
    "Worker processes are spawned and re-import your main module: put the training "
    "code under `if __name__ == '__main__':`, or pass workers=0 to read in this process."
)


class RemoteTraceback(Exception):
    """The traceback of an error raised in a worker process (the error's cause)."""

    def __str__(self) -> str:
        return f"\n\n(in the worker process)\n{self.args[0]}"


class _SharedFd:
    """A descriptor that a spawned process receives as its own copy (an ``int``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        # Only while a process is being spawned: the descriptor is passed to it.
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup: Any) -> int:
    return dup.detach()


@dataclass(frozen=True)
class WorkerJob:
    """What each worker gets when it starts: a reader (it opens the store and a
    backend once; each epoch's message rebuilds its plan) and the ring's layout."""

    reader: Any  # an EpochReader: begin(**epoch), load_part(k, rows or None, outs), close()
    layout: SlotLayout
    n_slots: int


def _portable(err: BaseException) -> tuple[BaseException, str]:
    """``err`` as it can travel to the training process, with its traceback text."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        pickle.loads(pickle.dumps(err))
        portable: BaseException = err
    except Exception:  # an error that does not pickle: its type and message
        portable = ZarrDaliError(f"{type(err).__qualname__}: {err}")
    portable.__traceback__ = None
    portable.__cause__ = portable.__context__ = None
    return portable, text


def _worker_main(
    index: int, job: WorkerJob, fd: int, tasks: Connection, results: Connection, current: Any
):
    """A worker's life: map the ring, say ready, then load the parts of each
    epoch it is told of until told to stop. ``current`` (shared) is the epoch
    now served (0: none): parts of another are answered "skipped" unloaded."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        mm, address = map_shared(fd, job.layout.nbytes * job.n_slots)
    finally:
        os.close(fd)
    views = SlotViews(job.layout, address, job.n_slots)
    reader = job.reader
    frozen = False
    try:
        results.send(("ready",))
        while True:
            try:
                task = tasks.recv()
            except EOFError:  # the training process closed the pool, or died
                return
            if task is None:
                return
            if task[0] == "epoch":
                reader.begin(**task[2])
                continue
            gen, k, slot, n, rows = task
            if gen != current.value:  # its epoch ended: not loaded
                results.send(("skipped", gen, k))
                continue
            try:
                reader.load_part(k, rows, views.arrays(slot, 0, n))
            except Exception as err:
                results.send(("error", gen, k, *_portable(err)))
            else:
                results.send(("done", gen, k))
            if not frozen:  # what setting up made stays: collections skip it
                gc.freeze()
                frozen = True
    except (BrokenPipeError, EOFError):  # the training process is gone
        return
    finally:
        reader.close()
        views = None
        mm.close()


def time_ordered_parts(samples: np.ndarray, parts: int) -> list[np.ndarray]:
    """The rows of ``samples`` (``[B, 3]`` of ``(t0, y0, x0)``) cut into ``parts``
    sets of nearly equal size, each a run of the samples in time order.

    Samples share a chunk only when their windows overlap in time, so parts of
    neighbouring times keep nearly every chunk a batch reads twice or more in
    one part, decoded once, as when the batch is loaded whole.
    """
    order = np.argsort(samples[:, 0], kind="stable")
    parts = max(1, min(parts, len(order)))
    return [part for part in np.array_split(order, parts) if len(part)]


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, as a person reads it."""
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (signal {-exitcode})"
    return f"exited with code {exitcode}"


class WorkerPool:
    """``n_workers`` spawned processes loading parts of batches into ``ring``,
    epoch after epoch.

    :meth:`begin_epoch` tells every worker which epoch to serve and returns the
    epoch's producer for :class:`~zarrdali.cpu.feed.HostFeed` (a
    :class:`PoolEpoch`): ``start(k, slot, n)`` cuts batch ``k`` (its samples:
    ``samples_of(k)``) into ``parts_per_batch`` time-ordered parts
    (:func:`time_ordered_parts`) and sends each to the least loaded worker
    (with one part per batch, the whole batch goes without rows);
    ``wait(k)`` returns once every part is in, re-raises a worker's error with
    its type (its traceback as the cause), and raises :class:`WorkerDiedError`
    as soon as any worker is gone (the pool is then ended: :attr:`closed`).
    """

    def __init__(
        self,
        job: WorkerJob,
        ring: BatchRing,
        n_workers: int,
        *,
        parts_per_batch: int,
        name: str = "zarrdali",
    ) -> None:
        self.name = name
        self._samples_of: Callable[[int], np.ndarray] | None = None
        self.parts_per_batch = max(1, parts_per_batch)
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._tasks: list[Connection] = []
        self._results: list[Connection] = []
        self._ready: list[bool] = []
        self._queued: list[int] = []  # parts sent to each worker and not answered
        self._pending: dict[int, int] = {}  # batch -> parts not done (this epoch)
        self._failed: dict[int, tuple[BaseException, str]] = {}
        self._gen = 0  # epochs begun; parts carry theirs
        self._active = False  # an epoch is being served
        self._closed = False
        ctx = multiprocessing.get_context("spawn")
        self._current = ctx.RawValue("q", 0)  # the epoch served now (0: none), shared
        try:
            for i in range(n_workers):
                task_r, task_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(i, job, _SharedFd(ring.fd), task_r, res_w, self._current),
                    name=f"zarrdali-worker-{i}",
                    daemon=True,
                )
                try:
                    proc.start()
                finally:  # the worker's ends: its copies live in the worker
                    task_r.close()
                    res_w.close()
                self._procs.append(proc)
                self._tasks.append(task_w)
                self._results.append(res_r)
                self._ready.append(False)
                self._queued.append(0)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self._procs]

    @property
    def closed(self) -> bool:
        return self._closed

    # -- epochs ---------------------------------------------------------------
    def begin_epoch(
        self,
        epoch: dict[str, Any],
        samples_of: Callable[[int], np.ndarray],
        *,
        name: str | None = None,
        close_after: bool = False,
    ) -> PoolEpoch:
        """Serve a new epoch: ``epoch`` goes to every worker's reader
        (``EpochReader.begin(**epoch)``). ``close_after``: the pool ends with the
        epoch (``persistent_workers=False``)."""
        if self._closed:
            raise LoaderClosedError(f"{self.name}: the worker processes were ended")
        if self._active:
            self.end_epoch()
        if name is not None:
            self.name = name
        self._gen += 1
        self._pending.clear()
        self._failed.clear()
        self._samples_of = samples_of
        self._current.value = self._gen
        self._active = True
        message = ("epoch", self._gen, epoch)
        for i, conn in enumerate(self._tasks):
            try:
                conn.send(message)
            except (BrokenPipeError, OSError):
                self._poll(0.1)
                raise self._died(i, None) from None
        return PoolEpoch(self, self._gen, close_after)

    def end_epoch(self) -> None:
        """The parts still queued are dropped, the ones in hand finished: once this
        returns no worker writes the ring. A worker that died, or parts that do
        not finish within a few seconds, end the pool instead. Idempotent."""
        if not self._active:
            return
        self._active = False
        self._current.value = 0
        self._samples_of = None
        if self._closed:
            return
        deadline = time.monotonic() + _DRAIN_S
        try:
            while any(self._queued):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "%s: worker processes still busy %.0f s after the epoch ended; "
                        "ending them (new ones start with the next epoch)",
                        self.name,
                        _DRAIN_S,
                    )
                    self.close()
                    return
                self._poll(min(left, _POLL_S))
        except WorkerDiedError:
            self.close()  # the rest of the pool too: the next epoch starts a new one
        except BaseException:  # Ctrl-C while waiting: no worker may write the ring after
            self.close()
            raise
        finally:
            self._pending.clear()
            self._failed.clear()

    # -- producer (through PoolEpoch) ----------------------------------------
    def _start(self, gen: int, k: int, slot: int, n: int) -> None:
        self._check(gen)
        if self.parts_per_batch == 1:  # the whole batch to one worker: no rows to send
            parts: list[np.ndarray | None] = [None]
        else:
            parts = list(time_ordered_parts(self._samples_of(k), self.parts_per_batch))
        self._pending[k] = len(parts)
        for rows in parts:
            i = min(range(len(self._procs)), key=self._queued.__getitem__)
            try:
                self._tasks[i].send((gen, k, slot, n, rows))
            except (BrokenPipeError, OSError):
                self._poll(0.1)
                raise self._died(i, k) from None
            self._queued[i] += 1

    def _wait(self, gen: int, k: int) -> None:
        self._check(gen)
        self._poll(0.0, k)  # a worker that died since is reported even if k is in
        while self._pending.get(k, 0) and k not in self._failed:
            self._poll(_POLL_S, k)
        self._pending.pop(k, None)
        failed = self._failed.pop(k, None)
        if failed is not None:
            err, text = failed
            raise err from RemoteTraceback(text)

    def _check(self, gen: int) -> None:
        if self._closed or gen != self._gen or not self._active:
            raise LoaderClosedError(f"{self.name}: this epoch of the worker processes ended")

    def _poll(self, timeout: float, k: int | None = None) -> None:
        """Take in what the workers sent; raise if one of them is gone."""
        sentinels = {p.sentinel: i for i, p in enumerate(self._procs)}
        results = {id(c): i for i, c in enumerate(self._results)}
        ready = wait([*self._results, *sentinels], timeout)
        dead = []
        for obj in ready:
            if isinstance(obj, Connection):
                i = results[id(obj)]
                try:
                    while obj.poll():
                        self._handle(i, obj.recv())
                except (EOFError, OSError):
                    dead.append(i)
            else:
                dead.append(sentinels[obj])
        if dead:
            raise self._died(dead[0], k)

    def _handle(self, i: int, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            self._ready[i] = True
            return
        gen, k = msg[1], msg[2]
        self._queued[i] -= 1
        if gen != self._gen or not self._active or kind == "skipped":
            return  # a part of an epoch that ended
        if kind == "done":
            self._pending[k] = self._pending.get(k, 1) - 1
        else:  # ("error", gen, k, err, traceback text): the first error of a batch wins
            self._failed.setdefault(k, (msg[3], msg[4]))

    def _died(self, i: int, k: int | None) -> WorkerDiedError:
        proc = self._procs[i]
        proc.join(1.0)  # it is gone or going: its exit code
        what = f"{self.name}: worker process {i} (pid {proc.pid}) {describe_exit(proc.exitcode)}"
        if not self._ready[i]:
            return WorkerDiedError(f"{what} before it started. {_SPAWN_HINT}")
        if k is not None:
            what += f" while batch {k} of the epoch was loading"
        what += "; the epoch is stopped."
        if proc.exitcode == -signal.SIGKILL:
            what += " (The out-of-memory killer sends SIGKILL: check the memory in use.)"
        return WorkerDiedError(what)

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """End every worker: close their task pipes (they exit after the part in
        hand), wait a moment, then terminate (and kill) the rest; close the
        pipes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._active = False
        self._current.value = 0
        for conn in self._tasks:
            conn.close()
        _end(self._procs, _GRACE_S)
        for conn in self._results:
            conn.close()
        for proc in self._procs:
            proc.close()
        self._procs, self._tasks, self._results = [], [], []

    def forget_after_fork(self) -> None:
        """In a forked child, whose parent owns the workers: close this process's
        copies of the pipes (so the workers still see the parent close them),
        join nothing (they are not this process's children)."""
        self._closed = True
        self._active = False
        # Nor are they children to multiprocessing here: at this process's exit it
        # would terminate and join them (the parent's workers).
        children = getattr(multiprocessing.process, "_children", None)
        for proc in self._procs:
            if children is not None:
                children.discard(proc)
        for conn in [*self._tasks, *self._results]:
            with contextlib.suppress(OSError):
                conn.close()
        self._procs, self._tasks, self._results = [], [], []


class PoolEpoch:
    """One epoch of a :class:`WorkerPool`, the producer of its
    :class:`~zarrdali.cpu.feed.HostFeed`. :meth:`close` ends the epoch (and with
    ``close_after`` the pool), keeping the workers for the next one."""

    def __init__(self, pool: WorkerPool, gen: int, close_after: bool) -> None:
        self.pool = pool
        self._gen = gen
        self._close_after = close_after

    def start(self, k: int, slot: int, n: int) -> None:
        self.pool._start(self._gen, k, slot, n)

    def wait(self, k: int) -> None:
        try:
            self.pool._wait(self._gen, k)
        except WorkerDiedError:
            self.pool.close()  # the others end too: a new pool serves the next epoch
            raise

    def close(self) -> None:
        pool = self.pool
        if pool._gen == self._gen:  # not already ended by a later epoch
            pool.end_epoch()
        if self._close_after:
            pool.close()


def _end(procs: Sequence[multiprocessing.process.BaseProcess], grace_s: float) -> None:
    """Join ``procs``, terminating (then killing) those still running after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for sig in ("terminate", "kill"):
        alive = [p for p in procs if p.is_alive()]
        if not alive:
            return
        for proc in alive:
            getattr(proc, sig)()
        for proc in alive:
            proc.join(2.0)
