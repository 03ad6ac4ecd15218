"""Loaders timed by the benchmark. Each serves the same samples for a given epoch.

A runner is a generator: it sets its loader up, then times one epoch of
``spec.batches`` batches (after ``spec.warmup_batches`` untimed ones) each time
it is advanced, recording into its :class:`RunResult`. The benchmark advances
all runners epoch by epoch, interleaved, so slow drifts of the machine's speed
affect every loader alike and ratios come from the same minutes. Samples come
from zarrdali's own epoch plan, so all loaders do equal work. A runner that
cannot run here raises :class:`Skipped` with the reason before its first epoch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from zarrdali.batch.plan import plan_batch
from zarrdali.batch.zstdctx import ZstdContexts
from zarrdali.bench.measure import PeakMemory, RunResult, cpu_seconds, time_epoch
from zarrdali.bench.spec import BenchSpec
from zarrdali.cpu.backend import partial_decode_prefixes
from zarrdali.loader import ZarrLoader
from zarrdali.store.open import ArrayLayout

Runner = Iterator[None]


class Skipped(Exception):
    """A loader that cannot run here (no GPU, package missing, spec it cannot express)."""


class StoreMismatch(ValueError):
    """A peer loader sees the store differently from zarrdali (shape, dtype)."""


def compare_views(
    reference: dict[str, tuple[tuple[int, ...], np.dtype]],
    other: dict[str, tuple[tuple[int, ...], np.dtype]],
    who: str,
) -> None:
    """Raise :class:`StoreMismatch` unless ``who`` sees every variable as zarrdali does."""
    problems = []
    for name, (shape, dtype) in reference.items():
        if name not in other:
            problems.append(f"{name}: missing")
            continue
        o_shape, o_dtype = other[name]
        if tuple(o_shape) != tuple(shape) or np.dtype(o_dtype) != np.dtype(dtype):
            problems.append(
                f"{name}: {tuple(o_shape)} {np.dtype(o_dtype)} "
                f"(zarrdali: {tuple(shape)} {np.dtype(dtype)})"
            )
    if problems:
        raise StoreMismatch(
            f"{who} and zarrdali disagree about the store ({'; '.join(problems)}); "
            "their timings would not be of equal work."
        )


def _open_xarray(store: str, storage_options: dict | None = None):
    import xarray as xr

    # Stored values, as zarrdali serves them (no CF scaling or masking).
    return xr.open_zarr(
        store, consolidated=False, mask_and_scale=False, storage_options=storage_options
    )


def _check_xarray_view(spec: BenchSpec, loader: ZarrLoader) -> None:
    ds = _open_xarray(spec.store, spec.storage_options)
    compare_views(
        {layout.name: (layout.shape, layout.dtype) for layout in loader.layouts},
        {v: (ds[v].shape, ds[v].dtype) for v in spec.variables if v in ds},
        "xarray",
    )


def _pin_memory() -> bool:
    import torch

    return torch.cuda.is_available()  # pinning only helps host-to-device copies


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


def _decoded_nbytes(loader: ZarrLoader, batches: Sequence[np.ndarray]) -> tuple[int, int]:
    """Bytes of the chunks the batches touch, and of those the loader decodes.

    The second is smaller when the CPU path decodes chunks partially (only up
    to the last byte a batch copies, for compressors that stream).
    """
    total = decoded = 0
    for samples in batches:
        read_plan = plan_batch(
            loader.layouts,
            samples,
            n_frames=loader.spec.n_frames,
            frame_step=loader.spec.frame_step,
            tile_hw=loader.candidates.tile_hw,
        )
        whole = read_plan.decoded_nbytes(loader.layouts)
        total += whole
        if not (loader.partial_decode and loader.device == "cpu"):
            decoded += whole
            continue
        prefixes = partial_decode_prefixes(loader.layouts, read_plan)
        sizes = np.array([layout.chunk_nbytes for layout in loader.layouts])[read_plan.chunk_var]
        decoded += int(np.where(prefixes < 0, sizes, prefixes).sum())
    return total, decoded


def _zarrdali_loader(spec: BenchSpec, device: str, **kw) -> ZarrLoader:
    if device == "cuda":
        from zarrdali.errors import BackendUnavailableError
        from zarrdali.gpu import missing_gpu_requirements

        missing = missing_gpu_requirements()
        if missing:
            raise Skipped("the GPU path needs " + "; ".join(missing))
        try:
            return _loader(spec, device, **kw)
        except BackendUnavailableError as err:
            raise Skipped(str(err)) from err
    return _loader(spec, device, **kw)


def _require_static(spec: BenchSpec, static: Sequence[str]) -> None:
    from zarrdali.store.open import open_group

    group, name = open_group(spec.store, spec.storage_options)
    missing = [v for v in static if v not in group]
    if missing:
        raise Skipped(f"{name} has no static field(s) {missing} (write the sample data anew)")


def zarrdali_runner(
    spec: BenchSpec,
    result: RunResult,
    device: str = "cpu",
    partial_decode: bool = True,
    static: Sequence[str] = (),
    workers: int | None = None,
    **options: Any,
) -> Runner:
    """zarrdali end to end: plan, read, decode, assemble (and on the GPU, DALI),
    torch tensors.

    ``partial_decode=False`` decodes every chunk whole, as the decode ceilings do;
    ``workers`` overrides the loader's default worker processes. ``static``:
    static fields served too (``batch["static"]``; their normalization, once
    when the loader is built, is not timed); ``options``: other loader options
    (``masks``, ``nan_fill``), to measure what they cost.
    """
    # Remote stores: in-process (threads; fetching is async), so the request counts
    # of the byte source are this process's to report.
    kw: dict = {"workers": 0} if spec.remote else {} if workers is None else {"workers": workers}
    if static:
        _require_static(spec, static)
        kw["static"] = list(static)
    kw.update(options)
    loader = _zarrdali_loader(spec, device, partial_decode=partial_decode, **kw)
    note = f"{loader.workers} worker process(es)" if loader.workers else "in-process"
    ready = None
    if device == "cuda":
        import torch

        result.uses_gpu = True

        def ready(batch: dict) -> None:
            # The batch is the consumer's once its device work is done: waiting
            # for that is waiting for data (and times the GPU work, not its launch).
            torch.cuda.synchronize()

    stats = getattr(loader.backend, "stats", dict)

    def size(batch: dict) -> int:
        return len(batch["index"])

    try:
        for epoch in range(spec.epochs):
            loader.set_epoch(epoch)
            timed = epoch_batches(spec, epoch)[spec.warmup_batches :]
            before = stats()
            time_epoch(spec, result, lambda: iter(loader), len(timed), size, ready)
            whole, decoded = _decoded_nbytes(loader, timed)
            result.decoded_bytes_per_epoch = whole
            result.note = note
            if spec.remote:  # this epoch's requests (warm-up included), bytes, depth
                now = stats()
                result.note += (
                    f"; {now.get('requests', 0) - before.get('requests', 0)} requests, "
                    f"{(now.get('bytes', 0) - before.get('bytes', 0)) / 1e6:.1f} MB, "
                    f"peak {now.get('peak_in_flight', 0)} of {now.get('max_in_flight', 0)} "
                    f"in flight per epoch"
                )
            if decoded < whole:
                result.note += (
                    f"; decodes {decoded / whole:.0%} of the chunk bytes (partial decode)"
                )
            yield
    finally:
        loader.close()


class ChunkArena:
    """Encoded chunks copied into a few large blocks, reused round after round.

    The decode ceilings load an epoch's chunks a few hundred MB at a time
    into the same blocks, so the benchmark neither holds gigabytes nor frees
    them between loaders: on this VM, freeing gigabytes at once made the
    hypervisor take CPU back for seconds, slowing whichever loader ran next.
    """

    def __init__(self, block_nbytes: int = 64 << 20) -> None:
        self.block_nbytes = block_nbytes
        self.nbytes = 0  # held since the last clear()
        self._blocks: list[np.ndarray] = []
        self._block = 0  # the block being filled
        self._used = 0  # bytes used in it

    def add(self, data: memoryview | bytes) -> memoryview:
        """A copy of ``data`` inside the arena, valid until :meth:`clear`."""
        n = len(data)
        if self._block < len(self._blocks) and self._used + n > len(self._blocks[self._block]):
            self._block, self._used = self._block + 1, 0
        if self._block == len(self._blocks) or n > len(self._blocks[self._block]):
            self._blocks.insert(self._block, np.empty(max(self.block_nbytes, n), dtype=np.uint8))
            self._used = 0
        block, start = self._blocks[self._block], self._used
        block[start : start + n] = np.frombuffer(data, dtype=np.uint8)
        self._used += n
        self.nbytes += n
        return memoryview(block)[start : start + n]

    def clear(self) -> None:
        """Forget the contents; the blocks are filled again from the first."""
        self.nbytes, self._block, self._used = 0, 0, 0


def _decode_round(pool, decode_part, parts, foreign: frozenset[int]) -> tuple[int, float, float]:
    """Decode ``parts`` in ``pool``: bytes decoded, wall seconds, CPU seconds."""
    cpu0, t = cpu_seconds(foreign), time.perf_counter()
    nbytes = sum(pool.map(decode_part, parts))
    return nbytes, time.perf_counter() - t, cpu_seconds(foreign) - cpu0


def _record_ceiling_epoch(
    result: RunResult, seconds: float, cpu: float, peak: int, batches, nbytes: int
) -> None:
    result.epoch_seconds.append(seconds)
    result.cpu_seconds.append(cpu)
    result.peak_rss_bytes = max(result.peak_rss_bytes, peak)
    result.samples_per_epoch = sum(len(b) for b in batches)
    result.decoded_bytes_per_epoch = nbytes


def _ceiling_setup(spec: BenchSpec, zstd_contexts: bool) -> tuple[Any, ZarrLoader, int]:
    """The zstd contexts (or None), a loader to plan with, and the threads of a ceiling."""
    if spec.remote:
        raise Skipped("the decode ceilings read a local store's files")
    contexts = ZstdContexts.create() if zstd_contexts else None
    if zstd_contexts and contexts is None:
        raise Skipped("this numcodecs build does not export libzstd's API")
    return contexts, _loader(spec, workers=0), spec.budget


def decode_ceiling_runner(
    spec: BenchSpec,
    result: RunResult,
    codec_api: bool = False,
    round_nbytes: int = 512 << 20,
    *,
    zstd_contexts: bool = False,
) -> Runner:
    """numcodecs alone on the chunks the timed batches touch, all threads, no I/O.

    The encoded chunks are read into memory in rounds of about ``round_nbytes``
    and each round is decoded by all threads; only decoding is timed.
    By default each thread decompresses into its own reused buffer (numcodecs'
    module-level decompressors, no allocation): the ceiling the project's goals
    are stated against. ``codec_api=True`` times numcodecs' codec API instead
    (``Codec.decode(chunk)``, a new buffer per chunk), which is what code
    decoding with numcodecs usually does. ``zstd_contexts=True`` decodes zstd
    chunks as zarrdali[cpu] does, through numcodecs' libzstd with one reused
    context per thread (see ``batch/zstdctx.py``): the loader's ratio to it
    is its overhead alone, with the gain of the reused contexts taken out.
    """
    contexts, loader, threads = _ceiling_setup(spec, zstd_contexts)
    api = "Codec.decode, new buffers" if codec_api else "reused buffers"
    api += ", reused zstd contexts" if zstd_contexts else ""
    result.note = f"{threads} threads, in-memory chunks, {api} (not a loader: decode only)"
    result.cache = "n/a"
    layouts = loader.layouts
    scratch = threading.local()
    codecs = {layout.name: layout.codec.numcodecs_decoder() for layout in layouts}

    def decode(item: tuple[ArrayLayout, bytes]) -> int:
        layout, data = item
        if codec_api:
            return len(codecs[layout.name].decode(data))
        out = getattr(scratch, "out", None)
        if out is None or out.nbytes < layout.chunk_nbytes:
            out = scratch.out = np.empty(layout.chunk_nbytes, dtype=np.uint8)
        codec = layout.codec
        if contexts is not None and codec.compressor == "zstd" and not codec.has_crc32c:
            src = np.frombuffer(data, dtype=np.uint8)
            contexts.decompress_exactly(
                contexts.context(), out.ctypes.data, layout.chunk_nbytes, src.ctypes.data, len(src)
            )
            return layout.chunk_nbytes
        codec.decode_into(data, out[: layout.chunk_nbytes])
        return layout.chunk_nbytes

    pool = ThreadPoolExecutor(threads)
    arena = ChunkArena()
    try:
        for epoch in range(spec.epochs):
            batches = epoch_batches(spec, epoch)[spec.warmup_batches :]
            foreign = result.foreign_pids
            seconds = cpu = 0.0
            nbytes = 0
            with PeakMemory(exclude=foreign) as mem:
                work: list[tuple[ArrayLayout, memoryview]] = []
                for j, samples in enumerate(batches):
                    plan = plan_batch(
                        layouts,
                        samples,
                        n_frames=spec.n_frames,
                        frame_step=1,
                        tile_hw=loader.candidates.tile_hw,
                    )
                    locations = loader.backend.locator(layouts).locate(plan)
                    encoded = loader.backend.reader.read_chunks(layouts, locations)
                    for v, data in zip(plan.chunk_var.tolist(), encoded, strict=True):
                        if data is not None:  # a missing chunk decodes nothing
                            work.append((layouts[v], arena.add(data)))
                    if arena.nbytes < round_nbytes and j < len(batches) - 1:
                        continue
                    # Decode this round's chunks in small tasks that idle threads take
                    # (a thread whose core the VM slows does not hold up the round);
                    # only this is timed.
                    parts = [work[k : k + 16] for k in range(0, len(work), 16)]
                    n, wall, used = _decode_round(
                        pool, lambda part: sum(map(decode, part)), parts, foreign
                    )
                    nbytes, seconds, cpu = nbytes + n, seconds + wall, cpu + used
                    work, parts = [], []
                    arena.clear()
            _record_ceiling_epoch(result, seconds, cpu, mem.peak, batches, nbytes)
            yield
    finally:
        pool.shutdown()
        if contexts is not None:
            contexts.close()
        loader.close()


def small_parts(items: list, nbytes: list[int], most: int = 8, budget: int = 512 << 10) -> list:
    """``items`` cut in order into parts of at most ``most`` items and about
    ``budget`` decoded bytes (at least one item each): the tasks a ceiling's
    threads take. Tile-sized chunks (64 KiB) go 8 to a part; whole-field
    chunks (MBs each) one to a part, else a thread could be left idle at the end
    of each batch while another decodes a part of 8 of them."""
    parts, start, size = [], 0, 0
    for i, n in enumerate(nbytes):
        if i > start and (i - start == most or size + n > budget):
            parts.append(items[start:i])
            start, size = i, 0
        size += n
    if start < len(items):
        parts.append(items[start:])
    return parts


def file_ceiling_runner(
    spec: BenchSpec, result: RunResult, *, zstd_contexts: bool = False
) -> Runner:
    """What reading and decoding a batch costs a loader at the least, from the files.

    Per batch, ``spec.budget`` threads ``pread`` exactly the (inner) chunks its
    samples touch, each once, into reused buffers and decode them with
    numcodecs (``zstd_contexts``: libzstd with a reused context per thread, as
    zarrdali calls it) into reused buffers. Nothing is assembled or handed
    over: a loader that reads and decodes the same way cannot beat it (one
    that maps the files and reuses zstd contexts can). Finding the chunks (the
    shard indexes, read once) is not timed.
    """
    contexts, loader, threads = _ceiling_setup(spec, zstd_contexts)
    layouts = loader.layouts
    decode_with = "libzstd, reused contexts" if zstd_contexts else "numcodecs decode"
    result.note = (
        f"{threads} threads: pread of the chunks each batch touches + {decode_with}, "
        "reused buffers (not a loader: read and decode only)"
    )
    scratch = threading.local()
    files: dict[str, int] = {}
    files_lock = threading.Lock()

    def fd_of(path: str) -> int:
        fd = files.get(path)
        if fd is None:
            with files_lock:
                fd = files.get(path)
                if fd is None:
                    fd = files[path] = os.open(path, os.O_RDONLY)
        return fd

    def buffers(nbytes: int, chunk_nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        src, out = getattr(scratch, "src", None), getattr(scratch, "out", None)
        if src is None or src.nbytes < nbytes:
            src = scratch.src = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        if out is None or out.nbytes < chunk_nbytes:
            out = scratch.out = np.empty(max(chunk_nbytes, 1 << 20), dtype=np.uint8)
        return src, out

    def read_decode(part: list[tuple[ArrayLayout, str, int, int]]) -> int:
        done = 0
        for layout, path, offset, nbytes in part:
            src, out = buffers(nbytes, layout.chunk_nbytes)
            data = memoryview(src)[:nbytes]
            if os.preadv(fd_of(path), [data], offset) != nbytes:
                raise OSError(f"{path}: short read at {offset}")
            codec = layout.codec
            if contexts is not None and codec.compressor == "zstd" and not codec.has_crc32c:
                ctx = contexts.context()
                dst, n_out = out.ctypes.data, layout.chunk_nbytes
                contexts.decompress_exactly(ctx, dst, n_out, src.ctypes.data, nbytes)
            else:
                codec.decode_into(data, out[: layout.chunk_nbytes])
            done += layout.chunk_nbytes
        return done

    def work_of(samples: np.ndarray) -> list[tuple[ArrayLayout, str, int, int]]:
        tile_hw = loader.candidates.tile_hw
        plan = plan_batch(layouts, samples, n_frames=spec.n_frames, frame_step=1, tile_hw=tile_hw)
        loc = loader.backend.locator(layouts).locate(plan)
        present = np.flatnonzero(loc.present)
        return [
            (layouts[v], loc.paths[f], off, n)
            for v, f, off, n in zip(
                plan.chunk_var[present].tolist(),
                loc.file[present].tolist(),
                loc.offset[present].tolist(),
                loc.nbytes[present].tolist(),
                strict=True,
            )
        ]

    pool = ThreadPoolExecutor(threads)
    try:
        for epoch in range(spec.epochs):
            batches = epoch_batches(spec, epoch)[spec.warmup_batches :]
            work = [work_of(samples) for samples in batches]  # not timed: locating
            foreign = result.foreign_pids
            seconds = cpu = 0.0
            nbytes = 0
            with PeakMemory(exclude=foreign) as mem:
                for items in work:
                    # small parts that idle threads take: a slowed core holds up little
                    parts = small_parts(items, [item[0].chunk_nbytes for item in items])
                    n, wall, used = _decode_round(pool, read_decode, parts, foreign)
                    nbytes, seconds, cpu = nbytes + n, seconds + wall, cpu + used
            _record_ceiling_epoch(result, seconds, cpu, mem.peak, batches, nbytes)
            yield
    finally:
        pool.shutdown()
        for fd in files.values():
            os.close(fd)
        if contexts is not None:
            contexts.close()
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
        self.storage_options: dict | None = None  # for URL stores
        self._ds = None  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import xarray as xr

        if self._ds is None:
            self._ds = xr.open_zarr(
                self.store,
                consolidated=False,
                mask_and_scale=False,
                storage_options=self.storage_options,
            )
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


def _tile_hw(spec: BenchSpec) -> tuple[tuple[int, int], ZarrLoader]:
    loader = _loader(spec, workers=0)
    loader.close()
    return loader.candidates.tile_hw, loader


def _all_epochs(spec: BenchSpec) -> list[list[np.ndarray]]:
    return [epoch_batches(spec, e) for e in range(spec.epochs)]


def _concat(epochs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([batch for batches in epochs for batch in batches])


def _dataloader_epochs(
    spec: BenchSpec, result: RunResult, dataset, epochs: list[list[np.ndarray]]
) -> Runner:
    """Time a torch DataLoader over ``dataset``, which holds ``epochs``' samples in order.

    Workers are spawned (forking a process that runs threads, as zarr's event
    loop does, can deadlock) once, and persist across epochs like a training
    run's would; the warm-up batches absorb their start-up.
    """
    import torch

    workers = spec.budget
    result.note = f"{workers} workers" + (", pinned memory" if _pin_memory() else "")
    offsets = np.cumsum([0] + [sum(map(len, batches)) for batches in epochs])
    sampler = _EpochSampler()
    dl = torch.utils.data.DataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
        multiprocessing_context="spawn" if workers else None,
        pin_memory=_pin_memory(),
    )
    try:
        for epoch in range(spec.epochs):
            sampler.indices = list(range(offsets[epoch], offsets[epoch + 1]))
            n_timed = len(epochs[epoch]) - spec.warmup_batches
            time_epoch(spec, result, partial(iter, dl), n_timed, lambda b: len(b[0]))
            yield
    finally:
        del dl


def torch_xarray_runner(spec: BenchSpec, result: RunResult) -> Runner:
    """torch DataLoader over xarray indexing, ``spec.budget`` worker processes."""
    tile_hw, loader = _tile_hw(spec)
    _check_xarray_view(spec, loader)
    epochs = _all_epochs(spec)
    dataset = XarraySampleDataset(
        spec.store, spec.variables, spec.n_frames, tile_hw, _concat(epochs)
    )
    dataset.storage_options = spec.storage_options
    yield from _dataloader_epochs(spec, result, dataset, epochs)


# BatchGenerator holds one selector dict per patch in memory, in every worker.
MAX_XBATCHER_PATCHES = 1_000_000


class XbatcherSampleDataset(XarraySampleDataset):
    """xbatcher's ``BatchGenerator`` + torch ``MapDataset`` serving given samples.

    A BatchGenerator cuts patches on a regular grid from the array's origin
    and drops partial ones, while zarrdali's grid adds tiles flush with the far
    edges (``cover_edges``). So samples are grouped by their offset from the
    tile grid (y0 mod stride, x0 mod stride); each group gets one generator
    over the dataset cut at that offset (time stride 1: every window), and
    every sample is one patch of its group's generator, served by MapDataset
    as xbatcher users get it. Each item is ``(tensor [T, C, H, W], sample)``.
    """

    def __init__(
        self,
        store: str,
        variables: Sequence[str],
        n_frames: int,
        tile_hw: tuple[int, int],
        samples: np.ndarray,
    ) -> None:
        super().__init__(store, variables, n_frames, tile_hw, samples)
        self._dims: tuple[str, str, str] = ("", "", "")
        self._maps: dict[tuple[int, int], tuple] = {}

    def dims(self, ds) -> tuple[str, str, str]:
        """(time, y, x) names, which every variable must share for one generator."""
        dims = {(d[0], d[-2], d[-1]) for d in (ds[v].dims for v in self.variables)}
        if len(dims) != 1:
            raise Skipped(
                f"xbatcher cuts one grid for all variables, but they lie on {sorted(dims)}"
            )
        return dims.pop()

    def check(self, ds) -> None:
        """Raise :class:`Skipped` when xbatcher cannot express these samples here."""
        t, y, x = self.dims(ds)
        (h, w), n = self.tile_hw, self.n_frames
        windows = ds.sizes[t] - n + 1
        patches = windows * (ds.sizes[y] // h) * (ds.sizes[x] // w) * 4  # 4: edge groups
        if patches > MAX_XBATCHER_PATCHES:
            raise Skipped(
                f"xbatcher's BatchGenerator would hold about {patches:,} patch selectors "
                "in memory per worker; use a larger tile or a smaller store"
            )

    def _map(self, offset: tuple[int, int]):
        from xbatcher import BatchGenerator
        from xbatcher.loaders.torch import MapDataset

        if offset not in self._maps:
            if self._ds is None:
                self._ds = _open_xarray(self.store, self.storage_options)[self.variables]
                self._dims = self.dims(self._ds)
            t, y, x = self._dims
            (h, w), n = self.tile_hw, self.n_frames
            cut = self._ds.isel({y: slice(offset[0], None), x: slice(offset[1], None)})
            gen = BatchGenerator(
                cut,
                input_dims={t: n, y: h, x: w},
                input_overlap={t: n - 1},  # windows at every time step; tiles abut
            )
            self._maps[offset] = (MapDataset(gen, transform=self._to_tensor), cut.sizes)
        return self._maps[offset]

    def _to_tensor(self, patch):
        import torch

        fields = []
        for v in self.variables:
            values = patch[v].values.astype(np.float32)
            fields.append(values if values.ndim == 4 else values[:, None])
        return torch.from_numpy(np.concatenate(fields, axis=1))

    def __getitem__(self, i: int):
        t0, y0, x0 = (int(v) for v in self.samples[i])
        h, w = self.tile_hw
        offset = (y0 % h, x0 % w)
        dataset, sizes = self._map(offset)
        _, y, x = self._dims
        ny, nx = sizes[y] // h, sizes[x] // w
        # BatchGenerator numbers patches in itertools.product order of input_dims.
        index = (t0 * ny + (y0 - offset[0]) // h) * nx + (x0 - offset[1]) // w
        return dataset[index], self.samples[i]


def xbatcher_runner(spec: BenchSpec, result: RunResult) -> Runner:
    """xbatcher BatchGenerator + MapDataset in a torch DataLoader, ``spec.budget`` workers."""
    try:
        import xbatcher  # noqa: F401
    except ImportError as err:
        raise Skipped("xbatcher is not installed (pip install 'zarrdali[bench]')") from err
    tile_hw, loader = _tile_hw(spec)
    _check_xarray_view(spec, loader)
    epochs = _all_epochs(spec)
    dataset = XbatcherSampleDataset(
        spec.store, spec.variables, spec.n_frames, tile_hw, _concat(epochs)
    )
    dataset.storage_options = spec.storage_options
    dataset.check(_open_xarray(spec.store, spec.storage_options))
    yield from _dataloader_epochs(spec, result, dataset, epochs)


def zarr_gpu_missing() -> list[str]:
    """What reading with ``zarr.config.enable_gpu()`` lacks here (empty: all there)."""
    try:
        import cupy
    except ImportError:
        return ["CuPy (pip install cupy-cuda12x or cupy-cuda13x)"]
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return ["a CUDA GPU (none visible)"]
    except Exception as err:  # no driver
        return [f"a working CUDA driver ({type(err).__name__}: {err})"]
    return []


def zarr_gpu_runner(spec: BenchSpec, result: RunResult) -> Runner:
    """zarr-python with ``zarr.config.enable_gpu()``: one read per sample and variable.

    zarr 3.1 still decompresses on the CPU and copies to the device; this is
    the plain way to get samples onto a GPU without a dedicated loader.
    """
    missing = zarr_gpu_missing()
    if missing:
        raise Skipped("zarr's GPU buffers need " + "; ".join(missing))
    import cupy
    import torch
    import zarr

    tile_hw, _ = _tile_hw(spec)
    group = zarr.open_group(spec.store, mode="r")
    arrays = [group[v] for v in spec.variables]
    result.note = "main process, one read per sample and variable"
    result.uses_gpu = True

    def read(sample: np.ndarray):
        t0, y0, x0 = (int(v) for v in sample)
        (h, w), n = tile_hw, spec.n_frames
        fields = []
        with zarr.config.enable_gpu():
            for arr in arrays:
                window = arr[t0 : t0 + n, ..., y0 : y0 + h, x0 : x0 + w].astype(cupy.float32)
                fields.append(window if window.ndim == 4 else window[:, None])
        return cupy.concatenate(fields, axis=1)

    def batches(epoch: int):
        for samples in epoch_batches(spec, epoch):
            out = torch.as_tensor(cupy.stack([read(s) for s in samples]), device="cuda")
            torch.cuda.synchronize()
            yield out

    for epoch in range(spec.epochs):
        n_timed = len(epoch_batches(spec, epoch)) - spec.warmup_batches
        time_epoch(spec, result, lambda e=epoch: batches(e), n_timed, len)
        yield
