"""System header, markdown table, JSON and plot for benchmark results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

from .runners import RunResult


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gds_status(gpu: str) -> str:
    """GPUDirect Storage as kvikIO reports it ("off (...)" when it cannot be used)."""
    if gpu == "none":
        return "off (no GPU)"
    try:
        import kvikio
        import kvikio.defaults

        available = kvikio.DriverProperties().is_gds_available
        compat = kvikio.defaults.compat_mode()
    except Exception as err:  # not installed, or no cuFile driver
        return f"off ({type(err).__name__}: {err})"
    return "on" if available and not compat else f"off (compat mode {compat})"


def system_info() -> dict:
    """What the numbers were measured on (never probes a GPU unless one is asked for)."""
    from ..backends.gpu import gpu_description

    versions = {
        d: _version(d)
        for d in (
            "zarrdali",
            "zarr",
            "numcodecs",
            "numpy",
            "xarray",
            "dask",
            "torch",
            "nvidia-dali-cuda120",
            "nvidia-dali-cuda130",
            "nvidia-nvcomp-cu12",
            "nvidia-nvcomp-cu13",
            "kvikio-cu12",
            "kvikio-cu13",
            "cupy-cuda12x",
            "cupy-cuda13x",
            "xbatcher",
        )
    }
    gpu = gpu_description()
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "gds": _gds_status(gpu),
        "commit": _git_commit(),
        "versions": {k: v for k, v in versions.items() if v},
    }


def _stats(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(result: RunResult) -> dict:
    cores = os.cpu_count() or 1
    seconds = result.epoch_seconds
    return {
        "name": result.name,
        "note": result.note,
        "status": result.status,
        "error": result.error,
        "samples_per_epoch": result.samples_per_epoch,
        "epoch_seconds": seconds,
        "samples_per_s": _stats(result.samples_per_s()),
        "decoded_gb_per_s": _stats(result.decoded_gb_per_s())
        if result.decoded_bytes_per_epoch
        else None,
        "first_batch_s": _stats(result.first_batch_seconds),
        # share of the machine's cores busy while timed (1.0: all of them)
        "cpu_utilization": _stats(
            [c / (s * cores) for c, s in zip(result.cpu_seconds, seconds, strict=False)]
        ),
        "wait_fraction": _stats(
            [w / s for w, s in zip(result.wait_seconds, seconds, strict=False)]
        ),
        "peak_rss_gb": result.peak_rss_bytes / 1e9 if result.peak_rss_bytes else None,
        "peak_gpu_gb": None if result.peak_gpu_bytes is None else result.peak_gpu_bytes / 1e9,
        "cache": result.cache,
    }


def _fmt(stat: dict | None, digits: int, scale: float = 1.0) -> str:
    if not stat or stat["median"] is None:
        return "–"
    m, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _gb(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict], step_ms: float = 0.0) -> str:
    """One row per store and loader; failed and skipped ones say why in the note."""
    gpu = any(r["summary"].get("peak_gpu_gb") is not None for r in rows)
    columns = [
        ("store", lambda r, s: r["store_label"]),
        ("loader", lambda r, s: s["name"]),
        ("samples/s median (min–max)", lambda r, s: _fmt(s["samples_per_s"], 1)),
        ("decoded GB/s", lambda r, s: _fmt(s["decoded_gb_per_s"], 2)),
        ("first batch s", lambda r, s: _fmt(s.get("first_batch_s"), 2)),
        ("CPU %", lambda r, s: _fmt(s.get("cpu_utilization"), 0, 100)),
        ("peak RSS GB", lambda r, s: _gb(s.get("peak_rss_gb"))),
    ]
    if gpu:
        columns.append(("peak GPU GB", lambda r, s: _gb(s.get("peak_gpu_gb"))))
    if step_ms:
        columns.append((f"wait % ({step_ms:g} ms step)", lambda r, s: _wait(s)))
    columns.append(("note", lambda r, s: _note(s)))
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        s = row["summary"]
        lines.append("| " + " | ".join(cell(row, s) for _, cell in columns) + " |")
    return "\n".join(lines)


def _wait(s: dict) -> str:
    return _fmt(s.get("wait_fraction"), 0, 100)


def _note(s: dict) -> str:
    if s["status"] != "ok":
        return f"{s['status']}: {s['error']}".replace("|", "/")
    cache = s.get("cache", "warm")
    return s["note"] + ("" if cache in ("warm", "n/a") else f"; {cache} cache")


def header_text(info: dict) -> str:
    v = info["versions"]
    return (
        f"# zarrdali bench — {info['cpu']} ({info['cores']} cores), GPU: {info['gpu']}, "
        f"GDS: {info.get('gds', 'unknown')}\n"
        f"# python {info['python']}, commit {info['commit']}, "
        + ", ".join(f"{k} {val}" for k, val in v.items())
    )


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _whisker_bars(
    path: Path,
    rows: list[dict],
    stats: list[dict],
    *,
    scale: float,
    color: str,
    ylabel: str,
    title: str,
    log: bool = False,
    ylim: tuple[float, float] | None = None,
) -> bool:
    """One bar per row at ``scale * median``, whiskers for min–max; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['store_label']}\n{r['summary']['name']}" for r in rows]
    med = [scale * s["median"] for s in stats]
    lo = [m - scale * s["min"] for m, s in zip(med, stats, strict=True)]
    hi = [scale * s["max"] - m for m, s in zip(med, stats, strict=True)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    ax.bar(range(len(rows)), med, yerr=[lo, hi], capsize=4, color=color)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_throughput(path: Path, rows: list[dict]) -> bool:
    """Bars of median samples/s per loader and store, whiskers for min–max."""
    ok = [
        r
        for r in rows
        if r["summary"]["status"] == "ok" and r["summary"]["samples_per_s"]["median"]
    ]
    if not ok:
        return False
    return _whisker_bars(
        path,
        ok,
        [r["summary"]["samples_per_s"] for r in ok],
        scale=1.0,
        color="#3b7dd8",
        ylabel="samples / s (median, min–max)",
        title="zarrdali bench: throughput per loader",
        log=True,
    )


def plot_wait(path: Path, rows: list[dict], step_ms: float) -> bool:
    """Bars of the median share of time the consumer waited for data, min–max whiskers."""
    ok = [
        r
        for r in rows
        if r["summary"]["status"] == "ok"
        and (r["summary"].get("wait_fraction") or {}).get("median") is not None
    ]
    if not ok:
        return False
    return _whisker_bars(
        path,
        ok,
        [r["summary"]["wait_fraction"] for r in ok],
        scale=100.0,
        color="#d8823b",
        ylabel="consumer waiting for data, % of time",
        title=f"zarrdali bench: data wait with a {step_ms:g} ms training step",
        ylim=(0, 100),
    )
