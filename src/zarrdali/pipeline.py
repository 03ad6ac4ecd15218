"""The DALI side: an external source fed by zarrdali, cast and normalize, iterator.

The source is a callable taking DALI's ``BatchInfo`` so it is stateless with
respect to DALI (batch ``info.iteration`` of the epoch is a pure function of the
plan), which is what DALI checkpointing needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class BatchSource:
    """DALI external source: batch ``k`` of an epoch plan, as per-sample arrays.

    ``fetch(k)`` returns ``(window [B, T, C, H, W], samples [B, 3])``; the window
    is split into input and target frames along T.
    """

    def __init__(
        self,
        fetch: Callable[[int], tuple[Any, np.ndarray]],
        n_batches: int,
        input_steps: int,
        with_target: bool,
    ) -> None:
        self._fetch = fetch
        self._n = n_batches
        self._input_steps = input_steps
        self._with_target = with_target

    def __call__(self, info) -> tuple:
        k = info.iteration
        if k >= self._n:
            raise StopIteration
        window, samples = self._fetch(k)
        n_in = self._input_steps
        inputs = [window[b, :n_in] for b in range(len(samples))]
        index = [samples[b] for b in range(len(samples))]
        if not self._with_target:
            return inputs, index
        targets = [window[b, n_in:] for b in range(len(samples))]
        return inputs, targets, index


def build_pipeline(
    source: BatchSource,
    *,
    batch_size: int,
    with_target: bool,
    stats: tuple[np.ndarray, np.ndarray] | None,
    input_dtype: np.dtype,
    device_id: int | None,
    num_threads: int = 1,
    prefetch_queue_depth: int = 2,
    device: str = "cpu",
    workers: int = 0,
):
    """A DALI pipeline: external source → float32 → per-channel ``(x - mean) / std``.

    The cast is skipped when the store is float32 already; DALI fuses the
    arithmetic into one operator, so normalizing costs one pass over the batch.
    With ``workers > 0`` the source runs in that many DALI worker processes
    (parallel external source; the source must be picklable), which read ahead
    ``prefetch_queue_depth`` batches each.
    """
    from nvidia.dali import fn, pipeline_def, types

    needs_cast = np.dtype(input_dtype) != np.float32

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch_queue_depth,
        exec_dynamic=True,
        py_num_workers=max(workers, 1),
        py_start_method="spawn",
    )
    def zarr_pipeline():
        outs = fn.external_source(
            source=source,
            num_outputs=3 if with_target else 2,
            batch=True,
            batch_info=True,
            device=device,
            **({"parallel": True, "prefetch_queue_depth": prefetch_queue_depth} if workers else {}),
        )
        *frames, index = outs
        result = []
        for x in frames:
            if needs_cast:
                x = fn.cast(x, dtype=types.FLOAT)
            if stats is not None:
                mean = types.Constant(stats[0].reshape(1, -1, 1, 1), dtype=types.FLOAT)
                std = types.Constant(stats[1].reshape(1, -1, 1, 1), dtype=types.FLOAT)
                x = (x - mean) / std
            result.append(x)
        return (*result, index)

    return zarr_pipeline()
