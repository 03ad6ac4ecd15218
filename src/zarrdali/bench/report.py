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
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu_description(),
        "commit": _git_commit(),
        "versions": {k: v for k, v in versions.items() if v},
    }


def summarize(result: RunResult) -> dict:
    def stats(values: list[float]) -> dict:
        if not values:
            return {"median": None, "min": None, "max": None}
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {
        "name": result.name,
        "note": result.note,
        "status": result.status,
        "error": result.error,
        "samples_per_epoch": result.samples_per_epoch,
        "epoch_seconds": result.epoch_seconds,
        "samples_per_s": stats(result.samples_per_s()),
        "decoded_gb_per_s": stats(result.decoded_gb_per_s())
        if result.decoded_bytes_per_epoch
        else None,
    }


def _fmt(stat: dict | None, digits: int) -> str:
    if not stat or stat["median"] is None:
        return "–"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| store | loader | samples/s median (min–max) | decoded GB/s | note |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        note = s["note"] if s["status"] == "ok" else f"{s['status']}: {s['error']}"
        lines.append(
            f"| {row['store_label']} | {s['name']} | {_fmt(s['samples_per_s'], 1)} | "
            f"{_fmt(s['decoded_gb_per_s'], 2)} | {note} |"
        )
    return "\n".join(lines)


def header_text(info: dict) -> str:
    v = info["versions"]
    return (
        f"# zarrdali bench — {info['cpu']} ({info['cores']} cores), GPU: {info['gpu']}\n"
        f"# python {info['python']}, commit {info['commit']}, "
        + ", ".join(f"{k} {val}" for k, val in v.items())
    )


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def plot_throughput(path: Path, rows: list[dict]) -> bool:
    """Bars of median samples/s per loader and store, whiskers for min–max."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [
        r
        for r in rows
        if r["summary"]["status"] == "ok" and r["summary"]["samples_per_s"]["median"]
    ]
    if not ok:
        return False
    labels = [f"{r['store_label']}\n{r['summary']['name']}" for r in ok]
    med = [r["summary"]["samples_per_s"]["median"] for r in ok]
    lo = [m - r["summary"]["samples_per_s"]["min"] for m, r in zip(med, ok, strict=True)]
    hi = [r["summary"]["samples_per_s"]["max"] - m for m, r in zip(med, ok, strict=True)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ok)), 4.5))
    ax.bar(range(len(ok)), med, yerr=[lo, hi], capsize=4, color="#3b7dd8")
    ax.set_xticks(range(len(ok)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("samples / s (median, min–max)")
    ax.set_yscale("log")
    ax.set_title("zarrdali bench: throughput per loader")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
