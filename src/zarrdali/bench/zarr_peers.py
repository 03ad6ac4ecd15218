"""zarr-python's own fastest configurations, as benchmark rows.

Users already have zarr-python; these rows show zarrdali against the best it
offers, reading the same samples:

- ``zarr-async-fused``: zarr-python >= 3.3 with its opt-in fused codec
  pipeline (``codec_pipeline.path = zarr.core.codec_pipeline.FusedCodecPipeline``:
  synchronous, batched decode in a thread pool, coalesced shard reads), and
  every tile of a batch requested at once through zarr's async API
  (``asyncio.gather`` over samples and variables).
- ``zarr-zarrs``: zarr-python with the zarrs codec pipeline
  (``zarrs.ZarrsCodecPipeline``, the Rust zarrs crate through zarrs-python),
  with the same batch-concurrent async reads.

Both use ``spec.budget`` threads (``codec_pipeline.max_workers``,
``threading.max_workers``), run in the benchmark's process on an event loop of
their own, and check their first batch against a plain zarr-python read (the
oracle) before timing anything. A row whose requirement is missing (zarr < 3.3
on Python 3.11; zarrs not installed) raises :class:`~.runners.Skipped` saying so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from zarrdali.bench.measure import RunResult, time_epoch
from zarrdali.bench.runners import (
    Runner,
    Skipped,
    StoreMismatch,
    _decoded_nbytes,
    _loader,
    compare_views,
    epoch_batches,
)
from zarrdali.bench.spec import BenchSpec

FUSED_PIPELINE = "zarr.core.codec_pipeline.FusedCodecPipeline"
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


def fused_pipeline_missing() -> str | None:
    """Why zarr-python's fused codec pipeline cannot be used here (None: it can)."""
    import zarr

    try:
        from zarr.core.codec_pipeline import FusedCodecPipeline  # noqa: F401
    except ImportError:
        return (
            f"zarr-python {zarr.__version__} has no fused codec pipeline (zarr >= 3.3 has "
            f"it; zarr >= 3.2 needs Python >= 3.12)"
        )
    return None


def zarrs_missing() -> str | None:
    """Why the zarrs codec pipeline cannot be used here (None: it can)."""
    try:
        import zarrs  # noqa: F401
    except ImportError as err:
        return f"zarrs-python is not installed (pip install zarrs, or zarrdali[bench]): {err}"
    return None


def _store_target(spec: BenchSpec) -> Any:
    """What zarr opens: the path, or for a URL a zarr Store made as zarrdali makes it."""
    if not spec.remote:
        return spec.store
    from zarrdali.io.remote import zarr_store_for

    return zarr_store_for(spec.store, spec.storage_options)


class AsyncBatchReader:
    """Reads a batch of samples with zarr-python's async API, every tile at once.

    ``config`` (zarr config keys) is in force while arrays are opened (the
    codec pipeline is chosen then) and during each read (thread counts are
    read then); outside, zarr's configuration is left as it was.
    """

    def __init__(
        self,
        spec: BenchSpec,
        tile_hw: tuple[int, int],
        config: dict[str, Any],
    ) -> None:
        self.variables = list(spec.variables)
        self.n_frames = spec.n_frames
        self.tile_hw = tile_hw
        self.config = config
        self._loop = asyncio.Runner()
        try:
            with self._configured():
                self.arrays = self._loop.run(self._open(_store_target(spec)))
        except BaseException:
            self._loop.close()
            raise
        self.levels = [a.shape[1] if len(a.shape) == 4 else 1 for a in self.arrays]
        self.channel0 = np.concatenate([[0], np.cumsum(self.levels)]).tolist()

    def _configured(self):
        import zarr

        return zarr.config.set(self.config)

    async def _open(self, target: Any) -> list:
        import zarr.api.asynchronous as za

        group = await za.open_group(store=target, mode="r")
        return [await group.getitem(v) for v in self.variables]

    @property
    def views(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            v: (tuple(a.shape), np.dtype(a.dtype))
            for v, a in zip(self.variables, self.arrays, strict=True)
        }

    def read(self, samples: np.ndarray) -> np.ndarray:
        """``[B, frames, C, H, W]`` float32 for samples ``[B, 3]`` of ``(t0, y0, x0)``."""
        with self._configured():
            return self._loop.run(self._read(samples))

    async def _read(self, samples: np.ndarray) -> np.ndarray:
        (h, w), n = self.tile_hw, self.n_frames
        out = np.empty((len(samples), n, self.channel0[-1], h, w), dtype=np.float32)

        async def tile(i: int, k: int, t0: int, y0: int, x0: int) -> None:
            array = self.arrays[k]
            middle = (slice(None),) if len(array.shape) == 4 else ()
            window = await array.getitem(
                (slice(t0, t0 + n), *middle, slice(y0, y0 + h), slice(x0, x0 + w))
            )
            c0, c1 = self.channel0[k], self.channel0[k + 1]
            out[i, :, c0:c1] = np.asarray(window).reshape(n, c1 - c0, h, w)

        await asyncio.gather(
            *(
                tile(i, k, t0, y0, x0)
                for i, (t0, y0, x0) in enumerate(samples.tolist())
                for k in range(len(self.arrays))
            )
        )
        return out

    def close(self) -> None:
        self._loop.close()


def oracle_batch(spec: BenchSpec, tile_hw: tuple[int, int], samples: np.ndarray) -> np.ndarray:
    """The same samples read one by one with zarr-python's plain synchronous API."""
    import zarr

    group = zarr.open_group(_store_target(spec), mode="r")
    (h, w), n = tile_hw, spec.n_frames
    per_sample = []
    for t0, y0, x0 in samples.tolist():
        fields = []
        for v in spec.variables:
            window = np.asarray(group[v][t0 : t0 + n, ..., y0 : y0 + h, x0 : x0 + w])
            fields.append(window if window.ndim == 4 else window[:, None])
        per_sample.append(np.concatenate(fields, axis=1).astype(np.float32))
    return np.stack(per_sample)


def check_against_oracle(
    got: np.ndarray, want: np.ndarray, who: str, samples: Sequence[Sequence[int]]
) -> None:
    """Raise :class:`StoreMismatch` unless ``who`` served exactly the oracle's values."""
    if got.shape != want.shape or not np.array_equal(got, want, equal_nan=True):
        bad = (
            "shape " + str(got.shape)
            if got.shape != want.shape
            else f"{int((~((got == want) | (np.isnan(got) & np.isnan(want)))).sum())} values"
        )
        raise StoreMismatch(
            f"{who} served other values than zarr-python's plain read ({bad} differ, "
            f"first samples {list(map(tuple, samples))[:2]}); its timings would not be "
            f"of equal work."
        )


def async_zarr_runner(
    spec: BenchSpec, result: RunResult, pipeline: str, missing: str | None, label: str
) -> Runner:
    """zarr-python with codec pipeline ``pipeline``, all tiles of a batch at once."""
    if missing is not None:
        raise Skipped(missing)
    import torch

    loader = _loader(spec, workers=0)  # zarrdali's view of the store and its epochs
    loader.close()
    tile_hw = loader.candidates.tile_hw
    budget = spec.budget
    config = {
        "codec_pipeline.path": pipeline,
        "codec_pipeline.max_workers": budget,
        "threading.max_workers": budget,
    }
    reader = AsyncBatchReader(spec, tile_hw, config)
    try:
        compare_views(
            {layout.name: (layout.shape, layout.dtype) for layout in loader.layouts},
            reader.views,
            label,
        )
        first = epoch_batches(spec, 0)[0]
        check_against_oracle(reader.read(first), oracle_batch(spec, tile_hw, first), label, first)
        result.note = (
            f"{pipeline.rsplit('.', 1)[-1]}, {budget} threads, every tile of a batch "
            f"requested at once (asyncio.gather), in-process"
        )
        for epoch in range(spec.epochs):
            batches = epoch_batches(spec, epoch)
            timed = batches[spec.warmup_batches :]

            def epoch_iter(batches=batches):
                for samples in batches:
                    yield torch.from_numpy(reader.read(samples))

            time_epoch(spec, result, epoch_iter, len(timed), len)
            result.decoded_bytes_per_epoch = _decoded_nbytes(loader, timed)[0]
            yield
    finally:
        reader.close()


def fused_runner(spec: BenchSpec, result: RunResult) -> Runner:
    """zarr-python's fused codec pipeline (zarr >= 3.3), batch-concurrent async reads."""
    return async_zarr_runner(
        spec, result, FUSED_PIPELINE, fused_pipeline_missing(), "zarr-python (fused pipeline)"
    )


def zarrs_runner(spec: BenchSpec, result: RunResult) -> Runner:
    """zarr-python with the zarrs codec pipeline, batch-concurrent async reads."""
    return async_zarr_runner(spec, result, ZARRS_PIPELINE, zarrs_missing(), "zarr-python + zarrs")
