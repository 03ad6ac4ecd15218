"""``zarrdali bench-host``: host time per batch, smoke-tested at tiny size."""

from __future__ import annotations

import json

from storefactory import VarSpec
from zarrdali.cli import main


def test_bench_host_reports_every_stage(make_store, tmp_path, capsys):
    store = make_store(
        VarSpec("a", shape=(12, 21, 33), chunks=(1, 8, 8), shards=(2, 16, 16)),
        VarSpec("b", shape=(12, 21, 33), chunks=(2, 8, 8)),
    )
    out = tmp_path / "out"
    argv = ["bench-host", str(store), "--variables", "a", "b", "--tile", "8", "8"]
    argv += ["--batch-size", "3", "--batches", "2", "--rounds", "2", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads((out / "host.json").read_text())
    (result,) = payload["stores"]
    assert result["batches"] == 2
    assert result["chunks_per_batch"] > 0 and result["pieces_per_batch"] >= 3 * 6 * 2
    summary = result["summary"]
    for stage in ("plan", "locate", "describe-cpu", "total-cpu"):
        assert 0 < summary[stage]["p10_ms"] <= summary[stage]["median_ms"]
        assert summary[stage]["median_ms"] <= summary[stage]["p90_ms"]
    total = summary["total-cpu"]["median_ms"]
    assert total >= summary["plan"]["median_ms"]
    assert result["locator"]["objects_loaded"] > 0
    assert "describe-cpu" in capsys.readouterr().out
    assert (out / "host.md").read_text().startswith("| store |")
