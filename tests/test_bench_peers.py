"""The benchmark's peer loaders serve the same samples as xarray: equal work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zarrdali import ZarrLoader
from zarrdali.bench.measure import RunResult
from zarrdali.bench.runners import (
    ChunkArena,
    Skipped,
    StoreMismatch,
    XarraySampleDataset,
    XbatcherSampleDataset,
    compare_views,
    epoch_batches,
    xbatcher_runner,
    zarr_gpu_missing,
    zarr_gpu_runner,
    zarrdali_runner,
)
from zarrdali.bench.spec import BenchSpec
from zarrdali.sample_data import PLAIN, SHARDED, SampleDataSpec, write_sample_data

VARIABLES = ("t2m", "u10")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("peers")
    write_sample_data(directory, SampleDataSpec(n_time=30, n_lat=37, n_lon=72), progress=False)
    return directory


def _spec(store: Path, **kw) -> BenchSpec:
    defaults = dict(input_steps=2, target_steps=1, tile=(16, 16), batch_size=6, batches=40)
    return BenchSpec(store=str(store), variables=VARIABLES, **{**defaults, **kw})


@pytest.mark.parametrize("layout", [PLAIN, SHARDED])
def test_xbatcher_serves_the_epoch_samples_as_xarray(stores, layout):
    spec = _spec(stores / layout, batches=8)
    # the whole epoch: with 37 x 72 and 16 x 16 tiles it holds edge tiles (y0 = 21,
    # x0 = 56) off xbatcher's grid, which need their own generator
    samples = np.concatenate(epoch_batches(spec, 0))
    assert {21} <= set(samples[:, 1]) and {56} <= set(samples[:, 2])
    xb = XbatcherSampleDataset(spec.store, VARIABLES, spec.n_frames, (16, 16), samples)
    xa = XarraySampleDataset(spec.store, VARIABLES, spec.n_frames, (16, 16), samples)
    assert len(xb) == len(xa) == len(samples)
    for i in range(len(samples)):
        tensor, sample = xb[i]
        window, expected = xa[i]
        np.testing.assert_array_equal(sample, expected)
        assert tensor.dtype.is_floating_point and tuple(tensor.shape) == (3, 2, 16, 16)
        np.testing.assert_array_equal(tensor.numpy(), window)


def test_xbatcher_serves_what_zarrdali_serves(stores):
    spec = _spec(stores / SHARDED)
    loader = ZarrLoader(spec.store, **spec.loader_kwargs(), device="cpu", workers=0)
    batch = next(iter(loader))
    loader.close()
    index = batch["index"].numpy()
    xb = XbatcherSampleDataset(spec.store, VARIABLES, spec.n_frames, (16, 16), index)
    for i in range(len(index)):
        tensor, _ = xb[i]
        got = np.concatenate([batch["input"][i].numpy(), batch["target"][i].numpy()])
        np.testing.assert_array_equal(tensor.numpy(), got)


def test_xbatcher_refuses_a_spec_it_cannot_express(stores, monkeypatch):
    from zarrdali.bench import runners

    monkeypatch.setattr(runners, "MAX_XBATCHER_PATCHES", 10)
    runner = xbatcher_runner(_spec(stores / PLAIN), RunResult("xbatcher"))
    with pytest.raises(Skipped, match="patch selectors"):
        next(runner)


def test_compare_views_names_the_disagreement():
    f4, f8 = np.dtype("float32"), np.dtype("float64")
    compare_views({"t2m": ((3, 4, 5), f4)}, {"t2m": ((3, 4, 5), f4)}, "xarray")
    with pytest.raises(StoreMismatch, match=r"t2m: \(3, 4, 5\) float64 \(zarrdali: .*float32"):
        compare_views({"t2m": ((3, 4, 5), f4)}, {"t2m": ((3, 4, 5), f8)}, "xarray")
    with pytest.raises(StoreMismatch, match=r"u10: \(3, 4, 6\)"):
        compare_views({"u10": ((3, 4, 5), f4)}, {"u10": ((3, 4, 6), f4)}, "xarray")
    with pytest.raises(StoreMismatch, match="msl: missing"):
        compare_views({"msl": ((3, 4, 5), f4)}, {}, "xarray")


@pytest.mark.skipif(not zarr_gpu_missing(), reason="a GPU is present: the runners run")
def test_gpu_loaders_are_skipped_with_the_reason(stores):
    spec = _spec(stores / PLAIN)
    for runner, says in (
        (zarr_gpu_runner, "CuPy"),
        (lambda s, r: zarrdali_runner(s, r, "cuda"), "GPU path needs"),
    ):
        with pytest.raises(Skipped, match=says):
            next(runner(spec, RunResult("gpu")))


def test_chunk_arena_keeps_every_chunk_intact_and_reuses_its_blocks():
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (7, 3, 40, 1, 9)]
    arena = ChunkArena(block_nbytes=16)  # forces new blocks, one larger than a block
    views = [arena.add(c) for c in chunks]
    views.append(arena.add(memoryview(chunks[2])[5:12]))
    assert [bytes(v) for v in views] == [*chunks, chunks[2][5:12]]
    assert arena.nbytes == sum(map(len, chunks)) + 7

    blocks = list(arena._blocks)
    arena.clear()
    assert arena.nbytes == 0
    again = [arena.add(c) for c in reversed(chunks)]
    assert [bytes(v) for v in again] == chunks[::-1]
    assert all(any(b is k for k in arena._blocks) for b in blocks), "blocks were dropped"


@pytest.mark.parametrize("layout", [PLAIN, SHARDED])
def test_tensorstore_reads_what_zarrdali_serves(stores, layout):
    """The TensorStore row does equal work: the same samples, the same values."""
    pytest.importorskip("tensorstore")
    from zarrdali.bench.tensorstore_peer import open_arrays, read_batch

    spec = _spec(stores / layout, batches=4)
    arrays = open_arrays(spec, threads=2)
    loader = ZarrLoader(spec.store, **spec.loader_kwargs(), device="cpu", workers=0)
    try:
        for samples in epoch_batches(spec, 1)[:3]:
            got = read_batch(arrays, samples, spec.n_frames, (16, 16))
            np.testing.assert_array_equal(got, loader.load_batch(samples))
    finally:
        loader.close()
