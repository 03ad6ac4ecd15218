"""What a :class:`~zarrdali.ZarrLoader` holds from epoch to epoch, and how it lets go.

A loader owns its backend (threads, files, CUDA resources), the CPU path's
ring of batch buffers (shared memory), its worker processes, the static
fields' shared copy and the live epoch. :class:`LoaderResources` holds them
apart from the loader, so that they are released

- by :meth:`ZarrLoader.close` (also ``with`` and the exit hook), in order;
- when a loader is dropped without ``close()``: a ``weakref.finalize`` on the
  loader runs the same release as soon as reference counting frees it (a
  loader holds no reference cycle, so the collector is not needed);
- never in a process forked from the owner: the child inherits the objects but
  not the threads behind them, and the worker processes are not its children.
  :meth:`LoaderResources.after_fork` (run for every open loader by
  ``os.register_at_fork``, see loader.py) sets the inherited resources aside:
  never closed, joined or unmapped there (a lock held by a parent's thread at
  the fork would hang it; the maps are shared with the parent). The loader then
  starts fresh in the child at its next iteration, or raises a
  :class:`~zarrdali.errors.ProcessContextError` that says what to do instead
  (see ``ZarrLoader._ready_in_this_process``).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

from zarrdali.errors import ProcessContextError

log = logging.getLogger(__name__)

# What a forked child inherited from its parent's loaders: kept, never released here.
_abandoned: list[Any] = []


class LoaderResources:
    """A loader's long-lived resources (None until made) and their release."""

    def __init__(self, name: str) -> None:
        self.name = name  # the loader's repr, for messages
        self.pid = os.getpid()  # the process they belong to
        self.forked_from: int | None = None  # after a fork: the parent's pid
        self.backend: Any = None
        self.ring: Any = None  # BatchRing
        self.pool: Any = None  # WorkerPool (persistent workers)
        self.shared_static: Any = None  # SharedArray the workers map
        self.device_static: Any = None  # DeviceStaticFields (GPU pipeline)
        # Weak: the epoch's generator owns the run; this lets the loader close it
        # (next epoch, close(), exit) without a reference cycle.
        self.live_epoch: weakref.ref | None = None
        self.released = False

    def close_live_epoch(self, because: str) -> None:
        run = self.live_epoch() if self.live_epoch is not None else None
        self.live_epoch = None
        if run is not None:
            run.close(because)

    def close_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()

    def release(self, because: str) -> None:
        """Release everything, in order: the live epoch (its feed stops using the
        workers and the ring), the worker processes, the ring (unmapped now, or
        when the user drops the last batch), the static fields, the backend.
        Every step runs; the first error is raised at the end. Idempotent."""
        if self.released:
            return
        self.released = True
        if os.getpid() != self.pid:  # inherited without the fork hook: set aside
            self.set_aside()
            return
        steps: list[tuple[Callable, tuple]] = [
            (self.close_live_epoch, (because,)),
            (self.close_pool, ()),
        ]
        for name in ("ring", "shared_static", "device_static", "backend"):
            part = getattr(self, name)
            setattr(self, name, None)
            if part is not None:
                steps.append((part.close, ()))
        errors = []
        for step, args in steps:
            try:
                step(*args)
            except Exception as err:  # the rest is still released
                errors.append(err)
        if errors:
            raise errors[0]

    def set_aside(self) -> None:
        """In a forked child: keep what was inherited (never closed, joined or
        unmapped here) and start empty; the loader makes its own when used."""
        run = self.live_epoch() if self.live_epoch is not None else None
        self.live_epoch = None
        if run is not None:
            run.abandon(
                ProcessContextError(
                    f"{run.name} was started in process {self.forked_from or self.pid} "
                    f"before os.fork(): its threads and worker processes exist only "
                    f"there. Start a new iteration in this process (iter(loader)), or "
                    f"better, build the loader in the process that iterates it."
                )
            )
            _abandoned.append(run)
        for name in ("backend", "ring", "pool", "shared_static", "device_static"):
            part = getattr(self, name)
            setattr(self, name, None)
            if part is None:
                continue
            forget = getattr(part, "forget_after_fork", None)
            if forget is not None:
                forget()  # the child's copies of descriptors; nothing of the parent's
            _abandoned.append(part)

    def after_fork(self) -> None:
        """Called in a forked child (``os.register_at_fork``)."""
        if self.released:
            return
        self.forked_from = self.pid
        self.set_aside()
        self.pid = os.getpid()
