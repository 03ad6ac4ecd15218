"""``benchmarks/scaling.py``: one point runs in a child process whose loader's
memory (its own share and its worker processes') is measured from outside, and
the report keeps each point's best samples/s and highest memory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from storefactory import VarSpec

BENCH = Path(__file__).parent.parent / "benchmarks" / "scaling.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("scaling_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_one_point_measures_samples_and_the_memory_of_the_loader_alone(make_store):
    bench = load_bench()
    store = make_store(
        VarSpec("a", shape=(12, 64, 64), chunks=(1, 16, 16)),
        VarSpec("b", shape=(12, 64, 64), chunks=(1, 16, 16)),
    )
    point = dict(
        store=str(store),
        variables=["a", "b"],
        input_steps=2,
        target_steps=1,
        tile=(16, 16),
        batch_size=4,
        warmup=1,
        seconds=0.2,
        min_batches=3,
        workers=1,
    )
    result = bench.run_point(point)
    assert result["batches"] >= 3 and result["samples"] == 4 * result["batches"]
    assert result["samples_per_s"] > 0 and result["workers"] >= 1
    # the worker processes hold memory, and the baseline (imports) is not counted
    assert result["worker_processes_mib"] > 0
    assert 0 < result["zarrdali_peak_mib"] < result["baseline_mib"] + result["worker_processes_mib"]


def test_best_of_runs_keeps_the_best_rate_and_the_highest_memory():
    bench = load_bench()
    runs = [
        dict(samples_per_s=10.0, zarrdali_peak_mib=50.0, training_process_share_mib=20.0,
             worker_processes_mib=30.0),
        dict(samples_per_s=12.0, zarrdali_peak_mib=40.0, training_process_share_mib=25.0,
             worker_processes_mib=20.0),
    ]  # fmt: skip
    row = bench.best_of({"batch_size": 8}, runs)
    assert row["samples_per_s"] == 12.0 and row["batch_size"] == 8
    assert (row["zarrdali_peak_mib"], row["training_process_share_mib"]) == (50.0, 25.0)
    assert row["worker_processes_mib"] == 30.0 and row["runs"] == runs
