"""``benchmarks/first_batch.py`` at tiny size: both modes run and report every epoch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from storefactory import VarSpec

BENCH = Path(__file__).parent.parent / "benchmarks" / "first_batch.py"


def test_first_batch_bench_runs_both_modes(make_store, tmp_path):
    store = make_store(VarSpec("a", shape=(12, 16, 16), chunks=(1, 8, 8)))
    spec = importlib.util.spec_from_file_location("first_batch_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "first.json"
    tiny = ["--variables", "a", "--input-steps", "2", "--target-steps", "1", "--tile", "8", "8"]
    tiny += ["--batch-size", "4", "--workers", "1", "--epochs", "2", "--batches", "5"]
    results = bench.main([str(store), *tiny, "--json", str(out)])
    assert set(results) == {False, True}
    for epochs in results.values():
        assert [e["epoch"] for e in epochs] == [0, 1]
        assert all(e["batches"] == 5 and e["first_ms"] > 0 and e["steady_ms"] > 0 for e in epochs)
    assert set(json.loads(out.read_text())["epochs"]) == {"false", "true"}
