"""``zarrdali bench``: every loader on the same store and samples, side by side."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from .report import (
    header_text,
    markdown_table,
    plot_throughput,
    summarize,
    system_info,
    write_json,
)
from .runners import (
    Runner,
    RunResult,
    decode_ceiling_runner,
    torch_xarray_runner,
    zarrdali_runner,
)
from .spec import BenchSpec

log = logging.getLogger(__name__)

# name on the command line: (name in the table, runner factory)
LOADERS: dict[str, tuple[str, Callable[[BenchSpec, RunResult], Runner]]] = {
    "zarrdali-cpu": ("zarrdali[cpu]", lambda spec, r: zarrdali_runner(spec, r, "cpu")),
    "numcodecs-ceiling": ("numcodecs decode ceiling", decode_ceiling_runner),
    "torch-xarray": ("torch DataLoader + xarray", torch_xarray_runner),
}


def _fail(result: RunResult, err: Exception, name: str) -> None:
    log.debug("loader %s failed:\n%s", name, traceback.format_exc())
    result.status, result.error = "failed", f"{type(err).__name__}: {err}"


def _advance(name: str, runner: Runner | None, result: RunResult) -> Runner | None:
    """Run one more epoch; a failure marks the row failed, never aborts the run."""
    if runner is None:
        return None
    try:
        next(runner)
        return runner
    except StopIteration:
        return None
    except Exception as err:
        _fail(result, err, name)
        return None


def ratios(rows: list[dict]) -> dict[str, float]:
    """The figures the project's performance goals are stated in."""
    by = {
        (r["store_label"], r["summary"]["name"]): r["summary"]
        for r in rows
        if r["summary"]["status"] == "ok"
    }
    out: dict[str, float] = {}
    for label in dict.fromkeys(r["store_label"] for r in rows):
        z = by.get((label, "zarrdali[cpu]"))
        ceiling = by.get((label, "numcodecs decode ceiling"))
        torch_x = by.get((label, "torch DataLoader + xarray"))
        if z and ceiling and ceiling["decoded_gb_per_s"]:
            out[f"{label}: zarrdali[cpu] / numcodecs ceiling (GB/s)"] = (
                z["decoded_gb_per_s"]["median"] / ceiling["decoded_gb_per_s"]["median"]
            )
        if z and torch_x:
            out[f"{label}: zarrdali[cpu] / torch+xarray (samples/s)"] = (
                z["samples_per_s"]["median"] / torch_x["samples_per_s"]["median"]
            )
    return out


def _bench_store(label: str, path: str, spec: BenchSpec, loaders: Sequence[str], bar) -> list:
    results = {name: RunResult(LOADERS[name][0]) for name in loaders}
    runners: dict[str, Runner | None] = {}
    for name in loaders:
        try:
            runners[name] = LOADERS[name][1](spec, results[name])
        except Exception as err:
            _fail(results[name], err, name)
            runners[name] = None
    # Epoch by epoch, every loader in turn: drifts of the machine hit all alike.
    for _ in range(spec.epochs):
        for name in loaders:
            runners[name] = _advance(name, runners[name], results[name])
            bar.update()
    for runner in runners.values():
        if runner is not None:
            runner.close()
    return [
        {"store_label": label, "store": path, "loader": name, "summary": summarize(results[name])}
        for name in loaders
    ]


def run_bench(
    stores: Sequence[tuple[str, str]],
    spec: BenchSpec,
    loaders: Sequence[str],
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> dict:
    """Benchmark ``loaders`` on each ``(label, path)`` store; write JSON, table and plot."""
    unknown = [n for n in loaders if n not in LOADERS]
    if unknown:
        raise ValueError(f"unknown loader(s) {unknown}; choose from {sorted(LOADERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = system_info()
    rows = []
    total = len(stores) * len(loaders) * spec.epochs
    with tqdm(total=total, desc="bench", disable=not progress) as bar:
        for label, path in stores:
            rows += _bench_store(label, path, replace(spec, store=path), loaders, bar)
    payload = {"system": info, "spec": spec.to_json(), "results": rows, "ratios": ratios(rows)}
    write_json(out_dir / "bench.json", payload)
    table = markdown_table(rows)
    (out_dir / "bench.md").write_text(header_text(info) + "\n\n" + table + "\n")
    plotted = plot_throughput(out_dir / "throughput.png", rows)
    payload["plot"] = str(out_dir / "throughput.png") if plotted else None
    payload["table"] = table
    return payload
