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

import atexit
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zarrdali.errors import ProcessContextError

if TYPE_CHECKING:
    from zarrdali.loader import ZarrLoader

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


# Loaders not closed yet, closed by one exit hook (weak: they are not kept alive).
open_loaders: weakref.WeakSet[ZarrLoader] = weakref.WeakSet()


def close_open_loaders() -> None:
    """At interpreter exit: close every loader still open, while CUDA, DALI and
    the thread pools are all still there. The first error is raised at the end."""
    errors = []
    for loader in list(open_loaders):
        try:
            loader.close()
        except Exception as err:  # the others are still closed; atexit reports it
            errors.append(err)
    if errors:
        raise errors[0]


def set_aside_after_fork() -> None:
    """In a forked child: every open loader sets what it inherited aside (threads
    and worker processes exist only in the parent; see lifetime.py)."""
    for loader in list(open_loaders):
        try:
            loader._resources.after_fork()
        except Exception:  # never fail a fork; the loader raises when it is used
            log.debug("zarrdali: a loader could not be set aside after fork", exc_info=True)


def track_open(loader: ZarrLoader, uses_dali: bool) -> None:
    """Remember ``loader`` for the exit hook, and make the hook run first.

    atexit runs hooks last-registered first. The hook is registered once, and
    moved to the end of the list as loaders are created, after the libraries a
    loader uses (torch; DALI, CuPy, kvikIO, nvCOMP on the GPU path) have been
    imported and registered their own hooks, so it runs before theirs. DALI is
    imported here only for a loader whose epochs run a DALI pipeline (the GPU
    path): the CPU path neither needs nor imports it.
    """
    if uses_dali:
        import nvidia.dali.plugin.pytorch  # noqa: F401  (its exit hooks first)

    atexit.unregister(close_open_loaders)
    atexit.register(close_open_loaders)
    open_loaders.add(loader)


def warn_inside_dataloader_worker(loader: ZarrLoader) -> None:
    """Each worker of a torch DataLoader that iterates a loader serves the whole
    epoch: say so once per loader, unless the loader was given its share."""
    if loader._warned_dataloader_worker or (loader._ranks_bound and loader.sampler.world_size > 1):
        return
    data = sys.modules.get("torch.utils.data")  # not imported: not in a DataLoader worker
    info = data.get_worker_info() if data is not None else None
    if info is None or info.num_workers < 2:
        return
    loader._warned_dataloader_worker = True
    warnings.warn(
        f"{loader!r} is iterated in torch DataLoader worker {info.id} of "
        f"{info.num_workers}: every worker serves the whole epoch, each sample "
        f"{info.num_workers} times. Iterate the ZarrLoader itself in place of the "
        "DataLoader (it has its own worker processes), or build it in each worker "
        "with rank=info.id, world_size=info.num_workers.",
        stacklevel=4,  # the user's loop over the loader
    )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=set_aside_after_fork)
