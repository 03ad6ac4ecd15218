"""Loaders timed by the benchmark. Each serves the same samples for a given epoch.

A runner is a generator: it sets its loader up, then times one epoch of
``spec.batches`` batches (after ``spec.warmup_batches`` untimed ones) each time
it is advanced, recording into its :class:`RunResult`. The benchmark advances
all runners epoch by epoch, interleaved, so slow drifts of the machine's speed
affect every loader alike and ratios come from the same minutes. Samples come
from zarrdali's own epoch plan, so all loaders do equal work.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..chunkplan import plan_batch
from ..loader import ZarrLoader
from ..store import ArrayLayout
from .spec import BenchSpec


@dataclass
class RunResult:
    name: str
    epoch_seconds: list[float] = field(default_factory=list)
    samples_per_epoch: int = 0
    decoded_bytes_per_epoch: int = 0  # bytes of chunks decoded (0: not applicable)
    note: str = ""
    status: str = "ok"  # "ok", "failed" or "skipped"
    error: str = ""

    def samples_per_s(self) -> list[float]:
        return [self.samples_per_epoch / s for s in self.epoch_seconds]

    def decoded_gb_per_s(self) -> list[float]:
        return [self.decoded_bytes_per_epoch / s / 1e9 for s in self.epoch_seconds]


Runner = Iterator[None]


def _loader(spec: BenchSpec, device: str = "cpu", **kw) -> ZarrLoader:
    return ZarrLoader(
        spec.store, **spec.loader_kwargs(), device=device, num_threads=spec.num_threads, **kw
    )


def epoch_batches(spec: BenchSpec, epoch: int) -> list[np.ndarray]:
    """The sample batches of ``epoch`` the benchmark uses (warm-up batches first)."""
    loader = _loader(spec, workers=0)
    plan = loader.epoch_plan(epoch)
    n = min(len(plan), spec.warmup_batches + spec.batches)
    loader.close()
    return [plan.batch(k) for k in range(n)]


def _decoded_nbytes(loader: ZarrLoader, batches: Sequence[np.ndarray]) -> int:
    total = 0
    for samples in batches:
        read_plan = plan_batch(
            loader.layouts,
            samples,
            n_frames=loader.spec.n_frames,
            frame_step=loader.spec.frame_step,
            tile_hw=loader.candidates.tile_hw,
        )
        total += read_plan.decoded_nbytes(loader.layouts)
    return total


def zarrdali_runner(spec: BenchSpec, result: RunResult, device: str = "cpu") -> Runner:
    """zarrdali end to end: plan, read, decode, assemble, DALI, torch tensors."""
    loader = _loader(spec, device)
    result.note = f"{loader.workers} worker process(es)" if loader.workers else "in-process"
    try:
        for epoch in range(spec.epochs):
            loader.set_epoch(epoch)
            timed = epoch_batches(spec, epoch)[spec.warmup_batches :]
            it = iter(loader)
            for _ in range(spec.warmup_batches):
                next(it)
            samples = 0
            t = time.perf_counter()
            for _ in timed:
                samples += len(next(it)["index"])
            result.epoch_seconds.append(time.perf_counter() - t)
            it.close()
            result.samples_per_epoch = samples
            result.decoded_bytes_per_epoch = _decoded_nbytes(loader, timed)
            yield
    finally:
        loader.close()


def decode_ceiling_runner(spec: BenchSpec, result: RunResult) -> Runner:
    """numcodecs alone on the chunks the timed batches touch, all threads, no I/O.

    The encoded chunks are read into memory first; only decoding is timed, each
    thread decompressing into its own reused buffer (no allocation). This is
    the rate zarrdali's CPU path cannot beat.
    """
    loader = _loader(spec, workers=0)
    threads = spec.num_threads or os.cpu_count() or 1
    result.note = f"{threads} threads, in-memory chunks"
    layouts = loader.layouts
    scratch = threading.local()

    def decode(item: tuple[ArrayLayout, bytes]) -> int:
        layout, data = item
        out = getattr(scratch, "out", None)
        if out is None or out.nbytes < layout.chunk_nbytes:
            out = scratch.out = np.empty(layout.chunk_nbytes, dtype=np.uint8)
        layout.codec.decode_into(data, out[: layout.chunk_nbytes])
        return layout.chunk_nbytes

    pool = ThreadPoolExecutor(threads)
    try:
        for epoch in range(spec.epochs):
            batches = epoch_batches(spec, epoch)[spec.warmup_batches :]
            work = []
            for samples in batches:
                plan = plan_batch(
                    layouts,
                    samples,
                    n_frames=spec.n_frames,
                    frame_step=1,
                    tile_hw=loader.candidates.tile_hw,
                )
                encoded = loader.backend.reader.read(layouts, plan.chunks)
                work += [
                    (layouts[c.var], e)
                    for c, e in zip(plan.chunks, encoded, strict=True)
                    if e is not None
                ]
            parts = [work[k::threads] for k in range(threads)]  # one task per thread
            t = time.perf_counter()
            nbytes = sum(pool.map(lambda part: sum(map(decode, part)), parts))
            result.epoch_seconds.append(time.perf_counter() - t)
            result.samples_per_epoch = sum(len(b) for b in batches)
            result.decoded_bytes_per_epoch = nbytes
            yield
    finally:
        pool.shutdown()
        loader.close()


class XarraySampleDataset:
    """The usual approach: a map-style torch Dataset indexing xarray per sample."""

    def __init__(
        self,
        store: str,
        variables: Sequence[str],
        n_frames: int,
        tile_hw: tuple[int, int],
        samples: np.ndarray,
    ) -> None:
        self.store, self.variables, self.n_frames = store, list(variables), n_frames
        self.tile_hw, self.samples = tile_hw, samples
        self._ds = None  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import xarray as xr

        if self._ds is None:
            self._ds = xr.open_zarr(self.store, consolidated=False, mask_and_scale=False)
        t0, y0, x0 = (int(v) for v in self.samples[i])
        h, w = self.tile_hw
        fields = []
        for v in self.variables:
            da = self._ds[v]
            window = da.isel(
                {
                    da.dims[0]: slice(t0, t0 + self.n_frames),
                    da.dims[-2]: slice(y0, y0 + h),
                    da.dims[-1]: slice(x0, x0 + w),
                }
            )
            values = window.values.astype(np.float32)
            fields.append(values if values.ndim == 4 else values[:, None])
        return np.concatenate(fields, axis=1), self.samples[i]


class _EpochSampler:
    """Indices of the current epoch's samples in a dataset holding every epoch's."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def torch_xarray_runner(
    spec: BenchSpec, result: RunResult, num_workers: int | None = None
) -> Runner:
    """torch DataLoader over xarray indexing with ``num_workers`` processes.

    Workers are spawned (forking a process that runs threads, as zarr's event
    loop does, can deadlock) once, and persist across epochs like a training
    run's would; the warm-up batches absorb their start-up.
    """
    import torch

    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    result.note = f"{workers} workers"
    loader = _loader(spec, workers=0)
    tile_hw = loader.candidates.tile_hw
    loader.close()
    per_epoch = [np.concatenate(epoch_batches(spec, e)) for e in range(spec.epochs)]
    offsets = np.cumsum([0] + [len(s) for s in per_epoch])
    dataset = XarraySampleDataset(
        spec.store, spec.variables, spec.n_frames, tile_hw, np.concatenate(per_epoch)
    )
    sampler = _EpochSampler()
    dl = torch.utils.data.DataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
        multiprocessing_context="spawn" if workers else None,
    )
    try:
        for epoch in range(spec.epochs):
            sampler.indices = list(range(offsets[epoch], offsets[epoch + 1]))
            it = iter(dl)
            for _ in range(spec.warmup_batches):
                next(it)
            n = 0
            t = time.perf_counter()
            for x, _ in it:
                n += len(x)
            result.epoch_seconds.append(time.perf_counter() - t)
            result.samples_per_epoch = n
            del it
            yield
    finally:
        del dl
