"""The preparation commands end to end: prepare -> stats -> index -> loader."""

from __future__ import annotations

import zarr

from test_loader_oracle import loader_for, run_epochs
from test_prep_prepare import write_precip_nc
from zarrdali.cli import main
from zarrdali.prep.sample_index import read_index


def test_prepare_stats_index_commands(tmp_path, capsys):
    src = write_precip_nc(tmp_path / "radar.nc")
    dst = tmp_path / "radar.zarr"
    assert (
        main(
            [
                "prepare",
                str(src),
                str(dst),
                "--tile",
                "6x6",
                "--variables",
                "rr",
                "--rename",
                "rr=precip",
                "-q",
            ]
        )
        == 0
    )
    assert main(["stats", str(dst), "--quantiles", "0.5", "-q"]) == 0
    assert "mean" in zarr.open_group(dst)["precip"].attrs["stats"]
    out = tmp_path / "idx"
    assert (
        main(
            [
                "index",
                str(dst),
                "--variables",
                "precip",
                "--window",
                "2",
                "--tile",
                "6x6",
                "--max-missing",
                "0.1",
                "--bins",
                "0,1.5,2.5,50",
                "--quota",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    sampling = next(
        line.split(": ")[1] for line in printed.splitlines() if line.startswith("sampling.parquet")
    )
    table, params = read_index(sampling)
    assert params["kind"] == "sampling" and len(table) == 12
    loader = loader_for(
        dst,
        ["precip"],
        index=sampling,
        tile=(6, 6),
        input_steps=1,
        target_steps=1,
        batch_size=4,
        normalize="store",
    )
    batches = run_epochs(loader, [0])[0]
    assert sum(len(b["index"]) for b in batches) == 12

    # The index shows dask's progress like prepare and stats; -q silences it.
    assert "Completed" in printed
    argv = ["index", str(dst), "--variables", "precip", "--window", "2", "--tile", "6x6"]
    assert main([*argv, "--tiling-only", "--out", str(tmp_path / "quiet"), "-q"]) == 0
    quiet = capsys.readouterr().out
    assert "Completed" not in quiet and "tiling.parquet" in quiet
