"""Batches of one epoch, loadable in this process or in a worker process.

:class:`EpochReader` is small and picklable: it holds how to reopen the store
(path or URL, storage options, cache settings: a :class:`StoreRef`), the spec,
the candidate samples and the sampler, and rebuilds the (deterministic) epoch
plan and a backend the first time it is called. That lets the CPU path's worker
processes (:mod:`zarrdali.workers`) load parts of batches with it, where reading
and decoding do not share a GIL with training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .backends.base import batch_dtype
from .backends.finish import Finish
from .batchplan import plan_batch
from .hostfeed import Finishing
from .plan import EpochPlan, SampleGrid, Sampler, SampleSpec, SampleTable, Segment
from .remote import StoreRef
from .static import RingStaticTiles
from .store import ArrayLayout
from .trace import annotate
from .variables import VariableSelection


def load_frames(
    backend: Any,
    layouts: Sequence[ArrayLayout],
    spec: SampleSpec,
    tile_hw: tuple[int, int],
    samples: np.ndarray,
    split: bool = True,
    *,
    out_for: Callable[..., Any] | None = None,
    stream: Any = None,
    before_write: Callable[[], None] | None = None,
    outs: Sequence[np.ndarray] | None = None,
    finish: Finish | None = None,
    rows: np.ndarray | None = None,
    device_masks: bool = False,
) -> tuple[Any, ...]:
    """The frames of ``samples`` as the pipeline takes them.

    ``(input, target)``, assembled apart so DALI need not slice them, when
    ``split`` and the spec has target steps; else ``(window,)``.

    A device source (the GPU feed) passes ``out_for(shape, *dtypes)``, called
    once the batch is planned, for the buffer(s) to assemble the window in (one
    array per dtype, in one buffer of its ring), and
    ``stream``, on which the backend enqueues all the batch's device work
    without synchronizing, and ``before_write``, which the backend calls just
    before it enqueues the first write of that buffer. With ``finish`` (the GPU
    path's: no flags) the window is float32, finished in the gather, and with
    ``device_masks`` its uint8 mask is assembled beside it and returned after
    it: ``(window, mask)``. A host source passes
    ``outs`` (one array per frame output, assembled in place) and ``finish``
    (cast, normalize, augment while assembling; see
    :mod:`zarrdali.backends.finish`), and with ``rows`` the rows of ``outs``
    (a whole batch) that ``samples`` (a part of it) go to.
    """
    with annotate("zarrdali.plan"):
        read_plan = plan_batch(
            layouts,
            samples,
            n_frames=spec.n_frames,
            frame_step=spec.frame_step,
            tile_hw=tile_hw,
            frame_split=spec.input_steps if split and spec.target_steps else None,
        )
    device_args: dict[str, Any] = {}
    masks: tuple[Any, ...] = ()
    if out_for is not None:
        if finish is None:
            device_args["out"] = out_for(read_plan.out_shape, batch_dtype(layouts))
        elif device_masks:
            device_args["out"], mask = out_for(read_plan.out_shape, np.float32, np.uint8)
            masks = (mask,)
            finish = replace(finish, masks=masks)
        else:
            device_args["out"] = out_for(read_plan.out_shape, np.float32)
    if stream is not None:
        device_args["stream"] = stream
    if before_write is not None:
        device_args["before_write"] = before_write
    if outs is not None:
        device_args["out"] = outs
    if finish is not None:
        device_args["finish"] = finish
    if rows is not None:
        device_args["rows"] = rows
    with annotate("zarrdali.load"):
        frames = backend.load_batch(layouts, read_plan, **device_args)
    return ((frames,) if read_plan.frame_split is None else tuple(frames)) + masks


def load_into(
    backend: Any,
    layouts: Sequence[ArrayLayout],
    spec: SampleSpec,
    tile_hw: tuple[int, int],
    samples: np.ndarray,
    outs: Sequence[np.ndarray],
    finish: Finish | None,
    *,
    rows: np.ndarray | None = None,
    static: RingStaticTiles | None = None,
) -> None:
    """The CPU path's load of ``samples`` into a ring slot's arrays ``outs`` (see
    :class:`~zarrdali.hostfeed.BatchLayout`): the frames, finished by ``finish``
    (their masks too, where the slot has them), then the static tiles with the
    same flags. With ``rows``, ``samples`` are that part of the batch whose
    arrays ``outs`` are."""
    n_frames = 1 + bool(spec.target_steps)
    n_static = int(static is not None)
    masks = outs[n_frames + n_static :]
    if masks:  # one per frame output, written where each piece lands
        finish = replace(finish, masks=tuple(masks))
    load_frames(
        backend,
        layouts,
        spec,
        tile_hw,
        samples,
        outs=outs[:n_frames],
        finish=finish,
        rows=rows,
    )
    if static is not None:
        flags = None if finish is None else finish.flags
        if flags is not None and rows is not None:
            flags = flags[rows]
        static.write(outs[n_frames], samples, flags, rows)


@dataclass
class EpochReader:
    store: StoreRef | str  # how to reopen the store (a path or URL alone, or with options)
    variables: VariableSelection | Sequence[str]  # the variables and levels served
    spec: SampleSpec
    candidates: SampleGrid | SampleTable
    sampler: Sampler
    epoch: int
    start: int  # first batch of the epoch to serve (resume)
    num_threads: int = 1
    partial_decode: bool = True
    memory_map: bool = False
    finishing: Finishing | None = None  # cast, normalize, augment while assembling
    resumed: tuple[Segment, ...] = ()  # parts of the epoch served at other world sizes
    static: RingStaticTiles | None = None  # static tiles, written after the frames
    _state: Any = field(default=None, init=False, repr=False)  # (layouts, backend)
    _plan: EpochPlan | None = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_state"] = state["_plan"] = None  # rebuilt in the worker
        return state

    def begin(
        self,
        *,
        epoch: int,
        start: int,
        sampler: Sampler,
        finishing: Finishing | None,
        resumed: tuple[Segment, ...],
    ) -> None:
        """Serve another epoch (a persistent worker's next one): the store and the
        backend stay open, the plan is made anew."""
        self.epoch, self.start, self.sampler = epoch, start, sampler
        self.finishing, self.resumed = finishing, tuple(resumed)
        self._plan = None

    def epoch_update(self) -> dict[str, Any]:
        """What :meth:`begin` takes to serve this reader's epoch (sent to workers)."""
        return {
            "epoch": self.epoch,
            "start": self.start,
            "sampler": self.sampler,
            "finishing": self.finishing,
            "resumed": self.resumed,
        }

    def _open(self) -> tuple[list[ArrayLayout], Any]:
        from .backends.cpu import CpuBackend

        ref = self.store if isinstance(self.store, StoreRef) else StoreRef(self.store)
        group, name, source = ref.open()
        variables = self.variables
        if not isinstance(variables, VariableSelection):
            names = tuple(variables)
            variables = VariableSelection(names, (None,) * len(names))
        layouts = variables.layouts(group, name)
        backend = CpuBackend(
            group,
            name,
            self.num_threads,
            self.partial_decode,
            source=source,
            memory_map=self.memory_map,
        )
        return layouts, backend

    def _ready(self) -> tuple[list[ArrayLayout], EpochPlan, Any]:
        if self._state is None:
            self._state = self._open()
        if self._plan is None:
            samples = self.candidates.samples(self.sampler.seed, self.epoch)
            self._plan = self.sampler.epoch_plan(samples, self.epoch, self.resumed)
        layouts, backend = self._state
        return layouts, self._plan, backend

    def __call__(self, k: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """Frames and samples ``[B, 3]`` of batch ``start + k``.

        The frames are ``(input, target)`` (or ``(input,)`` without target
        steps), each assembled in its own array so DALI need not slice them.
        """
        layouts, plan, backend = self._ready()
        samples = plan.batch(self.start + k)
        frames = load_frames(backend, layouts, self.spec, self.candidates.tile_hw, samples)
        return frames, samples

    def load_part(self, k: int, rows: np.ndarray | None, outs: Sequence[np.ndarray]) -> None:
        """Samples ``rows`` (None: all) of batch ``start + k`` into their rows of
        ``outs`` (the batch's arrays in its ring slot: frames, then static
        tiles), finished as ``finishing`` says."""
        layouts, plan, backend = self._ready()
        j = self.start + k
        samples = plan.batch(j)
        finish = None if self.finishing is None else self.finishing.batch(j, len(samples))
        tile_hw = self.candidates.tile_hw
        load_into(
            backend,
            layouts,
            self.spec,
            tile_hw,
            samples if rows is None else samples[rows],
            outs,
            finish,
            rows=rows,
            static=self.static,
        )

    def close(self) -> None:
        """Release the backend this reader opened (threads, maps, files), and a
        worker's map of the static fields. Idempotent."""
        state, self._state = self._state, None
        self._plan = None
        try:
            if state is not None:
                state[1].close()
        finally:
            if self.static is not None:
                self.static.close()
