"""One epoch of the CPU path: batches finished straight into a ring of reused host
buffers by threads or worker processes, and handed to torch as they are.

How many worker processes, how many batches ahead, and in how many parts a
batch is cut are decided here too.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import zarr

from zarrdali.batch.backend import EpochRequest, PathTraits
from zarrdali.batch.epoch import EpochRun
from zarrdali.batch.load import load_into
from zarrdali.batch.shared import SharedArray
from zarrdali.batch.static import RingStaticTiles
from zarrdali.cpu.feed import BatchLayout, Finishing, HostBatches, HostFeed, ThreadProducer
from zarrdali.cpu.reader import EpochReader
from zarrdali.cpu.ring import BatchRing
from zarrdali.errors import ConfigError, ProcessContextError
from zarrdali.io.remote import is_picklable
from zarrdali.sampling.times import FrameTimes
from zarrdali.store.metadata import available_memory


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(batch_size: int, prefetch: int) -> int:
    """Worker processes of the CPU path: one per usable core, but no more than the
    samples of the batches in flight (each worker needs a part of one)."""
    return max(1, min(usable_cores(), batch_size * (prefetch + 1)))


# A part of a batch (what one worker loads at a time) has at least this many
# samples: each part costs its worker a plan, a locate and its lists (about
# 0.4 ms on the 2-core machine, a tenth of a part of 4 tiles of 4 variables),
# and the training process a message and a wake-up. Smaller batches go whole
# to one worker each, and more of them are loaded ahead instead.
MIN_PART_SAMPLES = 16


def max_parts(batch_size: int, workers: int) -> int:
    """The most parts a batch is cut into: one per worker, of at least
    ``MIN_PART_SAMPLES`` samples (1: whole batches, one per worker)."""
    return max(1, min(workers, batch_size // MIN_PART_SAMPLES))


def batches_ahead(
    prefetch: int,
    batch_size: int,
    workers: int,
    slot_nbytes: int = 0,
    memory: int | None = None,
) -> int:
    """Batches the CPU path loads ahead of the one handed out: ``prefetch``, or
    more where batches are cut into fewer parts than twice the workers, so
    that every worker has about two parts in flight, the next one queued while
    it loads one (no more than 64 batches ahead). Memory is then
    ``batch_size * (ahead + 2)`` samples.

    The batches beyond ``prefetch`` only keep workers busy, so they are never
    more than fit, with the two the user may hold, in half of ``memory``
    (default: this machine's) at ``slot_nbytes`` a batch: whole fields on a
    many-core machine load ``prefetch`` ahead rather than a ring of dozens of
    fields. (The constructor refuses batches whose ``prefetch + 2`` do not fit.)
    """
    wanted = max(prefetch, min(64, -(-2 * workers // max_parts(batch_size, workers)) - 1))
    if slot_nbytes <= 0 or wanted == prefetch:
        return wanted
    memory = available_memory() if memory is None else memory
    fits = (memory // 2) // slot_nbytes - 2
    return max(prefetch, min(wanted, fits))


def parts_per_batch(workers: int, ahead: int, batch_size: int) -> int:
    """How many parts a batch is cut into so that the ``ahead + 1`` batches in
    flight give every worker about two parts to work on (balance without
    waits), each of at least ``MIN_PART_SAMPLES`` samples."""
    return max(1, min(-(-2 * workers // (ahead + 1)), max_parts(batch_size, workers)))


def resolve_workers(
    workers: int | None, store: object, traits: PathTraits, batch_size: int, prefetch: int
) -> int:
    """Worker processes for a path that has them (0: read in this process's threads).

    Per-chunk work holds the GIL for part of the time, so threads alone do not
    scale; worker processes do. By default one per core this process may run
    on (no more than can share the batches read ahead). They need a store they
    can reopen: a path, a URL, or a store object that pickles (obstore and
    Icechunk stores do). A daemonic process (a torch DataLoader worker) cannot
    have children: none by default there, and asking for some is an error.
    """
    reopenable = not isinstance(store, zarr.Group) and (
        isinstance(store, (str, os.PathLike)) or is_picklable(store)
    )
    if workers is None and os.environ.get("ZARRDALI_WORKERS"):
        workers = int(os.environ["ZARRDALI_WORKERS"])
    daemonic = multiprocessing.current_process().daemon
    if workers is None:
        auto = traits.worker_processes and reopenable and not daemonic
        return default_workers(batch_size, prefetch) if auto else 0
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}.")
    if workers and not traits.worker_processes:
        raise ConfigError("workers > 0 is for the CPU path; the GPU path reads in-process.")
    if workers and not reopenable:
        what = "a zarr.Group"
        if not isinstance(store, zarr.Group):
            what = "a store that cannot be pickled"
        raise ConfigError(
            "workers > 0 needs the store as a path, a URL or a picklable store object "
            f"(worker processes reopen it); got {what}. Pass the path or URL, or workers=0."
        )
    if workers and daemonic:
        raise ProcessContextError(daemonic_workers_message(workers))
    return workers


def open_host_epoch(backend: Any, request: EpochRequest, run: EpochRun) -> None:
    """Build the CPU path's epoch into ``run``.

    Batches are decoded, cast, normalized and augmented straight into a ring of
    reused buffers (shared with the worker processes), and handed to torch as
    they are (see :mod:`zarrdali.cpu.feed`, :mod:`zarrdali.cpu.ring`,
    :mod:`zarrdali.cpu.workers`). Static tiles are cut into the slot by whoever
    loads the samples; index, flags and timestamps are computed here from the
    plan (a gather per batch). The ring and the worker processes outlive the
    epoch: they are kept in ``request.resources`` for the next one.
    """
    from zarrdali.cpu.workers import WorkerJob, WorkerPool

    plan, start, n = request.plan, request.start, request.n
    finishing = Finishing(
        request.stats,
        request.augment,
        request.seed,
        request.epoch,
        request.first_batch - start,  # batches served before at other world sizes
        request.missing,
        request.packing,
    )
    layout = host_layout(request)
    ahead = batches_ahead(
        request.prefetch, request.batch_size, request.workers, layout.slots.nbytes
    )
    res = request.resources
    if res.ring is None:  # the batches in flight, and two the user may hold
        res.ring = BatchRing(
            layout.slots, ahead + 2, shared=bool(request.workers), pin=request.pin_memory
        )
    ring = res.ring
    if request.workers:
        reader = EpochReader(
            request.store_ref,
            request.selection,
            request.spec,
            request.candidates,
            request.sampler,
            request.epoch,
            start,
            partial_decode=request.partial_decode,
            memory_map=request.memory_map,
            finishing=finishing,
            resumed=tuple(request.segments),
            static=ring_static(request, shared=True),
            backend_type=type(backend),
        )
        if res.pool is None or res.pool.closed:  # kept from epoch to epoch
            res.pool = WorkerPool(
                WorkerJob(reader, layout.slots, ring.n_slots),
                ring,
                request.workers,
                parts_per_batch=parts_per_batch(request.workers, ahead, request.batch_size),
                name=f"zarrdali epoch {request.epoch}",
            )
        producer = res.pool.begin_epoch(
            reader.epoch_update(),
            lambda k: plan.batch(start + k),
            name=f"zarrdali epoch {request.epoch}",
            close_after=not request.persistent_workers,
        )
    else:
        static = ring_static(request, shared=False)

        def load(k: int, outs: list) -> None:
            samples = plan.batch(start + k)
            finish = finishing.batch(start + k, len(samples))
            load_into(
                backend,
                request.layouts,
                request.spec,
                request.tile_hw,
                samples,
                outs,
                finish,
                static=static,
            )

        producer = ThreadProducer(load, ring, threads=2)
    sizes = [len(plan.batch(start + k)) for k in range(n)]
    run.feed = HostFeed(producer, ring, sizes, ahead=ahead)
    times = FrameTimes.for_spec(request.times, request.spec) if request.times is not None else None

    def meta(k: int) -> list:
        samples = plan.batch(start + k)
        flags = finishing.flags(start + k, len(samples))
        out = [samples] if flags is None else [samples, flags]
        return out if times is None else [*out, times(samples, flags)]

    meta_names = ["index", *(["augment"] if request.augment else [])]
    meta_names += ["time"] if times is not None else []
    run.batches = HostBatches(run.feed, [*layout.names, *meta_names], n, meta)


def host_layout(request: EpochRequest) -> BatchLayout:
    """What a ring slot holds: the frames, the static tiles and the masks where served."""
    return BatchLayout.of(
        request.spec,
        request.num_channels,
        request.tile_hw,
        request.batch_size,
        static_channels=0 if request.static is None else request.static.n_channels,
        masks=request.masks,
    )


def ring_static(request: EpochRequest, shared: bool) -> RingStaticTiles | None:
    """The static tiles' writer for the CPU path; with ``shared`` the field in
    shared memory the workers map (made once, kept in the loader's resources and
    freed by its ``close()``)."""
    static = request.static
    if static is None:
        return None
    field: SharedArray | Any = static.field
    if shared:
        res = request.resources
        if res.shared_static is None:
            res.shared_static = SharedArray.of(static.field)
        field = res.shared_static
    return RingStaticTiles(field, tuple(request.tile_hw))


def daemonic_workers_message(workers: int) -> str:
    return (
        f"workers={workers} starts worker processes, which a daemonic process (such as a "
        f"torch DataLoader worker, {multiprocessing.current_process().name}) cannot have. "
        "Pass workers=0 (or leave it unset) to load in this process, or iterate the "
        "ZarrLoader in the main process in place of the DataLoader: it loads batches in "
        "its own worker processes."
    )
