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
from .runners import RunResult, run_decode_ceiling, run_torch_xarray, run_zarrdali
from .spec import BenchSpec

log = logging.getLogger(__name__)

LOADERS: dict[str, Callable[[BenchSpec], RunResult]] = {
    "zarrdali-cpu": lambda spec: run_zarrdali(spec, "cpu"),
    "numcodecs-ceiling": run_decode_ceiling,
    "torch-xarray": run_torch_xarray,
}


def _run_one(name: str, spec: BenchSpec) -> RunResult:
    """Run one loader; a failure becomes a row with its error, never aborts the run."""
    try:
        return LOADERS[name](spec)
    except Exception as err:
        log.debug("loader %s failed:\n%s", name, traceback.format_exc())
        return RunResult(name, status="failed", error=f"{type(err).__name__}: {err}")


def ratios(rows: list[dict]) -> dict[str, float]:
    """The figures the project's performance goals are stated in."""
    by = {
        (r["store_label"], r["summary"]["name"]): r["summary"]
        for r in rows
        if r["summary"]["status"] == "ok"
    }
    out: dict[str, float] = {}
    for label in {r["store_label"] for r in rows}:
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
    jobs = [(label, path, name) for label, path in stores for name in loaders]
    for label, path, name in tqdm(jobs, desc="bench", disable=not progress):
        result = _run_one(name, replace(spec, store=path))
        rows.append(
            {"store_label": label, "store": path, "loader": name, "summary": summarize(result)}
        )
    payload = {"system": info, "spec": spec.to_json(), "results": rows, "ratios": ratios(rows)}
    write_json(out_dir / "bench.json", payload)
    table = markdown_table(rows)
    (out_dir / "bench.md").write_text(header_text(info) + "\n\n" + table + "\n")
    payload["plot"] = (
        str(out_dir / "throughput.png")
        if plot_throughput(out_dir / "throughput.png", rows)
        else None
    )
    payload["table"] = table
    return payload
