"""The CPU path's batches of one epoch: loaded ahead into a ring, handed to torch as is.

A :class:`HostFeed` keeps the batches after the one the user asked for loading
(``ahead`` of them, each in a slot of a :class:`~zarrdali.cpu.ring.BatchRing`)
through a *producer*: threads of this process (:class:`ThreadProducer`) or
worker processes (:class:`~zarrdali.cpu.workers.WorkerPool`). Batches are
decoded, cast, normalized and augmented in their slot (see
:mod:`zarrdali.batch.finish`); :meth:`HostFeed.get` hands a finished slot's
arrays over, and :class:`HostBatches` wraps them in torch tensors without a
copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from zarrdali.batch.finish import Finish, finish_of
from zarrdali.cpu.ring import BatchRing, SlotLayout
from zarrdali.errors import LoaderClosedError
from zarrdali.sampling.augment import draw_augmentations
from zarrdali.store.cf import Packing
from zarrdali.store.missing import MissingValues


@dataclass(frozen=True)
class Finishing:
    """How every batch of an epoch is finished: per-channel statistics and the
    augmentations, drawn per batch from ``(seed, epoch, batch)``."""

    stats: tuple[np.ndarray, np.ndarray] | None
    augment: tuple[str, ...]
    seed: int
    epoch: int
    # batches of the epoch served before this plan's first (elastic resume): the
    # draws are numbered through the epoch
    batch_offset: int = 0
    missing: MissingValues | None = None  # masks, nan_fill, CF missing values (None: off)
    packing: tuple[Packing | None, ...] | None = None  # CF unpacking per channel

    def batch(self, j: int, n: int) -> Finish:
        """The finish of batch ``j`` of the epoch (``n`` samples); with masks,
        the caller adds the batch's mask arrays (:func:`dataclasses.replace`)."""
        mean, std = self.stats if self.stats is not None else (None, None)
        return finish_of(mean, std, self.missing, self.packing, self.flags(j, n))

    def flags(self, j: int, n: int) -> np.ndarray | None:
        if not self.augment:
            return None
        return draw_augmentations(self.augment, n, self.seed, self.epoch, self.batch_offset + j)


@dataclass(frozen=True)
class BatchLayout:
    """The outputs a ring slot holds, in order: the frames (``input``, and
    ``target`` with target steps, float32), ``static`` where served (float32),
    then with masks one bool mask per frame output (``input_mask``,
    ``target_mask``). ``names`` as the batch dict calls them."""

    slots: SlotLayout
    names: tuple[str, ...]
    n_frames: int  # frame outputs, first

    @classmethod
    def of(
        cls,
        spec,
        n_channels: int,
        tile_hw: tuple[int, int],
        batch_size: int,
        static_channels: int = 0,
        masks: bool = False,
    ) -> BatchLayout:
        names = ["input"]
        shapes = [(batch_size, spec.input_steps, n_channels, *tile_hw)]
        if spec.target_steps:
            names.append("target")
            shapes.append((batch_size, spec.target_steps, n_channels, *tile_hw))
        n_frames = len(shapes)
        if static_channels:
            names.append("static")
            shapes.append((batch_size, static_channels, *tile_hw))
        dtypes = [np.dtype(np.float32)] * len(shapes)
        if masks:
            names += [f"{name}_mask" for name in names[:n_frames]]
            shapes += shapes[:n_frames]
            dtypes += [np.dtype(bool)] * n_frames
        return cls(SlotLayout.of(shapes, dtypes), tuple(names), n_frames)

    def output(self, outs: Sequence[np.ndarray], name: str) -> np.ndarray | None:
        """Output ``name`` of a slot's arrays ``outs`` (None: not served)."""
        return outs[self.names.index(name)] if name in self.names else None


class Producer(Protocol):
    """Loads batches into ring slots: ``start(k, slot, n)``, then ``wait(k)``."""

    def start(self, k: int, slot: int, n: int) -> None: ...

    def wait(self, k: int) -> None: ...

    def close(self) -> None: ...


class ThreadProducer:
    """Batches loaded by ``load(k, outs)`` in a few threads of this process."""

    def __init__(
        self, load: Callable[[int, list[np.ndarray]], None], ring: BatchRing, threads: int = 2
    ) -> None:
        self._load = load
        self._ring = ring
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="zarrdali-prefetch")
        self._futures: dict[int, Future] = {}

    def start(self, k: int, slot: int, n: int) -> None:
        outs = self._ring.views.arrays(slot, 0, n)
        self._futures[k] = self._pool.submit(self._load, k, outs)

    def wait(self, k: int) -> None:
        future = self._futures.pop(k)
        try:
            future.result()
        finally:
            future = None  # the error's traceback holds this frame: no cycle

    def close(self) -> None:
        """Cancel the loads not started, wait for the running ones, join the threads."""
        futures, self._futures = self._futures, {}
        for f in futures.values():
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        futures.clear()
        self._load = None


class HostFeed:
    """One epoch's batches ``0 .. n_batches - 1``, ``ahead`` of them loading while
    the user trains on the last one handed out.

    ``sizes[k]`` is the number of samples of batch ``k``. The feed owns the
    producer and closes it (:meth:`close`); the ring is its loader's, lent to
    one epoch after another: the feed gives back the slots it took.
    """

    def __init__(
        self,
        producer: Producer,
        ring: BatchRing,
        sizes: Sequence[int],
        ahead: int,
    ) -> None:
        self.producer = producer
        self.ring = ring
        self._sizes = list(sizes)
        self._ahead = max(1, ahead)
        self._slots: dict[int, int] = {}  # batch -> slot, from start() to hand-out
        self._next = 0  # next batch not started
        self._served = 0  # next batch to hand out
        self._closed = False

    def _start_ahead(self, k: int) -> None:
        """Start batches ``k .. k + ahead`` while free slots last."""
        while self._next < len(self._sizes) and self._next <= k + self._ahead:
            slot = self.ring.take()
            if slot is None:
                return
            self._slots[self._next] = slot
            self.producer.start(self._next, slot, self._sizes[self._next])
            self._next += 1

    def get(self, k: int) -> list[np.ndarray]:
        """The frame arrays of batch ``k`` (asked for in order): the ring slot
        itself, leased to the caller, or copies."""
        if self._closed:
            raise LoaderClosedError("the epoch's batch feed is closed")
        if k != self._served:
            raise ValueError(f"batches are handed out in order: {self._served} is next, not {k}")
        self._start_ahead(k)
        if k not in self._slots:  # every slot is loading or leased: cannot happen with
            raise RuntimeError("no ring slot for the next batch")  # keep < n_slots
        self.producer.wait(k)
        slot = self._slots.pop(k)
        self._served += 1
        arrays = self.ring.hand_out(slot, self._sizes[k])
        self._start_ahead(k + 1)  # the slot of a copied batch is free again
        return arrays

    def close(self) -> None:
        """Stop the producer (threads joined, worker processes ended), then give
        the ring back the slots still loading or loaded. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.producer.close()
        finally:
            slots, self._slots = self._slots, {}
            for slot in slots.values():
                self.ring.give_back(slot)


def torch_batch(
    names: Sequence[str], frames: Sequence[np.ndarray], meta: Sequence[np.ndarray]
) -> dict[str, Any]:
    """The batch as the user gets it: torch tensors over the frame arrays (no copy;
    frames already tensors, a ring's pinned copies, as they are)."""
    import torch

    tensors = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in frames]
    tensors += [torch.from_numpy(np.ascontiguousarray(m)) for m in meta]
    return dict(zip(names, tensors, strict=True))


class HostBatches:
    """The epoch's batches as the user gets them, from a :class:`HostFeed`: a
    one-element list of a dict of torch tensors, as DALI's iterator yields."""

    def __init__(
        self,
        feed: HostFeed,
        names: Sequence[str],
        n_batches: int,
        meta: Callable[[int], list[np.ndarray]],
    ) -> None:
        self._feed = feed
        self._names = list(names)
        self._n = n_batches
        self._meta = meta
        self._k = 0

    def __iter__(self) -> HostBatches:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        if self._k >= self._n:
            raise StopIteration
        k, self._k = self._k, self._k + 1
        return [torch_batch(self._names, self._feed.get(k), self._meta(k))]
