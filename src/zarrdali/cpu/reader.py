"""Batches of one epoch, loadable in this process or in a worker process.

:class:`EpochReader` is small and picklable: it holds how to reopen the store
(path or URL, storage options, cache settings: a :class:`StoreRef`), the spec,
the candidate samples and the sampler, and rebuilds the (deterministic) epoch
plan and a backend the first time it is called. That lets the CPU path's worker
processes (:mod:`zarrdali.cpu.workers`) load parts of batches with it, where reading
and decoding do not share a GIL with training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zarrdali.batch.load import load_frames, load_into
from zarrdali.batch.static import RingStaticTiles
from zarrdali.cpu.feed import Finishing
from zarrdali.sampling.epochs import (
    EpochPlan,
    SampleGrid,
    Sampler,
    SampleSpec,
    SampleTable,
    Segment,
)
from zarrdali.store.open import ArrayLayout, StoreRef
from zarrdali.store.variables import VariableSelection


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
    # The backend each process builds (the CPU backend; passed in, not imported:
    # cpu/backend.py opens the epochs that make readers).
    backend_type: type | None = None
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
        if self.backend_type is None:
            raise TypeError("EpochReader needs backend_type (the CpuBackend class)")
        ref = self.store if isinstance(self.store, StoreRef) else StoreRef(self.store)
        group, name, source = ref.open()
        variables = self.variables
        if not isinstance(variables, VariableSelection):
            names = tuple(variables)
            variables = VariableSelection(names, (None,) * len(names))
        layouts = variables.layouts(group, name)
        backend = self.backend_type(
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
