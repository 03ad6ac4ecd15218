"""``zarrdali bench`` options from a TOML file, cold caches and epoch measurements."""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import pytest

from zarrdali.bench.cli import resolve
from zarrdali.bench.measure import RunResult, drop_page_cache, time_epoch
from zarrdali.bench.options import DEFAULTS, load_config
from zarrdali.bench.report import markdown_table, summarize
from zarrdali.bench.spec import BenchSpec
from zarrdali.cli import main
from zarrdali.sample_data import PLAIN, SampleDataSpec, write_sample_data


def _args(**given) -> argparse.Namespace:
    flags = {**dict.fromkeys(DEFAULTS), "config": None, "quiet": True}
    flags.update(given)
    return argparse.Namespace(**flags)


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "spec.toml"
    config.write_text('variables = ["t2m"]\ntile = [32, 32]\nbatch-size = 2\nstep_ms = 5\n')
    o = resolve(_args(config=str(config), batch_size=16))
    assert o["variables"] == ["t2m"] and o["tile"] == [32, 32] and o["step_ms"] == 5
    assert o["batch_size"] == 16  # the flag wins
    assert o["epochs"] == DEFAULTS["epochs"]  # neither: the default
    assert resolve(_args())["tile"] == [128, 128]


def test_config_file_errors_are_clear(tmp_path):
    config = tmp_path / "spec.toml"
    config.write_text("tiles = [32, 32]\n")
    with pytest.raises(ValueError, match=r"unknown option.*tiles"):
        load_config(config)
    config.write_text('tile = "none"\n')
    assert load_config(config)["tile"] is None  # TOML has no null


def test_bench_runs_from_a_config_file(tmp_path, capsys):
    write_sample_data(tmp_path, SampleDataSpec(n_time=12, n_lat=20, n_lon=24), progress=False)
    out = tmp_path / "out"
    config = tmp_path / "spec.toml"
    config.write_text(
        f'store = "{tmp_path / PLAIN}"\nloaders = ["zarrdali-cpu"]\nvariables = ["t2m"]\n'
        f'tile = [8, 8]\nbatches = 2\nepochs = 1\nwarmup = 1\nbatch_size = 2\nout = "{out}"\n'
        "cold = true\n"
    )
    assert main(["bench", "--config", str(config), "--input-steps", "1", "-q"]) == 0
    payload = json.loads((out / "bench.json").read_text())
    assert payload["spec"]["input_steps"] == 1 and payload["spec"]["tile"] == [8, 8]
    assert payload["spec"]["cold"] is True
    (row,) = payload["results"]
    assert row["summary"]["status"] == "ok", row["summary"]["error"]
    assert row["summary"]["cache"] == "cold"  # posix_fadvise needs no root
    assert "cold cache" in capsys.readouterr().out


def test_bad_config_file_exits_with_a_message(tmp_path, capsys):
    config = tmp_path / "spec.toml"
    config.write_text("loaderz = 1\n")
    assert main(["bench", "--config", str(config), "-q"]) == 2
    assert "unknown option(s) loaderz" in capsys.readouterr().err


def test_drop_page_cache_says_why_it_could_not(tmp_path):
    (tmp_path / "store" / "c").mkdir(parents=True)
    (tmp_path / "store" / "c" / "0").write_bytes(b"x" * 4096)
    assert drop_page_cache(str(tmp_path / "store")) is None
    assert "not a local directory" in drop_page_cache(str(tmp_path / "nowhere"))
    assert "not a local directory" in drop_page_cache("s3://bucket/store.zarr")


class _Batch(list):
    """A batch a weak reference can watch (a ring slot the loader wants back)."""


@pytest.mark.parametrize("warmup", [1, 4])
def test_time_epoch_holds_no_batch_the_consumer_let_go(tmp_path, warmup):
    """Like a training loop, the benchmark drops each batch before asking for the
    next but one: a batch held longer is a ring slot the CPU path cannot refill
    (holding the first batch made batch 256 read 0.6x of its speed)."""
    import weakref

    spec = BenchSpec(store=str(tmp_path), variables=("a",), warmup_batches=warmup)
    refs: list[weakref.ref] = []
    held_while_serving: list[int] = []

    def batches():
        for k in range(warmup + 6):
            # the consumer may still hold the batch just before this one, no other
            held_while_serving.append(sum(r() is not None for r in refs[:-1]))
            batch = _Batch([k] * 2)
            refs.append(weakref.ref(batch))
            yield batch
            del batch

    time_epoch(spec, RunResult("fake"), batches, n_timed=5, size=len)
    assert held_while_serving == [0] * (warmup + 5)


def test_time_epoch_counts_warmup_timed_batches_and_waits(tmp_path):
    spec = BenchSpec(store=str(tmp_path), variables=("a",), warmup_batches=2, step_ms=1.0)
    served = []

    def batches():
        for k in range(10):
            served.append(k)
            yield [k] * 3

    result = RunResult("fake")
    time_epoch(spec, result, batches, n_timed=5, size=len)
    assert served == list(range(7))  # 2 warm-up + 5 timed, nothing more read
    assert result.samples_per_epoch == 15
    assert len(result.first_batch_seconds) == len(result.epoch_seconds) == 1
    # the consumer slept 1 ms per batch: the epoch lasts at least that, waits are a part
    assert result.epoch_seconds[0] >= 5e-3
    assert 0 <= result.wait_seconds[0] <= result.epoch_seconds[0]
    assert result.peak_rss_bytes > 0 and result.cpu_seconds[0] >= 0
    assert result.peak_gpu_bytes is None or result.peak_gpu_bytes >= 0


def test_waiting_for_a_batch_to_be_ready_counts_as_waiting(tmp_path):
    """A GPU row's batch is the consumer's once its device work is done."""
    spec = BenchSpec(store=str(tmp_path), variables=("a",), warmup_batches=1)

    def batches():
        for k in range(10):
            yield [k]

    readied = []

    def ready(batch):
        readied.append(batch[0])
        time.sleep(0.004)

    result = RunResult("fake")
    time_epoch(spec, result, batches, n_timed=5, size=len, ready=ready)
    assert readied == list(range(6))  # the first (warm-up) batch too
    assert result.wait_seconds[0] >= 5 * 0.004
    assert result.first_batch_seconds[0] >= 0.004


def test_gpu_rows_sample_the_device_memory_in_use(tmp_path, monkeypatch):
    used = iter(range(1, 10_000))
    runtime = types.SimpleNamespace(memGetInfo=lambda: (100 - next(used) % 7, 100))
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    spec = BenchSpec(store=str(tmp_path), variables=("a",), warmup_batches=1)
    gpu_row, cpu_row = RunResult("gpu"), RunResult("cpu")
    gpu_row.uses_gpu = True
    for result in (gpu_row, cpu_row):
        time_epoch(spec, result, lambda: iter([[1]] * 4), n_timed=3, size=len)
    assert 1 <= gpu_row.peak_gpu_used_bytes <= 6
    assert cpu_row.peak_gpu_used_bytes is None  # never asked for a CPU row
    rows = [{"store_label": "s", "summary": summarize(r)} for r in (gpu_row, cpu_row)]
    table = markdown_table(rows)
    assert "GPU in use GB" in table.splitlines()[0]
