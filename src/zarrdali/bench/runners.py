"""Loaders timed by the benchmark. Each serves the same samples for a given epoch.

Every runner returns per-epoch timings of ``spec.batches`` batches after
``spec.warmup_batches`` warm-up batches; the samples come from zarrdali's own
epoch plan so all loaders do equal work.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
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


def _loader(spec: BenchSpec, device: str = "cpu") -> ZarrLoader:
    return ZarrLoader(
        spec.store, **spec.loader_kwargs(), device=device, num_threads=spec.num_threads
    )


def epoch_batches(spec: BenchSpec, epoch: int) -> list[np.ndarray]:
    """The sample batches timed in ``epoch`` (warm-up batches first)."""
    loader = _loader(spec)
    plan = loader.epoch_plan(epoch)
    n = min(len(plan), spec.warmup_batches + spec.batches)
    loader.close()
    return [plan.batch(k) for k in range(n)]


def run_zarrdali(spec: BenchSpec, device: str = "cpu") -> RunResult:
    """zarrdali end to end: plan, read, decode, assemble, DALI, torch tensors."""
    loader = _loader(spec, device)
    result = RunResult(f"zarrdali[{device}]")
    try:
        for epoch in range(spec.epochs):
            loader.set_epoch(epoch)
            decoded = samples = 0
            it = iter(loader)
            for _ in range(spec.warmup_batches):
                next(it)
            plan = loader.epoch_plan(epoch)
            t = time.perf_counter()
            for k in range(spec.batches):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                samples += len(batch["index"])
                read_plan = plan_batch(
                    loader.layouts,
                    plan.batch(spec.warmup_batches + k),
                    n_frames=spec.n_frames,
                    frame_step=1,
                    tile_hw=loader.grid.tile_hw,
                )
                decoded += read_plan.decoded_nbytes(loader.layouts)
            result.epoch_seconds.append(time.perf_counter() - t)
            it.close()
            result.samples_per_epoch, result.decoded_bytes_per_epoch = samples, decoded
    finally:
        loader.close()
    return result


def run_decode_ceiling(spec: BenchSpec) -> RunResult:
    """numcodecs alone on the chunks the timed batches touch, all threads, no I/O.

    The encoded chunks are read into memory first; only decoding is timed, each
    thread decompressing into its own reused buffer (no allocation). This is
    the rate zarrdali's CPU path cannot beat.
    """
    loader = _loader(spec)
    threads = spec.num_threads or os.cpu_count() or 1
    result = RunResult("numcodecs decode ceiling", note=f"{threads} threads, in-memory chunks")
    layouts = loader.layouts
    scratch = threading.local()

    def decode(item: tuple[ArrayLayout, bytes]) -> int:
        layout, data = item
        out = getattr(scratch, "out", None)
        if out is None or out.nbytes < layout.chunk_nbytes:
            out = scratch.out = np.empty(layout.chunk_nbytes, dtype=np.uint8)
        layout.codec.decode_into(data, out[: layout.chunk_nbytes])
        return layout.chunk_nbytes

    with ThreadPoolExecutor(threads) as pool:
        for epoch in range(spec.epochs):
            batches = epoch_batches(spec, epoch)[spec.warmup_batches :]
            work = []
            for samples in batches:
                plan = plan_batch(
                    layouts,
                    samples,
                    n_frames=spec.n_frames,
                    frame_step=1,
                    tile_hw=loader.grid.tile_hw,
                )
                encoded = loader.backend.reader.read(layouts, plan.chunks)
                work += [
                    (layouts[c.var], e)
                    for c, e in zip(plan.chunks, encoded, strict=True)
                    if e is not None
                ]
            t = time.perf_counter()
            # Contiguous slices per thread: one task each, no per-chunk scheduling.
            nbytes = sum(
                pool.map(
                    lambda part: sum(map(decode, part)), [work[k::threads] for k in range(threads)]
                )
            )
            result.epoch_seconds.append(time.perf_counter() - t)
            result.samples_per_epoch = sum(len(b) for b in batches)
            result.decoded_bytes_per_epoch = nbytes
    loader.close()
    return result


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


def run_torch_xarray(spec: BenchSpec, num_workers: int | None = None) -> RunResult:
    """torch DataLoader over xarray indexing with ``num_workers`` processes.

    Workers are spawned (forking a process that runs threads, as zarr's event
    loop does, can deadlock) once, and persist across epochs like a training
    run's would; the first warm-up batches absorb their start-up.
    """
    import torch

    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    result = RunResult("torch DataLoader + xarray", note=f"{workers} workers")
    loader = _loader(spec)
    tile_hw = loader.grid.tile_hw
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
    del dl
    return result
