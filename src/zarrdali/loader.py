"""``ZarrLoader``: the drop-in replacement for ``torch.utils.data.DataLoader``."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import zarr

from zarrdali.batch.backend import EpochRequest
from zarrdali.batch.epoch import EpochRun, release_frames
from zarrdali.batch.load import load_frames
from zarrdali.batch.static import read_static_fields
from zarrdali.cpu.epoch import daemonic_workers_message, resolve_workers
from zarrdali.cpu.pinning import check_pin_memory
from zarrdali.cpu.ring import BatchRing
from zarrdali.errors import ConfigError, LoaderClosedError, ProcessContextError
from zarrdali.lifetime import (
    LoaderResources,
    open_loaders,
    track_open,
    warn_inside_dataloader_worker,
)
from zarrdali.options import (
    GpuOptions,
    LoadingOptions,
    RemoteOptions,
    grouped_option_names,
    merge_option_groups,
    pair_option,
    path_or_object,
)
from zarrdali.paths import make_backend, resolve_device, traits_of
from zarrdali.sampling.augment import AUGMENTATIONS
from zarrdali.sampling.epochs import (
    EpochPlan,
    SampleGrid,
    Sampler,
    SampleSpec,
    SampleTable,
    Segment,
)
from zarrdali.sampling.ranks import process_group
from zarrdali.sampling.ranks import resolve as resolve_ranks
from zarrdali.sampling.resume import check_state, fingerprint, resume_point
from zarrdali.sampling.times import read_time_coordinate
from zarrdali.store.cf import channel_packing
from zarrdali.store.dims import check_dims_override
from zarrdali.store.missing import check_missing_options
from zarrdali.store.normalize import NormalizeArg, channel_stats
from zarrdali.store.open import StoreRef, check_plan_fits
from zarrdali.store.variables import resolve_variables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderSampler(Sampler):
    """A loader's sampler: the plan's :class:`~zarrdali.sampling.epochs.Sampler`, whose
    ``set_epoch`` sets its loader's epoch, as ``DistributedSampler.set_epoch``
    does a DataLoader's (PyTorch Lightning calls it at every epoch start, with
    its own epoch count: also right after a resume from a checkpoint)."""

    owner: weakref.ref | None = field(default=None, compare=False, repr=False)

    def set_epoch(self, epoch: int) -> None:
        loader = self.owner() if self.owner is not None else None
        if loader is not None:
            loader.set_epoch(epoch)

    def __reduce__(self):  # to worker processes: the plan's sampler alone
        return Sampler, tuple(getattr(self, f.name) for f in fields(Sampler))


class ZarrLoader:
    """Batches of space-time tiles from a Zarr v3 store, as a dict of torch tensors.

    A drop-in for ``torch.utils.data.DataLoader`` in a training loop: iterate it
    for the batches of an epoch, ``len()`` is the number of batches,
    ``set_epoch()``, ``state_dict()`` and ``load_state_dict()`` follow
    torch's conventions. A sample is a window of ``input_steps + target_steps``
    frames (``frame_step`` store steps apart) of every variable, cut at a
    spatial tile. Each batch holds:

    - ``batch["input"]``: float32 ``[B, input_steps, C, H, W]``, on the device;
    - ``batch["target"]``: float32 ``[B, target_steps, C, H, W]`` (only when
      ``target_steps > 0``);
    - ``batch["index"]``: int64 ``[B, 3]``, the ``(t0, y0, x0)`` of each sample
      in the store;
    - ``batch["augment"]`` (with ``augment``), ``batch["static"]`` (with
      ``static``), ``batch["time"]`` (where the store has a time coordinate),
      ``batch["input_mask"]`` and ``batch["target_mask"]`` (with ``masks``).

    ``batch["input"][i]`` equals ``stack([ds[v][t0 : t0 + input_steps *
    frame_step : frame_step, y0 : y0 + H, x0 : x0 + W] for v in variables],
    axis=1)`` (then normalized) with ``(t0, y0, x0) = batch["index"][i]`` and
    ``ds = xarray.open_zarr(store)``: values CF-decoded as xarray decodes them
    (``scale_factor``/``add_offset``, ``_FillValue``/``missing_value`` as NaN;
    ``decode_cf=False`` serves stored values, see ``zarrdali.store.cf``), axes found
    by their dimension names in any stored order (``dims`` names others; see
    ``zarrdali.store.dims``). A variable with a level axis contributes one channel
    per level, or per level chosen: ``variables=["t2m", ("t", [850, 500])]`` by
    the level coordinate's values, ``("t", {"isel": [0, 3]})`` by index
    (``zarrdali.store.variables``); the ``channels`` attribute names them. A chunk
    never written reads as the array's fill value.

    ``device="cpu"`` decodes with numcodecs in worker processes straight into
    shared-memory batch buffers that torch gets without a copy; the workers are
    spawned, so keep the training code under ``if __name__ == "__main__":``.
    ``device="cuda"`` reads with kvikIO, decodes with nvCOMP and assembles the
    batch in one kernel, handing it to torch through DALI (the ``cuda12`` or
    ``cuda13`` extra). Resources (threads, worker processes, buffers, CUDA
    streams) are released by ``close()``, by ``with``, or at interpreter exit.

    Example:
        ```python
        import zarrdali

        if __name__ == "__main__":
            loader = zarrdali.ZarrLoader(
                "era5.zarr", ["t2m", "u10"], input_steps=4, target_steps=2,
                tile=(128, 128), batch_size=8, shuffle=True, normalize="store",
            )
            with loader:
                for epoch in range(10):
                    loader.set_epoch(epoch)
                    for batch in loader:
                        ...
        ```

    Epochs, as torch's ``DataLoader``: every ``iter()`` serves the next epoch
    (a new order when shuffled) unless ``set_epoch()`` or
    ``load_state_dict()`` chose one; ``len()`` counts a whole epoch's
    batches, the last one shorter unless ``drop_last``. ``rank`` and
    ``world_size`` default to ``torch.distributed``'s, or to a launcher's
    environment (``torchrun``'s ``RANK``/``WORLD_SIZE``, Lightning's
    ``LOCAL_RANK``/``WORLD_SIZE``) where no process group exists yet. The CPU
    path's worker processes (``workers``; default one per core) and its batch
    buffers are kept from epoch to epoch (``persistent_workers=False``: started
    anew every epoch) until ``close()``, the end of a ``with`` block, the
    interpreter's exit, or the loader being dropped. ``pin_memory=True``
    page-locks the CPU path's batch buffers, so that
    ``batch["input"].to("cuda", non_blocking=True)`` copies asynchronously
    (ignored with a warning where CUDA is not available, as torch does). In a
    process forked from the one that made it (a forked torch ``DataLoader``
    worker) a loader on a local store starts its own threads at its next
    iteration (in-process if the process is daemonic); a GPU or remote loader
    raises ``ProcessContextError``: build loaders in the
    process that iterates them.

    Args:
        store: The Zarr v3 store: a local path (``~`` is expanded), a URL
            (``s3://``, ``gs://``, ``az://``, ``https://``; credentials in
            ``storage_options``), a ``zarr.Group``, a zarr ``Store`` (an
            Icechunk session's store, an ``FsspecStore``) or an obstore store.
            A NetCDF or GRIB file is not a Zarr store: convert it with
            ``zarrdali prepare``.
        variables: The array name, or a list of them, stacked as channels
            ``C`` in this order; an entry ``(name, levels)`` serves only the
            levels chosen, by the level coordinate's values (``("t", [850,
            500])``) or by index (``("t", {"isel": [0, 3]})``). Each array has
            a time, y and x axis and optionally a level axis, found by their
            dimension names in any order, on one grid. A dict or a set is
            refused (its order would decide the channels).
        input_steps: Frames of history per sample (``batch["input"]``), >= 1.
        target_steps: Frames after them served as ``batch["target"]``; 0
            leaves the key out.
        tile: The spatial tile ``(H, W)`` in grid points (an int ``n`` is
            ``(n, n)``); None serves the whole field.
        batch_size: Samples per batch. The last batch of an epoch is shorter
            unless ``drop_last``.
        shuffle: Serve the samples in a random order, a new one every epoch
            (see ``set_epoch()``), drawn from ``seed``; False serves them by
            time, then tile.
        seed: Seeds the order, random tile offsets and augmentations: the same
            seed and epoch give the same batches on every run and both paths.
        device: ``"cpu"`` (numpy and numcodecs, worker processes), ``"cuda"``
            (the GPU path; its libraries come with the ``cuda13`` or ``cuda12``
            extra and a missing one is named with how to install it) or
            ``"auto"`` (the GPU path where all it needs is present, else the
            CPU path).
        normalize: None serves the values unscaled; ``{variable: (mean,
            std)}`` serves ``(x - mean) / std`` in float32 (a sequence per
            level for a variable with levels); ``"store"`` takes them from each
            array's ``stats`` attribute, written by ``zarrdali stats`` (of the
            values served: decoded, or stored with ``decode_cf=False``).
        frame_step: Store time steps between consecutive frames of a sample
            (6 on hourly data: frames 6 hours apart).
        time_stride: Store time steps between the first frames of consecutive
            candidate windows (1: every step starts one).
        tile_stride: Grid points ``(dy, dx)`` between the origins of
            consecutive tiles of the regular grid (an int ``n`` is ``(n, n)``);
            None: the tile size, so tiles do not overlap.
        tile_sampling: ``"grid"``: tiles on the regular grid, the same set
            every epoch; ``"random"``: each sample's tile origin drawn anew
            every epoch, anywhere in the field (from ``seed`` and the epoch).
        cover_edges: Where the grid of tiles stops short of the field's far
            edge, add a row or column of tiles flush with that edge, so every
            grid point is served; False leaves the strip out.
        drop_last: Leave out each rank's last batch of an epoch when it is
            shorter than ``batch_size``, as torch's ``drop_last``.
        rank: This process's rank among ``world_size``. Default: from
            ``torch.distributed`` when it is initialized, else from a
            launcher's environment (``RANK``, ``LOCAL_RANK``), else 0.
        world_size: The number of ranks sharing each epoch: every rank serves
            a disjoint share, in the same number of batches. Default: from
            ``torch.distributed`` when it is initialized, else from
            ``WORLD_SIZE``, else 1.
        num_threads: Threads that read and decode in this process (the CPU
            path with ``workers=0``, the GPU path's host reads). Default: one
            per core. Worker processes read with one thread each.
        prefetch: Batches loaded ahead of the one the training loop holds,
            >= 1. The CPU path loads more where batches are small (a batch
            too small to give each worker 16 samples goes whole to one worker,
            and every worker gets about two in flight); its buffers hold about
            ``batch_size * (prefetch + 2)`` samples.
        workers: Worker processes of the CPU path, reading, decoding and
            assembling batches into shared memory. Default: one per core this
            process may run on (the environment variable ``ZARRDALI_WORKERS``
            overrides it); 0 loads in this process's threads. They need a store
            they can reopen: a path, a URL or a store object that pickles.
        dali_threads: CPU threads of the GPU path's DALI pipeline, which only
            slices, flips and turns the batch (1 is enough).
        index: A sampling index (the ``.samples.parquet`` file
            ``zarrdali index`` writes, or a ``SampleTable``): serve exactly its
            samples (drawn by weight where it has weights) instead of the
            regular grid. Its tile must be ``tile``.
        augment: ``"flip"`` and/or ``"rot90"``: random flips of rows and
            columns and quarter turns per sample, the same for input, target,
            masks and static fields, reported in ``batch["augment"]`` as int32
            ``[B, 3]`` (transpose, flip rows, flip columns). ``"rot90"`` needs a
            square tile.
        partial_decode: CPU path: decode a chunk only down to the last row a
            batch copies from it (zstd, gzip, uncompressed chunks). False
            decodes every chunk whole, so every compressor's own checks run
            over all of it.
        memory_map: CPU path, local stores: decode straight from memory maps
            of the files (about 10% less CPU per sample) instead of ``pread``
            copies. A file truncated while it is mapped kills the process
            (SIGBUS): only for stores nobody rewrites while they are read.
        storage_options: Credentials and endpoint of a URL store, obstore's
            names or fsspec's (``key``, ``secret``, ``endpoint_url``,
            ``client_kwargs``, ``anon``).
        cache_dir: A local folder where the byte ranges read from a remote
            store are kept (verified on every read, shared by processes and
            ranks), so later epochs read the network once. None: no cache.
        cache_bytes: Budget of ``cache_dir`` in bytes, least recently used
            entries evicted past it (default 8 GiB).
        max_in_flight: The most requests to a remote store in flight at once
            per process; the loader adapts below it to what the store sustains.
        request_timeout: Seconds a remote request may take in all, retries
            included, before its batch fails with ``ChunkError``.
        cache: ``"gpu"`` (GPU path): keep the chunks' compressed bytes in
            device memory after their first read, so later epochs read no file
            bytes. None: no device cache.
        cache_budget: Bytes of device memory for ``cache="gpu"``, least
            recently used chunks out past it (default: a quarter of the free
            device memory).
        static: Names of time-invariant arrays (``(y, x)`` or
            ``(level, y, x)``, on the variables' grid: land-sea mask,
            orography), read once, normalized like the variables and served as
            ``batch["static"]``, float32 ``[B, S, H, W]``, cut at each sample's
            tile with its flips and turns.
        time: ``batch["time"]``, int64 ``[B, T]``: each frame's time in
            nanoseconds since 1970-01-01, CF-decoded from the store's time
            coordinate. None: served where the store has one; True: required;
            False: left out.
        nan_fill: Replace every missing value of input and target (NaN, or a
            variable's CF ``_FillValue``/``missing_value``) by this finite
            number after normalization. None: served as they are.
        masks: Serve ``batch["input_mask"]`` and ``batch["target_mask"]``,
            bool, shaped like the frames, True where the value is valid.
        decode_cf: Serve the values as ``xarray.open_zarr`` shows them:
            ``scale_factor``/``add_offset`` applied, ``_FillValue`` and
            ``missing_value`` as NaN, ``_Unsigned`` integers unsigned. False
            serves the stored values (zarr-python's view).
        dims: Names of the dimensions that play the roles ``"time"``,
            ``"level"``, ``"y"`` and ``"x"`` where the store's names are not
            the usual ones (``time``, ``valid_time``, ``level``,
            ``isobaricInhPa``, ``lat``, ``latitude``, ``lon``, ``x``, ...),
            e.g. ``{"time": "forecast_time"}``.
        persistent_workers: Keep the CPU path's worker processes and batch
            buffers from epoch to epoch, as torch's ``persistent_workers``
            (the first batch of a later epoch then costs no process start);
            False starts them anew every epoch.
        pin_memory: Page-lock the CPU path's batch buffers, so that
            ``batch["input"].to("cuda", non_blocking=True)`` copies
            asynchronously (ignored with a warning where CUDA is not
            available, as torch does).
        loading: The loading options (``workers``, ``num_threads``,
            ``prefetch``, ``persistent_workers``, ``pin_memory``,
            ``partial_decode``, ``memory_map``) as one
            :class:`~zarrdali.LoadingOptions`, in place of the flat arguments.
        remote: The remote-store options (``storage_options``,
            ``cache_dir``, ``cache_bytes``, ``max_in_flight``,
            ``request_timeout``) as one :class:`~zarrdali.RemoteOptions`.
        gpu: The GPU path's options (``cache``, ``cache_budget``,
            ``dali_threads``) as one :class:`~zarrdali.GpuOptions`. A flat
            argument and its group's field both set to different values is
            a ``ConfigError``.

    Raises:
        ConfigError: An option that is invalid or that the store cannot
            satisfy; the message says which and how to fix it.
        StoreNotFoundError: The store does not exist or is not a Zarr group.
        StoreAccessError: The store refused access (credentials, permissions).
        VariableNotFoundError: A variable or static field is not in the store.
        MetadataError: An array's ``zarr.json`` is invalid or unsupported.
        BackendUnavailableError: ``device="cuda"`` where the GPU path lacks
            a library or a GPU; the message names what to install.
    """

    def __init__(
        self,
        store: str | os.PathLike | zarr.Group | Any,
        variables: Sequence[str | tuple[str, Any]] | str,
        input_steps: int = 1,
        target_steps: int = 0,
        tile: int | tuple[int, int] | None = None,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        device: str = "auto",
        normalize: NormalizeArg = None,
        *,
        frame_step: int = 1,
        time_stride: int = 1,
        tile_stride: int | tuple[int, int] | None = None,
        tile_sampling: str = "grid",
        cover_edges: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        num_threads: int | None = None,
        prefetch: int = 2,
        workers: int | None = None,
        dali_threads: int = 1,
        index: str | os.PathLike | SampleTable | None = None,
        augment: Sequence[str] = (),
        partial_decode: bool = True,
        memory_map: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int | None = None,
        max_in_flight: int = 64,
        request_timeout: float = 60.0,
        cache: str | None = None,
        cache_budget: int | None = None,
        static: Sequence[str] | str = (),
        time: bool | None = None,
        nan_fill: float | None = None,
        masks: bool = False,
        decode_cf: bool = True,
        dims: Mapping[str, str] | None = None,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        loading: LoadingOptions | None = None,
        remote: RemoteOptions | None = None,
        gpu: GpuOptions | None = None,
    ) -> None:
        # Everything is validated here, before any chunk is read.
        # The rarer options also come grouped; one value each from here on.
        args = locals()
        grouped = merge_option_groups(
            {"loading": loading, "remote": remote, "gpu": gpu},
            {name: args[name] for name in grouped_option_names()},
        )
        workers, num_threads, prefetch = (
            grouped[k] for k in ("workers", "num_threads", "prefetch")
        )
        persistent_workers, pin_memory = grouped["persistent_workers"], grouped["pin_memory"]
        partial_decode, memory_map = grouped["partial_decode"], grouped["memory_map"]
        storage_options, cache_dir = grouped["storage_options"], grouped["cache_dir"]
        cache_bytes, max_in_flight = grouped["cache_bytes"], grouped["max_in_flight"]
        request_timeout = grouped["request_timeout"]
        cache, cache_budget, dali_threads = (
            grouped[k] for k in ("cache", "cache_budget", "dali_threads")
        )
        store = path_or_object(store)
        if cache_dir is not None:
            cache_dir = os.path.expanduser(os.fspath(cache_dir))
        if isinstance(index, (str, os.PathLike)):
            index = os.path.expanduser(os.fspath(index))
        self.spec = SampleSpec(
            input_steps=input_steps,
            target_steps=target_steps,
            frame_step=frame_step,
            time_stride=time_stride,
            tile=pair_option("tile", tile),
            tile_stride=pair_option("tile_stride", tile_stride),
            tile_sampling=tile_sampling,
            cover_edges=cover_edges,
        )
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1 request, got {max_in_flight}.")
        if not request_timeout > 0:
            raise ConfigError(f"request_timeout must be > 0 seconds, got {request_timeout}.")
        # How this process and DALI's worker processes open the store.
        self.store_ref = StoreRef(
            store,
            storage_options=dict(storage_options) if storage_options else None,
            cache_dir=cache_dir,
            cache_bytes=cache_bytes,
            max_in_flight=max_in_flight,
            request_timeout=request_timeout,
        )
        self.group, self.store_name = self.store_ref.open_group()
        if not isinstance(decode_cf, (bool, np.bool_)):
            raise ConfigError(f"decode_cf must be True or False, got {decode_cf!r}.")
        self.decode_cf = bool(decode_cf)
        # Which arrays and levels are channels, their axes found by name.
        self.selection, self.layouts, self.channels = resolve_variables(
            variables, self.group, self.store_name, check_dims_override(dims), self.decode_cf
        )
        self.variables = list(self.selection.names)
        first = self.layouts[0]
        n_time, (ny, nx) = first.n_time, first.grid_shape
        self.candidates: SampleGrid | SampleTable
        h, w = self.spec.tile or (ny, nx)
        channels = sum(layout.n_levels for layout in self.layouts)
        check_plan_fits(  # before any of it is allocated
            self.store_name,
            self.layouts,
            SampleGrid.count(self.spec, n_time, ny, nx) if index is None else 0,
            # float32 frames, and a bool mask per value with masks
            batch_size * self.spec.n_frames * channels * h * w * (5 if masks is True else 4),
            max(prefetch, 1) + 2,
        )
        if index is None:
            self.candidates = SampleGrid(self.spec, n_time, ny, nx)
        else:
            self.candidates = self._sample_table(index, n_time, ny, nx)
        # torch.distributed, else a launcher's environment; unbound (0 of 1 for
        # now): asked again when an epoch starts (a process group made later)
        ranks = resolve_ranks(rank, world_size)
        self._ranks_bound = ranks.bound
        self.sampler = LoaderSampler(
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            rank=ranks.rank,
            world_size=ranks.world_size,
            owner=weakref.ref(self),
        )
        if ranks.source:
            log.info("zarrdali: rank %d of %d from %s", ranks.rank, ranks.world_size, ranks.source)
        self.stats = channel_stats(normalize, self.layouts, self.store_name, self.decode_cf)
        # Missing values: NaN and the variables' CF missing values (None: not checked),
        # served as NaN with decode_cf; CF unpacking per channel (None: none packed).
        self.missing = check_missing_options(
            nan_fill, masks, self.layouts, self.store_name, self.decode_cf
        )
        self.packing = channel_packing(self.layouts, self.store_name) if self.decode_cf else None
        # Static fields and the time coordinate: read once, here.
        self.static = (
            read_static_fields(
                self.group,
                self.store_name,
                static,
                self.layouts,
                normalize,
                decode_cf=self.decode_cf,
                dims=check_dims_override(dims),
            )
            if static
            else None
        )
        self.times = read_time_coordinate(self.group, self.store_name, first, time)
        self.augment = self._check_augment(augment)
        if prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1 batch, got {prefetch}.")
        self.prefetch = prefetch
        self.dali_threads = dali_threads
        self.device = resolve_device(device)
        self.traits = traits_of(self.device)  # what the path declares
        self.partial_decode = partial_decode
        self.memory_map = memory_map
        self._workers_auto = workers is None
        self.workers = resolve_workers(workers, store, self.traits, self.batch_size, self.prefetch)
        self.persistent_workers = bool(persistent_workers)
        # page-locked batch buffers on the CPU path (the GPU path's batches are on
        # the device); without CUDA a warning, as torch's DataLoader gives
        self.pin_memory = bool(pin_memory) and self.traits.host_batches and check_pin_memory()
        # How the backend is made: again in a process forked from this one.
        # (the byte source from self.store_ref)
        self._backend_options = dict(
            num_threads=num_threads, cache=cache, cache_budget=cache_budget
        )
        # Everything that outlives an epoch: released by close(), or when the loader
        # is dropped (the finalizer), never in a process forked from this one.
        self._resources = LoaderResources(f"{self!r}")
        backend = self._resources.backend = self._make_backend()
        self._remote = bool(backend.remote)
        if self._remote:
            try:
                backend.probe(self.layouts)  # access errors now, not mid-epoch
            except BaseException:
                self._resources.release("the loader could not be made")
                raise
        # The GPU path cuts the static fields in device memory; close() frees them.
        if self.static is not None:
            try:
                self._resources.device_static = backend.hold_static(self.static)
            except BaseException:
                self._resources.release("the loader could not be made")
                raise
        self._closed = False
        self._warned_dataloader_worker = False
        self._finalizer = weakref.finalize(
            self, self._resources.release, "the loader was dropped without close()"
        )
        self._finalizer.atexit = False  # the exit hook closes loaders in its order
        track_open(self, uses_dali=self.traits.uses_dali)
        self._epoch = 0
        # The next iteration serves self._epoch (a new loader, set_epoch, a state
        # loaded); else the one after it, as torch reshuffles on every iter().
        self._epoch_chosen = True
        self._served = 0  # batches handed to the user in the current epoch
        self._resume_from = 0
        # Parts of the current epoch served at other world sizes (elastic resume):
        # those of the state loaded, and those the running iteration serves after.
        self._resume_segments: list[Segment] = []
        self._segments: list[Segment] = []

    def _check_augment(self, augment: Sequence[str]) -> tuple[str, ...]:
        augment = (augment,) if isinstance(augment, str) else tuple(augment)
        unknown = [a for a in augment if a not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"unknown augmentation(s) {unknown}; choose from {AUGMENTATIONS}.")
        h, w = self.candidates.tile_hw
        if "rot90" in augment and h != w:
            raise ConfigError(
                f"augment='rot90' needs a square tile (a quarter turn swaps H and W), "
                f"got {(h, w)}; use 'flip' or a square tile."
            )
        return augment

    def _sample_table(self, index, n_time: int, ny: int, nx: int) -> SampleTable:
        """The samples an index lists, checked against this store and window."""
        if not isinstance(index, SampleTable):
            from zarrdali.prep.sample_index import load_sample_index

            index = load_sample_index(index, self.store_name, self.layouts, self.spec)
        if self.spec.tile is not None and tuple(index.tile_hw) != tuple(self.spec.tile):
            raise ConfigError(
                f"{index.source} lists tiles of {index.tile_hw} but the loader asks for "
                f"tile={self.spec.tile}; build the index for this tile or pass its tile."
            )
        index.check_bounds(self.spec, n_time, ny, nx)
        return index

    def _make_backend(self) -> Any:
        """The backend (threads, and CUDA resources) with its byte source; made
        here, and again in a process forked from this one. Both backends read
        remote stores through the source (the GPU backend into pinned memory,
        then one copy per batch to the device)."""
        opts = self._backend_options
        source = self.store_ref.make_source(self.group, self.store_name)
        try:
            return make_backend(
                self.device,
                self.group,
                self.store_name,
                opts["num_threads"],
                self.partial_decode,
                source=source,
                memory_map=self.memory_map,
                cache=opts["cache"],
                cache_budget=opts["cache_budget"],
            )
        except BaseException:
            source.close()  # the backend owns it once made
            raise

    @property
    def backend(self) -> Any:
        """The backend that reads, decodes and assembles batches in this process."""
        backend = self._resources.backend
        if backend is None:
            self._ready_in_this_process()
            backend = self._resources.backend
        return backend

    @backend.setter
    def backend(self, backend: Any) -> None:  # a wrapped backend (tests); close() closes it
        self._resources.backend = backend

    @property
    def _ring(self) -> BatchRing | None:
        """The CPU path's batch buffers: made at the first epoch, reused by the
        next ones (no page faults again), released by close()."""
        return self._resources.ring

    # -- torch conventions -------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Samples per batch (the last batch of an epoch may hold fewer)."""
        return self.sampler.batch_size

    @property
    def num_channels(self) -> int:
        """Channels ``C`` of a frame: one per variable, one per level of a variable with levels."""
        return sum(layout.n_levels for layout in self.layouts)

    def __len__(self) -> int:
        """Batches of a whole epoch on this rank (as torch's DataLoader counts them)."""
        self._bind_ranks()
        per_rank = len(self.candidates) // self.sampler.world_size
        if self.sampler.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch being served, or the last one served (``set_epoch``'s, or counted
        up by each iteration)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch``'s order (and random tile offsets, augmentations) at the
        next iteration; the iterations after it count on from there.

        Without it every new ``iter()`` serves the next epoch, as torch's
        ``DataLoader(shuffle=True)`` reshuffles on every ``iter()``: a new order
        each time, also after a ``break``. Setting the epoch the loader's state
        was loaded at (``load_state_dict()``) keeps the resume point.

        Args:
            epoch: The epoch number, usually the training loop's counter
                (0, 1, 2, ...); the same on every rank.
        """
        epoch = int(epoch)
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}.")
        if epoch != self._epoch:
            self._resume_from = 0
            self._served = 0
            self._resume_segments = self._segments = []
        self._epoch = epoch
        self._epoch_chosen = True

    def _begin_epoch(self) -> None:
        """At the start of an iteration: the epoch chosen, else the next one."""
        self._bind_ranks()
        if not self._epoch_chosen:
            self._epoch += 1
            self._resume_from = 0
            self._served = 0
            self._resume_segments = self._segments = []
        self._epoch_chosen = False

    def _bind_ranks(self) -> None:
        """A loader that found no rank when it was made takes the process group's
        once there is one (built before ``init_process_group`` or ``Trainer.fit``)."""
        if self._ranks_bound:
            return
        found = process_group()
        if found is None:
            return
        self._ranks_bound = True
        if found != (self.sampler.rank, self.sampler.world_size):
            log.info("zarrdali: rank %d of %d from torch.distributed", *found)
            self.sampler = replace(self.sampler, rank=found[0], world_size=found[1])

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands, to save with a checkpoint and resume exactly.

        Ranks step in lockstep (as under DDP), so every rank's state is the same
        but for ``rank``: any one of them resumes all ranks, at this or another
        world size. The state counts the batches handed to the training loop,
        not those loaded ahead.

        Returns:
            A dict of plain Python values (it pickles and serializes to JSON):
                ``epoch``, ``batches_served`` (batches of that epoch handed out so
                far), ``seed``, ``batch_size``, ``rank``, ``world_size``,
                ``num_candidates``, ``segments`` (the ``[world_size, batches]``
                served of this epoch at earlier world sizes) and ``fingerprint``
                (what decides the samples, checked by ``load_state_dict()``).
        """
        self._bind_ranks()
        return {
            "epoch": self._epoch,
            "batches_served": self._served,
            "seed": self.sampler.seed,
            "batch_size": self.batch_size,
            "rank": self.sampler.rank,
            "world_size": self.sampler.world_size,
            "num_candidates": len(self.candidates),
            "segments": [[seg.world_size, seg.batches] for seg in self._segments],
            "fingerprint": fingerprint(self.layouts, self.spec, self.sampler, self.candidates),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume exactly after the last batch served when ``state`` was taken.

        The next iteration serves the rest of the state's epoch; the epochs
        after it are whole epochs.

        At another ``world_size`` than the state's, the samples of its epoch
        that the old ranks had not served are served once each across the new
        ranks, in the same number of batches on every rank (batches may be
        smaller than ``batch_size``; with ``drop_last`` only full batches, the
        rest left out, and with ``batch_size=1`` or fewer samples left than
        ranks, the few that cannot be split evenly). Later epochs are whole
        epochs at the new world size.

        Args:
            state: A dict from ``state_dict()``, of this loader or of any
                rank of the same job (also at another world size).

        Raises:
            ConfigError: The state was saved for another seed, store, sample
                spec or batch size (the message lists what differs), or is
                not a state of this loader.
        """
        check_state(state, self.state_dict())
        self._epoch = int(state["epoch"])
        self._resume_segments, self._resume_from = resume_point(state, self.sampler.world_size)
        # state_dict() before the next iteration says the same
        self._segments, self._served = self._resume_segments, self._resume_from
        # The next iteration serves the rest of the state's epoch, or the next epoch
        # where nothing is left of it (a state saved at the end of an epoch).
        self._epoch_chosen = len(self.epoch_plan()) > self._resume_from

    # -- iteration ---------------------------------------------------------
    def epoch_plan(self, epoch: int | None = None) -> EpochPlan:
        """The samples this rank serves in an epoch, batch by batch, without reading.

        Args:
            epoch: The epoch (default: the one the next iteration serves,
                resume point included).

        Returns:
            The plan: ``len(plan)`` batches, ``plan.batch(k)`` the ``[B, 3]``
                ``(t0, y0, x0)`` of batch ``k``.
        """
        resumed: list[Segment] = []
        if epoch is None:
            epoch, resumed = self._epoch, self._resume_segments
        samples = self.candidates.samples(self.sampler.seed, epoch)
        return self.sampler.epoch_plan(samples, epoch, resumed)

    def load_batch(self, samples: np.ndarray) -> Any:
        """Read, decode and assemble the samples' windows, outside an epoch.

        Args:
            samples: int64 ``[B, 3]`` array of ``(t0, y0, x0)``, as
                ``batch["index"]`` or ``epoch_plan()`` give them.

        Returns:
            The windows ``[B, input_steps + target_steps, C, H, W]`` in the
                stored dtype (not normalized): a numpy array on the CPU path,
                a device array on the GPU path.
        """
        return self._load_frames(samples, split=False)[0]

    def _load_frames(self, samples, split: bool = True, **device_args) -> tuple[Any, ...]:
        """The frames as the pipeline takes them: ``(input, target)`` when the
        backend assembles them apart (so DALI need not slice), else ``(window,)``.
        ``device_args`` (``out_for``, ``stream``) come from a device batch source."""
        split = split and not self.backend.whole_window
        tile_hw = self.candidates.tile_hw
        return load_frames(
            self.backend, self.layouts, self.spec, tile_hw, samples, split, **device_args
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The batches of an epoch: at its first ``next()``, the epoch chosen by
        ``set_epoch()`` or ``load_state_dict()`` (the rest of it), else the
        epoch after the last one started, as torch's ``DataLoader`` serves a new
        order at every ``iter()``.

        The epoch's threads, pipeline (and worker processes or CUDA streams)
        are created at the first ``next()`` and released when the epoch ends:
        when it is exhausted, when the iterator is closed or dropped (``break``,
        an exception in the loop), when loading fails, when the next epoch of
        this loader starts, or by ``close()``; worker processes and the
        buffers batches are made in are kept for the next epoch
        (``persistent_workers``).
        """
        if self._closed:
            raise LoaderClosedError(
                f"{self!r} is closed: it released its threads, pipeline and buffers; "
                "create a new ZarrLoader to iterate again."
            )
        return self._serve()

    def _serve(self) -> Iterator[dict[str, Any]]:
        # Decided at the first next(), not at iter(): an iterator never started
        # (Lightning calls iter() once to check a loader) does not count.
        self._begin_epoch()
        plan = self.epoch_plan()
        start = self._resume_from
        self._resume_from = 0
        self._served = start
        self._segments, self._resume_segments = self._resume_segments, []
        n = len(plan) - start
        if n <= 0:
            return
        self._ready_in_this_process()
        self._resources.close_live_epoch("a new epoch of the same loader started")
        run: EpochRun | None = EpochRun(f"epoch {self._epoch} of {self!r}")
        self._resources.live_epoch = weakref.ref(run)
        try:
            self._open_epoch(run, plan, start, n)
            for batch in run:
                self._served += 1
                yield batch
        except GeneratorExit:  # closed or dropped by the user: released below
            raise
        except BaseException as err:
            # Worker processes, threads and buffers are released before it propagates.
            run.close(f"loading failed ({type(err).__name__})")
            run = None
            release_frames(err)
            raise
        finally:
            # Reached by exhaustion, and by close() of this generator when it is
            # broken off: reference counting closes a dropped generator at once.
            if run is not None:
                run.close("the epoch ended")
            run = None

    def _open_epoch(self, run: EpochRun, plan: EpochPlan, start: int, n: int) -> None:
        """Have the backend build the epoch's pieces into ``run``."""
        served_before = sum(seg.batches for seg in self._segments)
        request = EpochRequest(
            plan=plan,
            start=start,
            n=n,
            epoch=self._epoch,
            # batches numbered through the epoch, across world sizes (augmentation draws)
            first_batch=start + served_before,
            segments=tuple(self._segments),
            layouts=tuple(self.layouts),
            spec=self.spec,
            tile_hw=tuple(self.candidates.tile_hw),
            batch_size=self.batch_size,
            prefetch=self.prefetch,
            stats=self.stats,
            missing=self.missing,
            packing=self.packing,
            augment=self.augment,
            seed=self.sampler.seed,
            static=self.static,
            times=self.times,
            resources=self._resources,
            store_ref=self.store_ref,
            selection=self.selection,
            candidates=self.candidates,
            sampler=self.sampler,
            workers=self.workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            partial_decode=self.partial_decode,
            memory_map=self.memory_map,
            num_channels=self.num_channels,
            dali_threads=self.dali_threads,
        )
        self.backend.open_epoch(request, run)

    # -- lifetime ----------------------------------------------------------
    def close(self) -> None:
        """Release the live epoch (pipeline, threads, CUDA streams and buffers),
        the worker processes, the batch buffers (unmapped once the user drops the
        batches still held), then the backend. Idempotent; a closed loader cannot
        be iterated. Also called by ``with``, at interpreter exit, and (by a
        finalizer) when the loader is dropped without it."""
        if self._closed:
            return
        self._closed = True
        open_loaders.discard(self)
        self._finalizer.detach()
        self._resources.release(f"{self!r} was closed")

    def __reduce__(self):
        raise ProcessContextError(
            f"{self!r} cannot be sent to another process (pickled): its threads, batch "
            "buffers and worker processes belong to this one. Build the loader in the "
            "process that iterates it (in a Dataset's __iter__ or a worker_init_fn), or "
            "iterate the ZarrLoader itself in place of a torch DataLoader: it loads "
            "batches in its own worker processes."
        )

    def _ready_in_this_process(self) -> None:
        """In a process forked from the one that made the loader (its resources set
        aside there): make a new backend, or say why it cannot be."""
        res = self._resources
        if self._closed:
            raise LoaderClosedError(
                f"{self!r} is closed: it released its threads, pipeline and buffers; "
                "create a new ZarrLoader to iterate again."
            )
        if res.backend is None:
            where = (
                f"{self!r} was made in process {res.forked_from} and is used in process "
                f"{os.getpid()}, forked from it"
            )
            if not self.traits.forkable:
                raise ProcessContextError(
                    f"{where}: CUDA cannot be used in a forked process. Build the loader "
                    "in the process that iterates it, or start that process with 'spawn' "
                    "(a torch DataLoader's multiprocessing_context='spawn')."
                )
            if self._remote:
                raise ProcessContextError(
                    f"{where}: the clients of a remote store (their threads and "
                    "connections) do not survive os.fork(). Build the loader in the "
                    "process that iterates it, or start that process with 'spawn'."
                )
            res.backend = self._make_backend()
            log.info("zarrdali: %s: a new backend in this process", where)
            if self.pin_memory:
                self.pin_memory = False
                warnings.warn(
                    f"{where}: CUDA cannot be used in a forked process, so its batch "
                    "buffers are not page-locked (pin_memory) here.",
                    UserWarning,
                    stacklevel=4,
                )
        if self.workers and multiprocessing.current_process().daemon:
            if not self._workers_auto:
                raise ProcessContextError(daemonic_workers_message(self.workers))
            log.info("zarrdali: a daemonic process has no children: loading in-process")
            self.workers = 0
            ring, res.ring = res.ring, None  # a shared ring for workers no more
            if ring is not None:
                ring.close()
        warn_inside_dataloader_worker(self)

    def __enter__(self) -> ZarrLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ZarrLoader({self.store_name!r}, variables={self.variables}, "
            f"spec={self.spec}, batch_size={self.batch_size}, device={self.device!r}, "
            f"batches={len(self)})"
        )
