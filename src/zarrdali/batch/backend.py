"""The roles every backend fills: locate, read, decode, assemble.

A backend is an object passed down (like zarr-python's buffer prototypes), not a
flag tested throughout the code. Both satisfy :class:`Backend` and consume the
same :class:`~zarrdali.batch.plan.BatchPlan` (arrays, one per batch) and the
same :class:`~zarrdali.batch.locate.ChunkLocations` (where each chunk's
bytes are, also arrays). The CPU backend (numpy, numcodecs) reads, decodes and
copies chunk by chunk in its threads; the GPU backend (CuPy, kvikIO, nvCOMP)
reads a batch into one device buffer, decodes it in batched nvCOMP calls and
gathers it with one kernel launch.

A backend also says how its batches reach DALI, so the loader never asks which
device it runs on: where the pipeline's operators run (``dali_device``, and
``dali_device_id()``), whether a batch is one window the pipeline slices into
input and target (``whole_window``), and, per epoch, the
:class:`EpochSource` that loads batches ahead of DALI (``batch_source``): on
the CPU a :class:`~zarrdali.gpu.prefetch.PrefetchSource` (threads), on the GPU a
:class:`~zarrdali.gpu.feed.CudaFeed` (threads, side streams, events,
a ring of device buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import Any, Protocol

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
# the batch's device work on (see :func:`zarrdali.cpu.reader.load_frames`).
LoadFn = Callable[..., tuple[tuple[Any, ...], np.ndarray]]


class EpochSource(Protocol):
    """The batches of one epoch, loaded ahead of DALI; owned by the epoch, closed by it.

    ``get(k)`` is called by DALI's external source, in order, from one thread;
    it returns ``(frames, samples)``. ``cuda_stream`` is what DALI's GPU
    external source copies the frames on (None: not a device source).
    ``close()`` is called once the pipeline is shut down: it stops and joins
    the loading threads and releases what the source owns, in order.
    """

    cuda_stream: Any

    def get(self, k: int) -> tuple[tuple[Any, ...], np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    device: str
    dali_device: str  # where the pipeline's operators run: "cpu" or "gpu"
    whole_window: bool  # True: load_batch assembles [B, T, C, H, W] in one array

    def load_batch(self, layouts: Sequence[ArrayLayout], plan: BatchPlan, **device_args) -> Any:
        """Read, decode and assemble one batch: the window, or one array per output.

        A device backend takes ``out`` (the array to assemble in) and ``stream``
        (enqueue everything on it, return without synchronizing)."""

    def dali_device_id(self) -> int | None:
        """The ``device_id`` of the DALI pipeline (None: a CPU-only pipeline)."""

    def batch_source(
        self, load: LoadFn, n_batches: int, *, depth: int, batch_size: int
    ) -> EpochSource:
        """A new source of one epoch's ``n_batches`` batches, ``depth`` loaded ahead."""

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
