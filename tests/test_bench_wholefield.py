"""The whole-field workload (``zarrdali bench --workload whole-field``) at tiny size:
its WeatherBench2-layout store, the batches it times, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from zarrdali.bench.wholefield import LOADERS
from zarrdali.cli import main
from zarrdali.sample_wb2 import WB2SampleSpec, write_wb2_sample

try:
    import tensorstore  # noqa: F401

    HAVE_TENSORSTORE = True
except ImportError:
    HAVE_TENSORSTORE = False

TINY = WB2SampleSpec(n_time=12, n_lat=9, n_lon=16, levels=(250, 500, 850), time_block=5)


@pytest.fixture(scope="module")
def wb2_store(tmp_path_factory) -> Path:
    return write_wb2_sample(tmp_path_factory.mktemp("wb2"), TINY, progress=False)


def test_wb2_sample_store_has_the_weatherbench2_layout(wb2_store):
    ds = xr.open_zarr(wb2_store)  # as users open it: consolidated, decoded
    assert set(ds.data_vars) == set(TINY.variables) and len(TINY.level_variables) == 5
    t = ds["temperature"]
    assert t.dims == ("time", "level", "latitude", "longitude")
    assert t.shape == (12, 3, 9, 16) and t.dtype == np.float32
    assert ds["2m_temperature"].dims == ("time", "latitude", "longitude")
    assert list(ds["level"].values) == [250, 500, 850]
    assert np.issubdtype(ds["time"].dtype, np.datetime64)
    assert (np.diff(ds["time"].values) == np.timedelta64(6, "h")).all()
    assert ds["latitude"].values[0] == -90 and ds["latitude"].values[-1] == 90  # poles
    assert t.attrs["units"] == "K" and ds["geopotential"].attrs["units"] == "m**2 s**-2"
    # one chunk per time step holds every level of the whole field
    group = zarr.open_group(wb2_store, mode="r")
    assert group["temperature"].chunks == (1, 3, 9, 16)
    assert group["2m_temperature"].chunks == (1, 9, 16)
    assert group["temperature"].metadata.dimension_names == tuple(t.dims)
    # temperature falls with height; values are finite and deterministic
    means = t.mean(dim=("time", "latitude", "longitude")).values
    assert means[0] < means[1] < means[2] and np.isfinite(t.values).all()
    again = write_wb2_sample(wb2_store.parent / "again", TINY, progress=False)
    np.testing.assert_array_equal(xr.open_zarr(again)["geopotential"].values,
                                  ds["geopotential"].values)  # fmt: skip


def test_whole_field_batches_equal_xarray(wb2_store):
    """What the workload times: whole fields, every level of every variable."""
    import zarrdali

    variables = list(TINY.variables)
    ds = xr.open_zarr(wb2_store)
    kw = dict(variables=variables, input_steps=2, target_steps=1, tile=None, batch_size=2)
    with zarrdali.ZarrLoader(wb2_store, **kw, workers=0) as loader:
        batch = next(iter(loader))
    assert batch["input"].shape == (2, 2, 5 * 3 + 4, 9, 16)
    for i, (t0, _, _) in enumerate(batch["index"].tolist()):
        frames = [ds[v].isel(time=slice(t0, t0 + 3)).values for v in variables]
        want = np.concatenate([f.reshape(3, -1, 9, 16) for f in frames], axis=1)
        np.testing.assert_array_equal(batch["input"][i].numpy(), want[:2])
        np.testing.assert_array_equal(batch["target"][i].numpy(), want[2:])


def test_bench_whole_field_workload(wb2_store, tmp_path, capsys):
    out = tmp_path / "wf"
    args = ["bench", "--workload", "whole-field", str(wb2_store), "--epochs", "1"]
    # one batch size, one worker each: spawning worker processes is most of the time
    args += ["--batch-size", "2", "--samples", "2", "--warmup", "1", "--threads", "1"]
    assert main([*args, "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "GB/s (samples served)" in printed
    record = json.loads((out / "whole_field.json").read_text())
    channels = 5 * 3 + 4
    assert record["workload"] == "whole-field" and record["channels"] == channels
    assert record["sample_bytes"] == 3 * channels * 9 * 16 * 4  # 2 input + 1 target steps
    rows = record["rows"]
    assert sorted((r["batch_size"], r["loader"]) for r in rows) == sorted(
        (b, name)
        for b in (2,)
        for name in (
            "zarrdali[cpu]",
            "numcodecs ceiling from files (pread + decode)",
            "TensorStore",
            "torch DataLoader + xarray",
        )
    )
    for row in rows:
        if row["loader"] == "TensorStore" and not HAVE_TENSORSTORE:
            assert row["status"] == "skipped"
            continue
        assert row["status"] == "ok", row["note"]
        assert row["gb_per_s"] == pytest.approx(row["samples_per_s"] * record["sample_bytes"] / 1e9)
    ratios = record["ratios"]
    assert "batch 2: zarrdali[cpu] / numcodecs ceiling from files (pread + decode)" in ratios
    assert ("batch 2: zarrdali[cpu] / TensorStore" in ratios) == HAVE_TENSORSTORE
    bench = json.loads((out / "bench.json").read_text())
    assert bench["specs"][0]["tile"] is None and bench["specs"][0]["input_steps"] == 2
    assert {r["loader"] for r in bench["results"]} == set(LOADERS)
    assert (out / "throughput.png").stat().st_size > 1000
    # a tile makes it another workload
    assert main([*args, "--tile", "4", "4", "--out", str(out), "-q"]) == 2


def test_ceiling_parts_are_small_for_whole_field_chunks():
    """The ceiling's threads take parts of 8 tile-sized chunks, but one whole-field
    chunk at a time: a part of 8 chunks of MBs would idle the other thread."""
    from zarrdali.bench.runners import small_parts

    tiles = list(range(20))
    assert small_parts(tiles, [64 << 10] * 20) == [tiles[:8], tiles[8:16], tiles[16:]]
    fields = list(range(5))
    assert small_parts(fields, [1_510_080] * 5) == [[k] for k in fields]
    mixed = small_parts(list("abcdef"), [3 << 20, 100, 100, 3 << 20, 64 << 10, 64 << 10])
    assert mixed == [["a"], ["b", "c"], ["d"], ["e", "f"]]
    assert small_parts([], []) == []
