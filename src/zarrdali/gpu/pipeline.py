"""The DALI side: an external source fed by zarrdali, cast and normalize, iterator.

The source is a callable taking DALI's ``BatchInfo`` so it is stateless with
respect to DALI (batch ``info.iteration`` of the epoch is a pure function of the
plan), which is what DALI checkpointing needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from zarrdali.sampling.augment import draw_augmentations

# A per-batch output computed from the batch's samples [B, 3] and flags [B, 3] (or None).
Extra = Callable[[np.ndarray, "np.ndarray | None"], Any]


class BatchSource:
    """DALI external source: batch ``k`` of an epoch plan, as dense arrays.

    ``fetch(k)`` returns ``(frames, samples [B, 3])``, where ``frames`` is
    ``(input, target)`` (``[B, T_in, C, H, W]`` and ``[B, T_out, C, H, W]``,
    assembled apart so DALI need not slice them) or ``(window,)`` (the whole
    ``[B, T, C, H, W]``; the pipeline slices it). Outputs: the frames, the
    samples, and with augmentations each sample's flags (see
    :func:`draw_augmentations`).

    ``extras``: further outputs computed per batch from the samples and flags
    (``extra(samples, flags) -> array``; ``flags`` None without
    augmentations), after the flags: static tiles, timestamps. They run where
    the source runs and are host arrays.
    ``device_extras`` are the same for the GPU pipeline's device source: they
    follow the frames out of :meth:`frames_only`, as device arrays.
    """

    def __init__(
        self,
        fetch: Callable[[int], tuple[tuple[Any, ...], np.ndarray]],
        n_batches: int,
        input_steps: int,
        with_target: bool,
        augment: tuple[str, ...] = (),
        seed: int = 0,
        epoch: int = 0,
        first_batch: int = 0,
        extras: Sequence[Extra] = (),
        device_extras: Sequence[Extra] = (),
    ) -> None:
        self._fetch = fetch
        self._extras = tuple(extras)
        self._device_extras = tuple(device_extras)
        self._n = n_batches
        self._input_steps = input_steps
        self._with_target = with_target
        self._augment = augment
        self._seed, self._epoch, self._first = seed, epoch, first_batch

    def __call__(self, info) -> tuple:
        """All outputs of batch ``info.iteration``: frames, index (and flags)."""
        k = self._check(info)
        frames, samples = self._fetch(k)
        return (*frames, *self._meta(samples, k))

    def frames_only(self, info) -> tuple:
        """The frames alone (the GPU pipeline feeds them from a GPU external source)."""
        k = self._check(info)
        frames, samples = self._fetch(k)
        if not self._device_extras:
            return tuple(frames)
        flags = self._flags(samples, k)
        return (*frames, *(extra(samples, flags) for extra in self._device_extras))

    def meta_only(self, samples_of: Callable[[int], np.ndarray]) -> Callable:
        """A CPU source of index (and flags), computed from the plan without data."""

        def meta(info) -> tuple:
            k = self._check(info)
            return tuple(self._meta(samples_of(k), k))

        return meta

    def _check(self, info) -> int:
        if info.iteration >= self._n:
            raise StopIteration
        return info.iteration

    def _flags(self, samples: np.ndarray, k: int) -> np.ndarray | None:
        if not self._augment:
            return None
        return draw_augmentations(
            self._augment, len(samples), self._seed, self._epoch, self._first + k
        )

    def _meta(self, samples: np.ndarray, k: int) -> list:
        outputs = [np.ascontiguousarray(samples)]
        flags = self._flags(samples, k)
        if flags is not None:
            outputs.append(flags)
        outputs += [extra(samples, flags) for extra in self._extras]
        return outputs


def build_pipeline(
    source: BatchSource,
    *,
    batch_size: int,
    input_steps: int,
    with_target: bool,
    stats: tuple[np.ndarray, np.ndarray] | None,
    input_dtype: np.dtype,
    device_id: int | None,
    num_threads: int = 1,
    prefetch_queue_depth: int = 2,
    device: str = "cpu",
    augment: tuple[str, ...] = (),
    samples_of: Callable[[int], np.ndarray] | None = None,
    cuda_stream: Any = None,
    whole_window: bool | None = None,
    n_extras: int = 0,
    n_device_extras: int = 0,
    masks: bool = False,
):
    """A DALI pipeline: external source → float32 → per-channel ``(x - mean) / std``.

    The source gives ``(input, target)`` frames apart (``(input,)`` without
    target steps), or with ``whole_window`` (default: on the GPU) one window
    that the pipeline slices.

    The cast is skipped when the store is float32 already; DALI fuses the
    arithmetic into one operator, so normalizing costs one pass over the batch.
    (The CPU path does not come here: its batches are finished as they are
    assembled, see :mod:`zarrdali.batch.finish`; this pipeline serves the
    GPU path, and on the CPU the tests that run the GPU path's shape.)

    ``device="gpu"`` (UNVERIFIED without a GPU): the frames come from a GPU
    external source (CuPy arrays, copied by DALI on ``cuda_stream`` when fed:
    ``no_copy=False``), index and
    flags from a CPU one computed by ``samples_of(k)``; operators run on the GPU
    and the index is moved there too.

    ``n_extras`` (host) and ``n_device_extras`` (device, GPU pipeline only)
    outputs of the source (:class:`BatchSource`) pass through unchanged, after
    the index and flags: outputs ``(*frames, index, [flags], *extras,
    *device_extras)``.

    ``masks`` (with ``whole_window``: the GPU path's): the source gives
    the window's uint8 validity mask after the window (the backend made both
    in its gather, already finished: pass ``stats=None`` and float32); it is
    sliced, flipped and turned as the frames are and follows them:
    ``(*frames, *masks, index, ...)``.
    """
    from nvidia.dali import fn, pipeline_def, types

    needs_cast = np.dtype(input_dtype) != np.float32
    if whole_window is None:
        whole_window = device == "gpu"
    if masks and not whole_window:
        raise ValueError("masks come with the GPU path's window (the CPU path has no DALI)")
    n_windows = 1 + masks  # the window, and its mask

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch_queue_depth,
        exec_dynamic=True,
        enable_conditionals=bool(augment),
    )
    def zarr_pipeline():
        n_meta = 1 + bool(augment) + n_extras
        # Input and target come as separate arrays, or as one window sliced here
        # (on the device, for the GPU source).
        n_frames = 2 if with_target and not whole_window else 1
        if device == "gpu":
            frames = fn.external_source(
                source=source.frames_only,
                num_outputs=n_windows + n_device_extras,
                batch=True,
                batch_info=True,
                device="gpu",
                layout=["FCHW"] * n_windows + [None] * n_device_extras,
                cuda_stream=cuda_stream,
                # DALI copies the batch into its own buffer on `cuda_stream` as it is
                # fed, so the feed may reuse ours once that copy has run (feed.py).
                no_copy=False,
            )
            meta = fn.external_source(
                source=source.meta_only(samples_of),
                num_outputs=n_meta,
                batch=True,
                batch_info=True,
                device="cpu",
            )
            device_extras = list(frames[n_windows:])
            mask_outs = list(frames[1:n_windows])
            outs = [frames[0], *meta]
        else:
            outs = fn.external_source(
                source=source,
                num_outputs=n_frames + masks + n_meta,
                batch=True,
                batch_info=True,
                device=device,
                layout=["FCHW"] * (n_frames + masks) + [None] * n_meta,
            )
            mask_outs = list(outs[n_frames : n_frames + masks])
            outs = [*outs[:n_frames], *outs[n_frames + masks :]]
        frames, rest = list(outs[:n_frames]), list(outs[n_frames:])
        if with_target and n_frames == 1:  # one window: slice input and target apart
            frames = [frames[0][0:input_steps], frames[0][input_steps:]]
            if masks:
                mask_outs = [mask_outs[0][0:input_steps], mask_outs[0][input_steps:]]
        n_out = len(frames)
        if masks:  # the frames' masks: sliced, flipped and turned as they are
            frames += mask_outs
        result = []
        for i, x in enumerate(frames):
            if i >= n_out:  # a mask
                result.append(x)
                continue
            if needs_cast:
                x = fn.cast(x, dtype=types.FLOAT)
            if stats is not None:
                mean = types.Constant(stats[0].reshape(1, -1, 1, 1), dtype=types.FLOAT)
                std = types.Constant(stats[1].reshape(1, -1, 1, 1), dtype=types.FLOAT)
                x = (x - mean) / std
            result.append(x)
        if augment:
            flags = rest[1]
            # Input and target of a sample get the same flags, hence the same transform.
            if fn.cast(flags[0], dtype=types.BOOL):
                result = [fn.transpose(x, perm=[0, 1, 3, 2], output_layout="FCHW") for x in result]
            result = [fn.flip(x, vertical=flags[1], horizontal=flags[2]) for x in result]
        if device == "gpu":
            rest = [x.gpu() for x in rest] + device_extras
        return (*result, *rest)

    return zarr_pipeline()
