"""One epoch of the GPU path: a feed of device buffers and a DALI pipeline on the device.

The backend's own batch source (threads, side streams, events, a ring of
device buffers: :class:`~zarrdali.gpu.feed.CudaFeed`) feeds a DALI external
source; the pipeline slices input and target, flips and turns; DALI's iterator
hands the batches to torch. A backend that finishes batches in its gather (the
GPU backend) casts, normalizes, decodes CF packing and masks there.

What a backend must offer to run such an epoch is :class:`DaliSource`
(``GpuBackend`` has it from :class:`~zarrdali.gpu.epoch.CudaSourceRole`).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from zarrdali.batch.backend import EpochRequest, LoadFn, PathTraits, batch_dtype
from zarrdali.batch.epoch import BoolMasks, EpochRun, SourceHandle
from zarrdali.batch.finish import Finish, finish_of
from zarrdali.batch.load import load_frames
from zarrdali.batch.static import StaticTiles
from zarrdali.errors import ConfigError
from zarrdali.gpu.feed import CudaFeed, FeedStreams
from zarrdali.gpu.pipeline import BatchSource, build_pipeline
from zarrdali.gpu.static import DeviceStaticFields, DeviceStaticTiles
from zarrdali.sampling.times import FrameTimes


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


class DaliSource(Protocol):
    """What a backend offers for its batches to reach torch through DALI."""

    dali_device: str  # where the pipeline's operators run: "cpu" or "gpu"
    whole_window: bool  # a batch is one window the pipeline slices into input and target
    finishes_in_gather: bool  # casts, normalizes, decodes and masks while it assembles

    def dali_device_id(self) -> int | None:
        """The ``device_id`` of the DALI pipeline (None: a CPU-only pipeline)."""

    def batch_source(
        self, load: LoadFn, n_batches: int, *, depth: int, batch_size: int
    ) -> EpochSource:
        """A new source of one epoch's ``n_batches`` batches, ``depth`` loaded ahead."""


def open_dali_epoch(backend: Any, request: EpochRequest, run: EpochRun) -> None:
    """Build the epoch's feed, DALI pipeline and iterator into ``run``."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    plan, start, n, spec = request.plan, request.start, request.n, request.spec
    with_target = spec.target_steps > 0
    finish = gather_finish(backend, request)
    masks = request.masks
    split = not backend.whole_window

    def load(k: int, **device_args):
        samples = plan.batch(start + k)
        if finish is not None:
            device_args.update(finish=finish, masks=masks)
        frames = load_frames(
            backend, request.layouts, spec, request.tile_hw, samples, split, **device_args
        )
        return frames, samples

    feed = run.feed = backend.batch_source(
        load, n, depth=request.prefetch, batch_size=request.batch_size
    )
    extras, device_extras, extra_names = batch_extras(request, feed)
    run.source = BatchSource(
        feed.get,
        n,
        spec.input_steps,
        with_target,
        augment=request.augment,
        seed=request.seed,
        epoch=request.epoch,
        first_batch=request.first_batch,
        extras=extras,
        device_extras=device_extras,
    )
    run.source_handle = SourceHandle(run.source)
    run.pipeline = build_pipeline(
        run.source_handle,
        batch_size=request.batch_size,
        input_steps=spec.input_steps,
        with_target=with_target,
        stats=None if finish is not None else request.stats,
        input_dtype=np.float32 if finish is not None else batch_dtype(request.layouts),
        device_id=backend.dali_device_id(),
        num_threads=request.dali_threads,
        prefetch_queue_depth=request.prefetch,
        device=backend.dali_device,
        augment=request.augment,
        samples_of=lambda k: plan.batch(start + k),
        cuda_stream=getattr(run.feed, "cuda_stream", None),
        whole_window=backend.whole_window,
        n_extras=len(extras),
        n_device_extras=len(device_extras),
        masks=masks,
    )
    run.pipeline.build()
    frame_names = ["input", "target"] if with_target else ["input"]
    mask_names = [f"{name}_mask" for name in frame_names] if masks else []
    meta_names = ["index", *(["augment"] if request.augment else [])]
    iterator = DALIGenericIterator(
        run.pipeline,
        [*frame_names, *mask_names, *meta_names, *extra_names],
        auto_reset=False,
        last_batch_policy=LastBatchPolicy.PARTIAL,
    )
    run.batches = BoolMasks(iterator, mask_names) if masks else iterator


def gather_finish(backend: Any, request: EpochRequest) -> Finish | None:
    """What a backend that finishes batches in its gather applies (statistics,
    missing values, CF packing; no flags: DALI augments); None for one that does not."""
    if not backend.finishes_in_gather:
        if request.missing is not None or request.packing is not None:
            raise ConfigError(
                f"masks, nan_fill and CF decoding need the CPU path or the GPU backend; "
                f"the {type(backend).__name__} backend does not do them "
                f"(decode_cf=False serves stored values)."
            )
        return None
    mean, std = request.stats if request.stats is not None else (None, None)
    return finish_of(mean, std, request.missing, request.packing)


def batch_extras(request: EpochRequest, feed: Any) -> tuple[list, list, list[str]]:
    """Outputs computed per batch from its samples (see ``BatchSource``):
    host ones, device ones (the GPU pipeline's), and all their names."""
    host: dict[str, Any] = {}
    device: dict[str, Any] = {}
    if request.static is not None:
        tile_hw = tuple(request.tile_hw)
        device_static = request.resources.device_static
        if device_static is not None:
            stream_of = lambda: feed.stream  # noqa: E731  (the feed DALI copies on)
            device["static"] = DeviceStaticTiles(device_static, tile_hw, stream_of)
        else:
            host["static"] = StaticTiles(request.static, tile_hw)
    if request.times is not None:
        host["time"] = FrameTimes.for_spec(request.times, request.spec)
    # the pipeline's outputs: host extras, then device ones (build_pipeline)
    return list(host.values()), list(device.values()), [*host, *device]


GPU_TRAITS = PathTraits(
    device="cuda", host_batches=False, worker_processes=False, forkable=False, uses_dali=True
)


class CudaSourceRole:
    """What a CUDA backend tells the loader: DALI runs on the backend's GPU
    (``device_id``), a batch is one window (the pipeline slices input and
    target on the device), and each epoch's batches come from a
    :class:`CudaFeed` on the backend's :class:`FeedStreams` (``feed_streams``,
    made by the backend and closed by it). ``GpuBackend`` takes it as a base
    class."""

    traits = GPU_TRAITS
    dali_device = "gpu"
    whole_window = True
    device_id: int
    feed_streams: FeedStreams

    def dali_device_id(self) -> int:
        return self.device_id

    def hold_static(self, static: Any) -> Any:
        """The static fields in this GPU's memory, cut per batch on the feed stream
        (None where the pipeline runs on the CPU: cut from the host copy)."""
        if self.dali_device != "gpu":
            return None
        return DeviceStaticFields(static, self.device_id)

    def open_epoch(self, request: EpochRequest, run: Any) -> None:
        """A feed of device buffers and a DALI pipeline on this GPU (gpu/epoch.py)."""
        open_dali_epoch(self, request, run)

    def batch_source(self, load: LoadFn, n_batches: int, *, depth: int, batch_size: int):
        return CudaFeed(
            load, n_batches, depth=depth, batch_size=batch_size, streams=self.feed_streams
        )
