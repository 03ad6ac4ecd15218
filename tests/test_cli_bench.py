"""The command line, the sample data and the benchmark, at tiny size."""

from __future__ import annotations

import json
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from zarrdali.batch.zstdctx import zstd_library

try:
    import tensorstore  # noqa: F401

    HAVE_TENSORSTORE = True
except ImportError:
    HAVE_TENSORSTORE = False
from zarrdali.cli import main
from zarrdali.sample_data import PLAIN, SHARDED, SampleDataSpec, write_sample_data

TINY = ["--n-time", "30", "--n-lat", "37", "--n-lon", "72"]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sample")
    assert main(["sample-data", str(directory), *TINY, "-q"]) == 0
    return directory


def test_sample_data_layouts(sample_dir):
    plain = xr.open_zarr(sample_dir / PLAIN, consolidated=False)
    sharded = xr.open_zarr(sample_dir / SHARDED, consolidated=False)
    for ds in (plain, sharded):
        assert set(ds.data_vars) == {"t2m", "u10", "v10", "msl", "lsm", "orography"}
        assert ds["lsm"].dims == ("latitude", "longitude")  # static fields
        assert set(np.unique(ds["lsm"].values)) == {0.0, 1.0}
        assert (ds["orography"].values[ds["lsm"].values == 0] == 0).all()
        assert ds["t2m"].dims == ("time", "latitude", "longitude")
        assert ds["t2m"].shape == (30, 37, 72)
        assert ds["t2m"].dtype == np.float32
        assert np.issubdtype(ds["time"].dtype, np.datetime64)
    xr.testing.assert_identical(plain["t2m"].load(), sharded["t2m"].load())
    t2m = plain["t2m"].values
    assert np.isfinite(t2m).all()
    assert 200 < t2m.mean() < 320  # a temperature in kelvin
    # the daily cycle: the same place is warmer at local noon than at midnight
    assert t2m[12, 18, 0] > t2m[0, 18, 0]
    import zarr

    arr_plain = zarr.open_group(sample_dir / PLAIN, mode="r")["t2m"]
    arr_sharded = zarr.open_group(sample_dir / SHARDED, mode="r")["t2m"]
    assert arr_plain.chunks == (1, 37, 72) and arr_plain.shards is None
    assert arr_sharded.shards is not None and arr_sharded.chunks[0] == 1


def test_sample_data_is_deterministic(tmp_path):
    spec = SampleDataSpec(n_time=4, n_lat=9, n_lon=16, variables=("u10",))
    a = write_sample_data(tmp_path / "a", spec, progress=False)[0]
    b = write_sample_data(tmp_path / "b", spec, progress=False)[0]
    xa, xb = (xr.open_zarr(p, consolidated=False)["u10"].values for p in (a, b))
    np.testing.assert_array_equal(xa, xb)


CPU_LOADERS = (
    "zarrdali-cpu",
    "zarrdali-cpu-whole",
    "zarrdali-cpu-options",
    "zarrdali-cpu-threads",
    "zarrdali-cpu-1worker",
    "file-ceiling",
    "file-ceiling-contexts",
    "tensorstore",
    "numcodecs-ceiling",
    "numcodecs-codec-api",
    "numcodecs-zstd-contexts",
    "torch-xarray",
    "xbatcher",
)
GPU_LOADERS = ("zarrdali-cuda", "zarr-gpu")
# zarr-python's own fastest configurations: skipped where zarr < 3.3 or zarrs is missing
ZARR_PEERS = ("zarr-async-fused", "zarr-zarrs")


def _tiny(out: Path, *extra: str) -> list[str]:
    return [
        "--tile",
        "16",
        "16",
        "--batches",
        "3",
        "--epochs",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "-q",
        *extra,
    ]


def test_bench_writes_table_json_and_plot(sample_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    # one worker per DataLoader: spawning workers is most of this test's time
    tiny = _tiny(out, "--step-ms", "1", "--threads", "1", "--all")
    args = ["bench", "--data-dir", str(sample_dir), *tiny]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "zarrdali[cpu]" in printed and "torch DataLoader + xarray" in printed
    assert "GDS:" in printed and "wait %" in printed  # system header, consumer wait column
    payload = json.loads((out / "bench.json").read_text())
    assert payload["command"].startswith("zarrdali")
    assert payload["system"]["cores"] >= 1 and payload["system"]["versions"]["zarr"]
    assert payload["spec"]["step_ms"] == 1.0
    rows = payload["results"]
    # one row per store and loader: none silently dropped
    assert sorted((r["store_label"], r["loader"]) for r in rows) == sorted(
        (label, name)
        for label in ("plain", "sharded")
        for name in CPU_LOADERS + GPU_LOADERS + ZARR_PEERS
    )
    for row in rows:
        s = row["summary"]
        no_zstd = zstd_library() is None
        contexts = row["loader"] in ("numcodecs-zstd-contexts", "file-ceiling-contexts") and no_zstd
        optional = (row["loader"] == "tensorstore" and not HAVE_TENSORSTORE) or (
            row["loader"] in ZARR_PEERS
        )
        if (row["loader"] in GPU_LOADERS or contexts or optional) and s["status"] == "skipped":
            assert s["error"]  # the reason, e.g. no GPU or CuPy
            assert s["samples_per_s"]["median"] is None
            continue
        assert s["status"] == "ok", s["error"]
        assert len(s["epoch_seconds"]) == 2
        assert s["samples_per_epoch"] == 3 * 4
        assert (
            0
            < s["samples_per_s"]["min"]
            <= s["samples_per_s"]["median"]
            <= s["samples_per_s"]["max"]
        )
        assert s["peak_rss_gb"] > 0.01  # at least the interpreter with numpy and torch
        assert s["cpu_utilization"]["median"] >= 0
        assert s["cpu_ms_per_sample"]["median"] >= 0  # clock ticks: 0 at this tiny size
        assert row["batch_size"] == 4
        if not row["loader"].startswith(("numcodecs-", "file-")):  # not decode-only ceilings
            assert s["first_batch_s"]["median"] > 0
            assert 0 <= s["wait_fraction"]["min"] <= s["wait_fraction"]["max"] <= 1
    assert payload["ratios"]  # the goal ratios are computed
    assert any("whole chunks / numcodecs ceiling" in name for name in payload["ratios"])
    if zstd_library() is not None:
        assert any("reused contexts" in name for name in payload["ratios"])
    notes = {(r["store_label"], r["loader"]): r["summary"]["note"] for r in rows}
    assert "partial decode" not in notes[("plain", "zarrdali-cpu-whole")]
    assert any("+ static, masks, nan_fill / zarrdali[cpu] (CPU" in n for n in payload["ratios"])
    assert any("xbatcher" in name for name in payload["ratios"])
    assert any("/ numcodecs ceiling from files" in name for name in payload["ratios"])
    assert any("/ zarrdali[cpu] 1 worker" in name for name in payload["ratios"])
    if HAVE_TENSORSTORE:
        assert any("best of TensorStore" in name for name in payload["ratios"])
    assert (out / "bench.md").read_text().count("|") > 10
    assert payload["plots"] == ["throughput.png", "wait.png"]
    assert (out / "throughput.png").stat().st_size > 1000
    assert (out / "wait.png").stat().st_size > 1000


def test_a_bare_bench_runs_the_rows_that_answer_the_question(sample_dir, tmp_path, capsys):
    """Without --all: zarrdali, the ceiling, the fast peers and the torch
    DataLoader, and a verdict that compares zarrdali with each of them."""
    from zarrdali.bench.main import DEFAULT_LOADERS

    out = tmp_path / "bench"
    args = ["bench", "--data-dir", str(sample_dir), *_tiny(out, "--threads", "1")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    payload = json.loads((out / "bench.json").read_text())
    assert sorted((r["store_label"], r["loader"]) for r in payload["results"]) == sorted(
        (label, name) for label in ("plain", "sharded") for name in DEFAULT_LOADERS
    )
    verdict = payload["verdict"]
    assert [line.split(":")[0] for line in verdict] == ["plain, batch 4", "sharded, batch 4"]
    for line in verdict:
        assert "zarrdali[cpu]" in line and "x the ceiling" in line
        assert "x the torch DataLoader" in line
        if HAVE_TENSORSTORE:
            assert "x the best peer" in line
    assert "verdict (median samples/s):" in printed and verdict[0] in printed
    assert "zarrdali bench --all" in printed
    assert "/ numcodecs ceiling (GB/s): " not in printed  # the full list of ratios: --all
    assert verdict[0] in (out / "bench.md").read_text()


def test_bench_at_several_batch_sizes(sample_dir, tmp_path):
    """``--batch-size`` takes a list: every loader at each size, the same samples
    timed at each (``--samples``), ratios per store and size, samples/s plotted
    against the batch size."""
    out = tmp_path / "bench"
    loaders = ["--loaders", "zarrdali-cpu", "file-ceiling"]
    args = ["bench", str(sample_dir / SHARDED), "--tile", "16", "16", "--epochs", "1"]
    args += ["--batch-size", "2", "6", "--samples", "12", "--out", str(out), "-q", *loaders]
    assert main(args) == 0
    payload = json.loads((out / "bench.json").read_text())
    assert payload["batch_sizes"] == [2, 6]
    rows = payload["results"]
    assert sorted((r["batch_size"], r["loader"]) for r in rows) == [
        (2, "file-ceiling"),
        (2, "zarrdali-cpu"),
        (6, "file-ceiling"),
        (6, "zarrdali-cpu"),
    ]
    for row in rows:
        assert row["summary"]["status"] == "ok", row["summary"]["error"]
        # 12 samples would be 6 batches of 2 and 2 of 6: both below the floor of 8
        assert row["summary"]["samples_per_epoch"] == {2: 16, 6: 48}[row["batch_size"]]
    for b in (2, 6):
        key = f"batch {b}: zarrdali[cpu] / numcodecs ceiling from files"
        assert any(key in name for name in payload["ratios"]), payload["ratios"]
    assert (out / "throughput.png").stat().st_size > 1000
    assert "| batch |" in (out / "bench.md").read_text()


def test_bench_reports_a_failing_loader_and_completes(sample_dir, tmp_path, monkeypatch):
    from zarrdali.bench import main as bench_main

    def broken(spec, result):
        raise RuntimeError("this loader broke")
        yield

    monkeypatch.setitem(bench_main.LOADERS, "torch-xarray", ("torch DataLoader + xarray", broken))
    out = tmp_path / "bench"
    loaders = ["--loaders", "zarrdali-cpu", "nonsense", "torch-xarray", "numcodecs-ceiling"]
    args = ["bench", str(sample_dir / PLAIN), *_tiny(out, *loaders)]
    assert main(args) == 0
    rows = json.loads((out / "bench.json").read_text())["results"]
    status = {r["loader"]: r["summary"]["status"] for r in rows}
    assert status == {
        "zarrdali-cpu": "ok",
        "nonsense": "skipped",
        "numcodecs-ceiling": "ok",
        "torch-xarray": "failed",
    }
    summary = {r["loader"]: r["summary"] for r in rows}
    assert "this loader broke" in summary["torch-xarray"]["error"]
    assert "unknown loader 'nonsense'" in summary["nonsense"]["error"]
    assert "xbatcher" in summary["nonsense"]["error"]  # lists the known names
    table = (out / "bench.md").read_text()
    assert "failed: RuntimeError: this loader broke" in table
    assert "skipped: unknown loader" in table


def test_bench_peer_serves_the_same_samples_as_zarrdali(sample_dir):
    """The torch+xarray baseline does the same work: same samples, same values."""
    from zarrdali import ZarrLoader
    from zarrdali.bench.runners import XarraySampleDataset

    store = str(sample_dir / SHARDED)
    loader = ZarrLoader(
        store,
        ["t2m", "u10"],
        input_steps=2,
        target_steps=1,
        tile=(16, 16),
        batch_size=5,
        shuffle=True,
        device="cpu",
        workers=0,
    )
    batch = next(iter(loader))
    index = batch["index"].numpy()
    dataset = XarraySampleDataset(store, ["t2m", "u10"], 3, (16, 16), index)
    for i in range(len(index)):
        window, sample = dataset[i]
        np.testing.assert_array_equal(sample, index[i])
        got = np.concatenate([batch["input"][i].numpy(), batch["target"][i].numpy()])
        np.testing.assert_array_equal(window, got)


def test_training_example_runs(sample_dir, monkeypatch, capsys):
    example = Path(__file__).parents[1] / "examples" / "train.py"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(example),
            "--data-dir",
            str(sample_dir),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--tile",
            "16",
        ],
    )
    monkeypatch.setenv("ZARRDALI_WORKERS", "0")
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "done: 3 steps" in out and "loss" in out


def test_bench_adds_chunk_grid_tiles_where_the_chunks_divide_the_tile(tmp_path):
    """``--placement both`` (the default): every store on the loader's grid, and
    the stores whose inner chunks divide the tile on the chunk grid too, without
    the slow torch DataLoader row unless loaders were named. Those samples are
    all whole chunks: every origin a multiple of the chunk, no edge tiles."""
    from zarrdali.bench.cli import bench_targets
    from zarrdali.bench.runners import epoch_batches
    from zarrdali.bench.spec import BenchSpec

    spec = SampleDataSpec(n_time=12, n_lat=37, n_lon=72, variables=("u10", "v10"))
    plain, sharded = write_sample_data(tmp_path, replace(spec, inner_chunk=(8, 8)), progress=False)
    stores = [("plain", str(plain)), ("sharded", str(sharded))]
    base = BenchSpec(store=str(sharded), variables=("u10", "v10"), tile=(16, 16))
    loaders = ["zarrdali-cpu", "file-ceiling", "torch-xarray"]
    targets = bench_targets(stores, "both", loaders, base)
    assert [(t.label, t.placement, t.loaders) for t in targets] == [
        ("plain", "grid", None),
        ("sharded", "grid", None),
        ("sharded, chunk-grid tiles", "chunk-grid", ("zarrdali-cpu", "file-ceiling")),
    ]
    named = bench_targets(stores, "both", loaders, base, explicit=True)
    assert named[-1].loaders == tuple(loaders)
    only = bench_targets(stores, "chunk-grid", loaders, base)
    assert [(t.label, t.placement) for t in only] == [
        ("plain, chunk-grid tiles", "chunk-grid"),
        ("sharded, chunk-grid tiles", "chunk-grid"),
    ]
    on_grid = np.concatenate(epoch_batches(replace(base, placement="grid", batches=40), 0))
    on_chunks = np.concatenate(epoch_batches(replace(base, placement="chunk-grid", batches=40), 0))
    assert (on_grid[:, 1:] % 8).any()  # edge tiles, off the chunk grid
    assert not (on_chunks[:, 1:] % 8).any()
    assert set(on_chunks[:, 1].tolist()) == {0, 16} and on_chunks[:, 2].max() == 48
