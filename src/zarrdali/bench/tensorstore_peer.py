"""TensorStore as a performance-minded user reads training batches with it.

Every variable is opened once with the ``zarr3`` driver on the local store,
with no cache (a ``cache_pool`` of 0 bytes: every epoch reads the files) and
TensorStore's own thread pools (``data_copy_concurrency`` and
``file_io_concurrency`` sized to the benchmark's budget). Each batch issues
the reads of all its tiles (every sample, every variable) at once, in one
``ts.Batch`` where TensorStore has it, so it can coalesce shard-index and chunk
reads, then waits for them and stacks the tiles into one float32 array handed
to torch, as a loader's collate would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zarrdali.bench.measure import RunResult, time_epoch
from zarrdali.bench.runners import Runner, Skipped, _tile_hw, compare_views, epoch_batches
from zarrdali.bench.spec import BenchSpec


def open_arrays(spec: BenchSpec, threads: int):
    """The spec's variables as TensorStore arrays sharing one context."""
    import tensorstore as ts

    context = ts.Context(
        {
            "cache_pool": {"total_bytes_limit": 0},
            "data_copy_concurrency": {"limit": threads},
            "file_io_concurrency": {"limit": max(threads, 4)},
        }
    )
    arrays = []
    for name in spec.variables:
        kvstore = {"driver": "file", "path": str(Path(spec.store) / name) + "/"}
        arrays.append(
            ts.open({"driver": "zarr3", "kvstore": kvstore}, read=True, context=context).result()
        )
    return arrays


def read_batch(arrays, samples: np.ndarray, n_frames: int, tile_hw: tuple[int, int]):
    """``[B, T, C, H, W]`` float32 for ``samples``: every tile read issued at once."""
    import tensorstore as ts

    h, w = tile_hw
    batch = ts.Batch() if hasattr(ts, "Batch") else None
    kw = {"batch": batch} if batch is not None else {}
    futures = []
    for t0, y0, x0 in samples.tolist():
        for arr in arrays:
            view = arr[t0 : t0 + n_frames, ..., y0 : y0 + h, x0 : x0 + w]
            futures.append(view.read(**kw))
    if batch is not None:
        batch.submit()
    tiles = [f.result() for f in futures]
    fields = [t.reshape(n_frames, -1, h, w) for t in tiles]
    n_vars = len(arrays)
    out = [
        np.concatenate(fields[i * n_vars : (i + 1) * n_vars], axis=1) for i in range(len(samples))
    ]
    return np.stack(out).astype(np.float32, copy=False)


def tensorstore_runner(spec: BenchSpec, result: RunResult) -> Runner:
    """TensorStore (zarr3 driver, no cache, its own thread pools), one batch at a time."""
    try:
        import tensorstore  # noqa: F401
    except ImportError as err:
        raise Skipped("tensorstore is not installed (pip install 'zarrdali[bench]')") from err
    if spec.remote:
        raise Skipped("the TensorStore row reads local stores")
    import torch

    tile_hw, loader = _tile_hw(spec)
    threads = spec.budget
    arrays = open_arrays(spec, threads)
    compare_views(
        {layout.name: (layout.shape, layout.dtype) for layout in loader.layouts},
        {
            name: (tuple(arr.shape), arr.dtype.numpy_dtype)
            for name, arr in zip(spec.variables, arrays, strict=True)
        },
        "TensorStore",
    )
    result.note = f"zarr3 driver, no cache, {threads} copy threads, one read per tile, batched"

    def batches(epoch: int):
        for samples in epoch_batches(spec, epoch):
            window = read_batch(arrays, samples, spec.n_frames, tile_hw)
            yield torch.from_numpy(window)

    for epoch in range(spec.epochs):
        n_timed = len(epoch_batches(spec, epoch)) - spec.warmup_batches
        time_epoch(spec, result, lambda e=epoch: batches(e), n_timed, len)
        yield
