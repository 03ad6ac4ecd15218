"""One epoch of a :class:`~zarrdali.ZarrLoader`: everything it runs, owned by one object.

A backend opens each epoch into an :class:`EpochRun` (``Backend.open_epoch``):
on the CPU path the feed of the batch ring (threads, or the loader's worker
processes, which outlive the epoch); on the GPU path the feed (threads, CUDA
streams, events and the ring of device buffers DALI copies from), the DALI
external source, pipeline and iterator. :class:`EpochRun` holds
them and :meth:`EpochRun.close` releases them explicitly, in dependency order,
whichever way the epoch ends. Nothing here waits for ``__del__`` or the garbage
collector: a finalizer run by the collector may run at any point, in any thread,
after what it depends on is gone.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import Any

from zarrdali.errors import LoaderClosedError


def shutdown_pipeline(pipe: Any) -> None:
    """Stop a DALI pipeline now: its executor and backend, then its worker processes.

    DALI 2.4 has no public call for this. ``Pipeline.__del__`` and DALI's own
    ``atexit`` hook call the private ``_shutdown()``, and the pool of worker
    processes of a parallel external source is closed by a ``weakref.finalize``
    on the pipeline, that is, when the pipeline object is freed. Both are
    called here instead, in the order DALI's finalizers use: the backend first
    (it reads the pool's shared memory), then the pool. Both calls are
    idempotent, so DALI's finalizers running later do nothing.
    """
    pipe._shutdown()
    pool = getattr(pipe, "_py_pool", None)
    if pool is not None:
        pool.close()


def release_frames(err: BaseException) -> None:
    """Clear the local variables of the finished frames in ``err``'s tracebacks.

    An error raised while loading passes through DALI's iterator and pipeline,
    the external source and the prefetcher; their frames in the traceback would
    keep those objects alive for as long as the error is (a handler that stores
    it, a test framework). The traceback still names every file, line and
    function; frames still running (the loader's own) are left alone.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]


class SourceHandle:
    """What DALI's graph holds in place of the epoch's source.

    DALI's graph objects (operators, data nodes, external source groups) refer
    to each other in reference cycles, so they outlive the pipeline until the
    collector runs, and so would whatever they hold: the source, and through it
    the backend's batch source (threads, CUDA streams and buffers). Given this
    handle instead, they hold nothing of the epoch once :meth:`close` has
    detached it. It forwards the calls the pipeline makes (``__call__``,
    ``frames_only``, ``meta_only``) and is pickled, for DALI's worker
    processes, as a new handle on the source.
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self._samples_of: Any = None

    def _target(self) -> Any:
        source = self._source
        if source is None:
            raise LoaderClosedError("the epoch's source is closed")
        return source

    def __call__(self, info) -> tuple:
        return self._target()(info)

    def frames_only(self, info) -> tuple:
        return self._target().frames_only(info)

    def meta_only(self, samples_of) -> Any:
        self._samples_of = samples_of
        return self._meta

    def _meta(self, info) -> tuple:
        return self._target().meta_only(self._samples_of)(info)

    def close(self) -> None:
        self._source = None
        self._samples_of = None

    def __reduce__(self):
        return (SourceHandle, (self._target(),))


class BoolMasks:
    """The DALI iterator's batches with the uint8 masks (DALI does not flip bool
    tensors) seen as torch bool tensors: a view, no copy (0 and 1 are bool's
    bytes)."""

    def __init__(self, iterator: Any, names: Sequence[str]) -> None:
        self._iterator = iterator
        self._names = tuple(names)

    def __iter__(self) -> BoolMasks:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        import torch

        batches = next(self._iterator)
        for batch in batches:
            for name in self._names:
                batch[name] = batch[name].view(torch.bool)
        return batches


class EpochRun:
    """The resources of one epoch and their explicit release.

    The loader builds the pieces into the attributes below as it creates them,
    so a failure half-way releases what exists. Iterating yields the DALI
    iterator's batches; after :meth:`close` it raises :class:`LoaderClosedError`
    saying why the epoch was closed.

    Nothing here refers back to the run: the pipeline holds the source, the
    source the feed, and the loader only a weak reference to the run, so
    dropping the run frees it by reference counting.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # The epoch's feed: threads loading ahead (GPU: and streams,
        # events, the buffers DALI copies from; the CPU path: its ring feed).
        self.feed: Any = None
        self.source: Any = None  # BatchSource, fetching from the feed or the workers
        self.source_handle: SourceHandle | None = None  # what the pipeline holds of it
        self.pipeline: Any = None  # DALI pipeline: executor threads, worker processes
        self.batches: Any = None  # DALIGenericIterator over the pipeline
        self.closed_because: str | None = None
        self._abandoned: BaseException | None = None  # what next() raises (abandon)

    @property
    def closed(self) -> bool:
        return self.closed_because is not None

    def __iter__(self) -> EpochRun:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._abandoned is not None:
            raise type(self._abandoned)(*self._abandoned.args)
        if self.closed_because is not None:
            raise LoaderClosedError(f"{self.name} is closed: {self.closed_because}.")
        return next(self.batches)[0]

    def close(self, because: str = "the epoch ended") -> None:
        """Release everything, in dependency order; idempotent.

        1. the DALI iterator (it holds the pipeline and its last outputs);
        2. the pipeline: executor stopped, then its worker processes; it was
           built with the feed's stream, so it goes before the feed;
        3. the feed (the backend's batch source): loads not started are
           cancelled, running ones finish, its threads are joined; on the GPU
           then its streams are synchronized (no work in flight) and the
           events, the buffers DALI copied from and the streams released;
        4. the source, detached from the handle DALI's graph still holds.

        Every step runs even if an earlier one raised; the first error is
        raised at the end.
        """
        if self.closed_because is not None:
            return
        self.closed_because = because
        errors: list[BaseException] = []
        self.batches = None
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            _run(errors, shutdown_pipeline, pipeline)
        del pipeline
        feed, self.feed = self.feed, None
        if feed is not None:
            _run(errors, feed.close)
        del feed
        if self.source_handle is not None:
            self.source_handle.close()
        self.source_handle = None
        self.source = None
        if errors:
            raise errors[0]

    def abandon(self, error: BaseException) -> None:
        """Closed without releasing anything (a forked child, where the parts are
        the parent's): iterating raises ``error``."""
        self.closed_because = str(error)
        self._abandoned = error

    def __repr__(self) -> str:
        state = f"closed: {self.closed_because}" if self.closed else "open"
        return f"<EpochRun {self.name} ({state})>"


def _run(errors: list[BaseException], step, *args) -> None:
    try:
        step(*args)
    except BaseException as err:  # raised by close() once every step has run
        errors.append(err)
