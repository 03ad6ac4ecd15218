"""``zarrdali bench``: every loader on the same store and samples, side by side."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from zarrdali.bench.measure import RunResult, child_pids
from zarrdali.bench.report import (
    BASELINE,
    header_text,
    markdown_table,
    plot_batch_sizes,
    plot_throughput,
    plot_wait,
    summarize,
    system_info,
    write_json,
)
from zarrdali.bench.runners import (
    Runner,
    Skipped,
    decode_ceiling_runner,
    file_ceiling_runner,
    torch_xarray_runner,
    xbatcher_runner,
    zarr_gpu_runner,
    zarrdali_runner,
)
from zarrdali.bench.spec import BenchSpec
from zarrdali.bench.tensorstore_peer import tensorstore_runner
from zarrdali.bench.zarr_peers import fused_runner, zarrs_runner
from zarrdali.sample_data import STATIC

log = logging.getLogger(__name__)

# The ceiling the goals are stated against: pread of the chunks each batch
# touches + numcodecs decode, all threads.
FILE_CEILING = "numcodecs ceiling from files (pread + decode)"
# zarrdali[cpu] serving static fields, masks and nan_fill: what those options cost.
OPTIONS_ROW = "zarrdali[cpu] + static, masks, nan_fill"
# Readers a performance-minded user picks instead; the goal is stated against the best.
FAST_PEERS = ("TensorStore", "zarr-python")

# name on the command line: (name in the table, runner factory). A runner that
# cannot run here raises Skipped(reason) before its first epoch.
LOADERS: dict[str, tuple[str, Callable[[BenchSpec, RunResult], Runner]]] = {
    "zarrdali-cpu": ("zarrdali[cpu]", lambda spec, r: zarrdali_runner(spec, r, "cpu")),
    "zarrdali-cpu-whole": (
        "zarrdali[cpu] whole chunks",
        lambda spec, r: zarrdali_runner(spec, r, "cpu", partial_decode=False),
    ),
    "zarrdali-cpu-threads": (
        "zarrdali[cpu] in-process threads",
        lambda spec, r: zarrdali_runner(spec, r, "cpu", workers=0),
    ),
    "zarrdali-cpu-1worker": (
        "zarrdali[cpu] 1 worker",
        lambda spec, r: zarrdali_runner(spec, r, "cpu", workers=1),
    ),
    "zarrdali-cpu-options": (
        OPTIONS_ROW,
        lambda spec, r: zarrdali_runner(
            spec, r, "cpu", static=tuple(STATIC), masks=True, nan_fill=0.0
        ),
    ),
    "zarrdali-cuda": ("zarrdali[cuda]", lambda spec, r: zarrdali_runner(spec, r, "cuda")),
    "file-ceiling": (FILE_CEILING, file_ceiling_runner),
    "file-ceiling-contexts": (
        "numcodecs ceiling from files, libzstd reused contexts",
        lambda spec, r: file_ceiling_runner(spec, r, zstd_contexts=True),
    ),
    "tensorstore": ("TensorStore", tensorstore_runner),
    "numcodecs-ceiling": ("numcodecs decode ceiling", decode_ceiling_runner),
    "numcodecs-codec-api": (
        "numcodecs Codec.decode",
        lambda spec, r: decode_ceiling_runner(spec, r, codec_api=True),
    ),
    "numcodecs-zstd-contexts": (
        "numcodecs libzstd, reused contexts",
        lambda spec, r: decode_ceiling_runner(spec, r, zstd_contexts=True),
    ),
    "torch-xarray": ("torch DataLoader + xarray", torch_xarray_runner),
    "xbatcher": ("xbatcher + torch DataLoader", xbatcher_runner),
    "zarr-gpu": ("zarr-python enable_gpu()", zarr_gpu_runner),
    "zarr-async-fused": ("zarr-python async, fused pipeline", fused_runner),
    "zarr-zarrs": ("zarr-python + zarrs, async", zarrs_runner),
}


BASELINE_LOADER = "torch-xarray"


@dataclass(frozen=True)
class BenchTarget:
    """A store as the benchmark runs it: its label in the table, where it is, where
    tiles lie on it (``BenchSpec.placement``), and the loaders run on it (None:
    all of the run's)."""

    label: str
    path: str
    placement: str | None = None  # None: the spec's
    loaders: tuple[str, ...] | None = None


# What a bare `zarrdali bench` runs: the rows that answer a user's question. Is
# zarrdali faster than what I use now (the torch DataLoader over xarray) and than
# the fastest reader I could pick instead (TensorStore: ahead of zarr-python +
# zarrs in 3 of the 4 default settings, and a sixth of its run time), and how
# close is it to what the machine can do (the ceiling)? `--all` runs LOADERS.
DEFAULT_LOADERS = (
    "zarrdali-cpu",
    "zarrdali-cuda",
    "file-ceiling",
    "tensorstore",
    "torch-xarray",
)


def _fail(result: RunResult, err: Exception, name: str) -> None:
    if isinstance(err, Skipped):
        log.info("loader %s skipped: %s", name, err)
        result.status, result.error = "skipped", str(err)
        return
    log.debug("loader %s failed:\n%s", name, traceback.format_exc())
    result.status, result.error = "failed", f"{type(err).__name__}: {err}"


def _advance(name: str, runner: Runner | None, result: RunResult) -> Runner | None:
    """Run one more epoch; a failure marks the row failed, never aborts the run."""
    if runner is None:
        return None
    before = child_pids()
    result.foreign_pids = before - result.own_pids
    try:
        next(runner)
        return runner
    except StopIteration:
        return None
    except Exception as err:
        _fail(result, err, name)
        return None
    finally:
        result.own_pids |= child_pids() - before  # workers it started (persistent ones)


def _group(row: dict) -> str:
    """A store, and the batch size where a run has several."""
    b = row.get("batch_size")
    return row["store_label"] if b is None else f"{row['store_label']}, batch {b}"


def ratios(rows: list[dict]) -> dict[str, float]:
    """The figures the project's performance goals are stated in, per store and batch size."""
    by = {(_group(r), r["summary"]["name"]): r["summary"] for r in rows if _ok(r)}
    out: dict[str, float] = {}

    def ratio(label: str, name: str, other: str, key: str, metric: str = "samples_per_s"):
        a, b = by.get((label, name)), by.get((label, other))
        # a figure of 0 (e.g. CPU time too short for the clock's ticks) has no ratio
        if a and b and a[metric] and b[metric] and a[metric]["median"] and b[metric]["median"]:
            out[f"{label}: {key}"] = a[metric]["median"] / b[metric]["median"]

    z = "zarrdali[cpu]"
    for label in dict.fromkeys(_group(r) for r in rows):
        ratio(label, z, FILE_CEILING, f"{z} / {FILE_CEILING} (samples/s)")
        best = _best_peer(by, label)
        if best:
            ratio(label, z, best, f"{z} / best of TensorStore, zarr-python ({best})")
        ratio(label, z, "zarrdali[cpu] 1 worker", f"{z} / zarrdali[cpu] 1 worker (samples/s)")
        for name in (z, "zarrdali[cpu] whole chunks"):
            key = f"{name} / numcodecs ceiling (GB/s)"
            ratio(label, name, "numcodecs decode ceiling", key, "decoded_gb_per_s")
        for other, key in (
            ("numcodecs libzstd, reused contexts", "numcodecs libzstd reused contexts"),
            ("numcodecs Codec.decode", "numcodecs Codec.decode"),
        ):
            ratio(label, z, other, f"{z} / {key} (GB/s)", "decoded_gb_per_s")
        ratio(label, z, BASELINE, f"{z} / torch+xarray (samples/s)")
        ratio(label, z, "xbatcher + torch DataLoader", f"{z} / xbatcher (samples/s)")
        # the cost of the batch options (also in the table's CPU ms/sample column)
        ratio(label, OPTIONS_ROW, z, f"{OPTIONS_ROW} / {z} (samples/s)")
        ratio(label, OPTIONS_ROW, z, f"{OPTIONS_ROW} / {z} (CPU ms/sample)", "cpu_ms_per_sample")
    return out


def _ok(row: dict) -> bool:
    return row["summary"]["status"] == "ok" and bool(row["summary"]["samples_per_s"]["median"])


def _best_peer(by: dict, label: str) -> str | None:
    """The fastest reader a performance-minded user would pick instead of zarrdali."""
    peers = [
        name
        for group, name in by
        if group == label and name.startswith(FAST_PEERS) and "enable_gpu" not in name
    ]
    return max(peers, key=lambda n: by[(label, n)]["samples_per_s"]["median"], default=None)


def verdict(rows: list[dict]) -> list[str]:
    """A few lines that answer the user's question, per store and batch size:
    zarrdali's samples/s against the ceiling, the best peer and the torch
    DataLoader (what was not measured is left out, never guessed)."""
    by = {(_group(r), r["summary"]["name"]): r["summary"] for r in rows if _ok(r)}

    def rate(label: str, name: str | None) -> float | None:
        row = by.get((label, name)) if name else None
        return row["samples_per_s"]["median"] if row else None

    lines = []
    for label in dict.fromkeys(_group(r) for r in rows):
        for mine in ("zarrdali[cpu]", "zarrdali[cuda]"):
            own = rate(label, mine)
            if own is None:
                continue
            parts = []
            peer = _best_peer(by, label)
            for what, name in (
                ("the ceiling", FILE_CEILING),
                (f"the best peer, {peer}", peer),
                ("the torch DataLoader", BASELINE),
            ):
                other = rate(label, name)
                if other:
                    parts.append(f"{own / other:.2f}x {what} ({other:,.0f}/s)")
            compared = f": {', '.join(parts)}" if parts else ""
            lines.append(f"{label}: {mine} {own:,.0f} samples/s{compared}")
    return lines


def _unknown(name: str) -> RunResult:
    """A row for a loader name nobody knows: the others still run."""
    reason = f"unknown loader {name!r}; choose from {', '.join(LOADERS)}"
    return RunResult(name, status="skipped", error=reason)


def _bench_store(label: str, path: str, spec: BenchSpec, loaders: Sequence[str], bar) -> list:
    results = {
        name: RunResult(LOADERS[name][0]) if name in LOADERS else _unknown(name) for name in loaders
    }
    runners: dict[str, Runner | None] = {}
    for name in loaders:
        if name not in LOADERS:
            runners[name] = None
            continue
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
        {
            "store_label": label,
            "store": path,
            "batch_size": spec.batch_size,
            "placement": spec.placement,
            "loader": name,
            "summary": summarize(results[name]),
        }
        for name in loaders
    ]


def run_bench(
    stores: Sequence[tuple[str, str] | BenchTarget],
    spec: BenchSpec | Sequence[BenchSpec],
    loaders: Sequence[str],
    out_dir: str | Path,
    *,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Benchmark ``loaders`` on each ``(label, path)`` store (or
    :class:`BenchTarget`) at each spec (one per batch size); write JSON, table
    and plots.

    ``command`` (the command line that ran it) is recorded with the results.
    """
    specs = [spec] if isinstance(spec, BenchSpec) else list(spec)
    for name in loaders:
        if name not in LOADERS:
            log.warning("%s", _unknown(name).error)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = system_info()
    started = time.monotonic()
    rows = []
    targets = [t if isinstance(t, BenchTarget) else BenchTarget(*t) for t in stores]
    runs = [[n for n in loaders if t.loaders is None or n in t.loaders] for t in targets]
    total = sum(map(len, runs)) * len(specs) * specs[0].epochs
    with tqdm(total=total, desc="bench", disable=not progress) as bar:
        for target, names in zip(targets, runs, strict=True):
            for one in specs:
                placement = target.placement or one.placement
                spec = replace(one, store=target.path, placement=placement)
                rows += _bench_store(target.label, target.path, spec, names, bar)
    step_ms = specs[0].step_ms
    payload = {
        "command": command,
        "system": info,
        "spec": specs[0].to_json(),
        "batch_sizes": [one.batch_size for one in specs],
        "specs": [one.to_json() for one in specs],
        "results": rows,
        "ratios": ratios(rows),
        "verdict": verdict(rows),
        "wall_seconds": round(time.monotonic() - started, 1),  # every loader, every size
    }
    several = len({one.batch_size for one in specs}) > 1
    made = {
        "throughput.png": (plot_batch_sizes if several else plot_throughput)(
            out_dir / "throughput.png", rows
        ),
        # the wait fraction only means something when the consumer does work
        "wait.png": step_ms > 0 and plot_wait(out_dir / "wait.png", rows, step_ms),
    }
    payload["plots"] = [name for name, ok in made.items() if ok]
    write_json(out_dir / "bench.json", payload)
    text = header_text(info) + "\n\n" + markdown_table(rows, step_ms)
    if payload["verdict"]:
        text += "\n\n" + "\n".join(f"- {line}" for line in payload["verdict"])
    (out_dir / "bench.md").write_text(text + "\n")
    payload["plot"] = str(out_dir / "throughput.png") if made["throughput.png"] else None
    payload["table"] = text
    return payload
