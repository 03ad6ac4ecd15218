"""zarr-python's fastest configurations as bench rows: they serve exactly what
zarrdali serves, run at tiny size, and skip with the reason where unavailable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zarrdali.bench import zarr_peers
from zarrdali.bench.measure import RunResult
from zarrdali.bench.runners import Skipped, StoreMismatch, epoch_batches
from zarrdali.bench.spec import BenchSpec
from zarrdali.sample_data import PLAIN, SHARDED, SampleDataSpec, write_sample_data

VARIABLES = ("t2m", "u10")
ROWS = {
    "fused": (
        zarr_peers.fused_runner,
        zarr_peers.fused_pipeline_missing,
        zarr_peers.FUSED_PIPELINE,
    ),
    "zarrs": (zarr_peers.zarrs_runner, zarr_peers.zarrs_missing, zarr_peers.ZARRS_PIPELINE),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("zarr-peers")
    write_sample_data(directory, SampleDataSpec(n_time=20, n_lat=37, n_lon=72), progress=False)
    return directory


def _spec(store: Path, **kw) -> BenchSpec:
    defaults = dict(
        input_steps=2,
        target_steps=1,
        tile=(16, 16),
        batch_size=4,
        batches=3,
        epochs=2,
        warmup_batches=1,
        num_threads=2,
    )
    return BenchSpec(store=str(store), variables=VARIABLES, **{**defaults, **kw})


def _available(row: str) -> None:
    missing = ROWS[row][1]()
    if missing:
        pytest.skip(missing)


@pytest.mark.parametrize("layout", [PLAIN, SHARDED])
@pytest.mark.parametrize("row", list(ROWS))
def test_row_reads_what_zarrdali_serves(stores, layout, row):
    _available(row)
    from zarrdali import ZarrLoader

    spec = _spec(stores / layout)
    with ZarrLoader(spec.store, **spec.loader_kwargs(), device="cpu", workers=0) as loader:
        batch = next(iter(loader))
    index = batch["index"].numpy()
    reader = zarr_peers.AsyncBatchReader(spec, (16, 16), {"codec_pipeline.path": ROWS[row][2]})
    try:
        got = reader.read(index)
    finally:
        reader.close()
    want = np.concatenate([batch["input"].numpy(), batch["target"].numpy()], axis=1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("row", list(ROWS))
def test_row_runs_at_tiny_size(stores, row):
    _available(row)
    spec = _spec(stores / SHARDED)
    result = RunResult(row)
    runner = ROWS[row][0](spec, result)
    for _ in range(spec.epochs):
        next(runner)
    runner.close()
    assert len(result.epoch_seconds) == spec.epochs
    assert result.samples_per_epoch == spec.batches * spec.batch_size
    assert result.decoded_bytes_per_epoch > 0
    assert ROWS[row][2].rsplit(".", 1)[-1] in result.note


@pytest.mark.parametrize("row", list(ROWS))
def test_row_skips_with_the_reason_when_unavailable(stores, row, monkeypatch):
    name = ROWS[row][1].__name__
    monkeypatch.setattr(zarr_peers, name, lambda: "needs something this machine lacks")
    runner = ROWS[row][0](_spec(stores / PLAIN), RunResult(row))
    with pytest.raises(Skipped, match="lacks"):
        next(runner)


def test_missing_requirement_is_named():
    import zarr

    fused = zarr_peers.fused_pipeline_missing()
    has_fused = tuple(int(p) for p in zarr.__version__.split(".")[:2]) >= (3, 3)
    assert (fused is None) == has_fused, fused
    if fused:
        assert zarr.__version__ in fused and "3.3" in fused


def test_oracle_check_catches_a_wrong_value(stores):
    spec = _spec(stores / PLAIN)
    samples = epoch_batches(spec, 0)[0]
    want = zarr_peers.oracle_batch(spec, (16, 16), samples)
    zarr_peers.check_against_oracle(want.copy(), want, "same", samples)
    wrong = want.copy()
    wrong[0, 0, 0, 3, 5] += 1
    with pytest.raises(StoreMismatch, match="1 values"):
        zarr_peers.check_against_oracle(wrong, want, "wrong", samples)
