"""The contract between the loader and a path: what every backend does and declares.

A backend is an object passed down (like zarr-python's buffer prototypes), not a
flag tested throughout the code: ``ZarrLoader`` calls only what
:class:`Backend` names, and never asks which path it runs. Both paths consume
the same :class:`~zarrdali.batch.plan.BatchPlan` (arrays, one per batch) and
the same :class:`~zarrdali.batch.locate.ChunkLocations` (where each chunk's
bytes are, also arrays). The CPU backend (numpy, numcodecs) reads, decodes and
copies chunk by chunk in its threads and worker processes; the GPU backend
(CuPy, kvikIO, nvCOMP) reads a batch into one device buffer, decodes it in
batched nvCOMP calls and gathers it with one kernel launch.

Where the paths differ, a backend *declares* it (:class:`PathTraits`), and it
opens each epoch itself (:meth:`Backend.open_epoch`): the CPU path a ring of
host buffers fed by threads or worker processes (:mod:`zarrdali.cpu.epoch`),
the GPU path a feed of device buffers and a DALI pipeline
(:mod:`zarrdali.gpu.epoch`). The loader hands it an :class:`EpochRequest`: all
the epoch needs, as values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from zarrdali.batch.locate import ChunkLocations
from zarrdali.batch.plan import BatchPlan
from zarrdali.store.open import ArrayLayout


class Locator(Protocol):
    def locate(self, plan: BatchPlan) -> ChunkLocations:
        """File, offset and size of every chunk of ``plan`` (missing ones flagged)."""


class ChunkDecoder(Protocol):
    def decode(
        self,
        layout: ArrayLayout,
        coords: Sequence[int],
        data: Any | None,
        out: Any | None = None,
        needed: int | None = None,
    ) -> Any:
        """One decoded chunk (full chunk shape; a missing chunk as the fill value)."""


# ``load(k, out_for=None, stream=None) -> (frames, samples)``: batch ``k`` of the
# epoch, planned and loaded. A device source passes ``out_for(shape, dtype)``,
# which returns the buffer to assemble the batch in, and the stream to enqueue
# the batch's device work on (see :func:`zarrdali.batch.load.load_frames`).
LoadFn = Callable[..., tuple[tuple[Any, ...], np.ndarray]]


@dataclass(frozen=True)
class PathTraits:
    """What a path declares where the paths differ, known before a backend is made.

    ``host_batches``: batches are host arrays made in a ring of reused buffers
    (``pin_memory`` applies); ``worker_processes``: it may load in worker
    processes (``workers``); ``forkable``: a process forked from the one that
    made the loader may build a new backend (CUDA cannot be used after a fork);
    ``uses_dali``: batches reach the user through a DALI iterator (the exit hook
    closes such loaders before DALI's own hooks run).
    """

    device: str
    host_batches: bool
    worker_processes: bool
    forkable: bool
    uses_dali: bool


@dataclass(frozen=True)
class EpochRequest:
    """Everything one epoch of a loader needs, as the loader knows it at the epoch's start.

    ``plan`` is the epoch's plan on this rank; batches ``start`` to
    ``start + n`` of it are served. ``first_batch`` numbers the first of them
    through the whole epoch, across world sizes (the augmentation draws'
    batch number); ``segments`` are the parts of the epoch served before at
    other world sizes. ``resources`` are the loader's long-lived ones (a
    :class:`~zarrdali.lifetime.LoaderResources`): a path keeps what outlives an
    epoch there (the CPU path's ring and worker processes), for the loader to
    release in order.
    """

    plan: Any  # EpochPlan
    start: int
    n: int
    epoch: int
    first_batch: int
    segments: tuple[Any, ...]  # Segment
    layouts: tuple[ArrayLayout, ...]
    spec: Any  # SampleSpec
    tile_hw: tuple[int, int]
    batch_size: int
    prefetch: int
    stats: Any  # (mean, std) per channel, or None
    missing: Any  # MissingValues, or None
    packing: Any  # ChannelPacking (CF decoding), or None
    augment: tuple[str, ...]
    seed: int
    static: Any  # StaticFields, or None
    times: Any  # the store's time coordinate, or None
    resources: Any  # LoaderResources
    # the CPU path's
    store_ref: Any = None  # StoreRef: how worker processes reopen the store
    selection: Any = None  # VariableSelection
    candidates: Any = None  # SampleGrid or SampleTable
    sampler: Any = None  # Sampler
    workers: int = 0
    persistent_workers: bool = True
    pin_memory: bool = False
    partial_decode: bool = True
    memory_map: bool = False
    num_channels: int = 0
    # the GPU path's
    dali_threads: int = 2

    @property
    def masks(self) -> bool:
        """Whether batches carry masks of their missing values."""
        return self.missing is not None and self.missing.masks


@runtime_checkable
class Backend(Protocol):
    """What the loader calls; both paths implement it (see tests/test_backend_contract.py)."""

    traits: PathTraits
    remote: bool  # reads an object store over the network
    whole_window: bool  # load_batch assembles [B, T, C, H, W] in one array

    def load_batch(self, layouts: Sequence[ArrayLayout], plan: BatchPlan, **device_args) -> Any:
        """Read, decode and assemble one batch: the window, or one array per output.

        A device backend takes ``out`` (the array to assemble in) and ``stream``
        (enqueue everything on it, return without synchronizing)."""

    def hold_static(self, static: Any) -> Any:
        """The static fields as this path cuts them (the GPU path's device copy,
        freed by the loader before the backend), or None: cut from the host copy."""

    def open_epoch(self, request: EpochRequest, run: Any) -> None:
        """Build one epoch's pieces into ``run`` (an :class:`~zarrdali.batch.epoch.EpochRun`),
        each as soon as it exists, so that ``run.close()`` releases whatever was
        made when building fails half-way; ``run.batches`` then yields the batches."""

    def probe(self, layouts: Sequence[ArrayLayout]) -> None:
        """Read one chunk of each array now: access errors at construction, not mid-epoch."""

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def batch_dtype(layouts: Sequence[ArrayLayout]) -> np.dtype:
    """One dtype all variables fit in (the pipeline casts to float32 later)."""
    return np.result_type(*(layout.dtype for layout in layouts))


def finish_all(futures: Sequence[Future]) -> None:
    """Wait until none of ``futures`` runs, then re-raise the first error.

    Every task writes into the caller's output (a ring slot the loader may
    unmap, a pinned buffer it reuses, as soon as this batch fails), so an error
    must not return while the others still write: the tasks not started are
    cancelled, the running ones finished.
    """
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    if pending and any(f.exception() is not None for f in done):
        for future in pending:
            future.cancel()
        wait(pending)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            future.result()  # re-raises it with its traceback
