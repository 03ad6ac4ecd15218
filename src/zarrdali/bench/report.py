"""System header, markdown table, JSON and plot for benchmark results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

from zarrdali.bench.measure import RunResult


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
        from zarrdali.gpu import kvikio_io_mode

        mode = kvikio_io_mode()
    except Exception as err:  # not installed, or no cuFile driver
        return f"off ({type(err).__name__}: {err})"
    return "on" if mode == "gds" else "off (kvikIO POSIX compatibility mode)"


def system_info() -> dict:
    """What the numbers were measured on (never probes a GPU unless one is asked for)."""
    from zarrdali.gpu import gpu_description

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


def write_results(out_dir: str | Path, name: str, results: dict, **meta) -> Path:
    """``results`` as ``out_dir/name`` (JSON), with what they were measured on and
    by which command (the running script's argv) under ``"meta"``."""
    import sys

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    payload = {"meta": {"command": command, "system": system_info(), **meta}, **results}
    path = out / name
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


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
        # CPU time of every process it ran (user + system) per sample: what it
        # costs, whatever else runs on the machine (samples/s per core: 1000 / this)
        "cpu_ms_per_sample": _stats(
            [1e3 * c / result.samples_per_epoch for c in result.cpu_seconds]
            if result.samples_per_epoch
            else []
        ),
        "wait_fraction": _stats(
            [w / s for w, s in zip(result.wait_seconds, seconds, strict=False)]
        ),
        "peak_rss_gb": result.peak_rss_bytes / 1e9 if result.peak_rss_bytes else None,
        "peak_gpu_gb": None if result.peak_gpu_bytes is None else result.peak_gpu_bytes / 1e9,
        "peak_gpu_used_gb": None
        if result.peak_gpu_used_bytes is None
        else result.peak_gpu_used_bytes / 1e9,
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
    gpu_used = any(r["summary"].get("peak_gpu_used_gb") is not None for r in rows)
    columns = [("store", lambda r, s: r["store_label"])]
    if any(r.get("batch_size") is not None for r in rows):
        columns.append(("batch", lambda r, s: str(r.get("batch_size", ""))))
    columns += [
        ("loader", lambda r, s: s["name"]),
        ("samples/s median (min–max)", lambda r, s: _fmt(s["samples_per_s"], 1)),
        ("decoded GB/s", lambda r, s: _fmt(s["decoded_gb_per_s"], 2)),
        ("first batch s", lambda r, s: _fmt(s.get("first_batch_s"), 2)),
        ("CPU %", lambda r, s: _fmt(s.get("cpu_utilization"), 0, 100)),
        ("CPU ms/sample", lambda r, s: _fmt(s.get("cpu_ms_per_sample"), 2)),
        ("peak memory GB", lambda r, s: _gb(s.get("peak_rss_gb"))),
    ]
    if gpu:
        columns.append(("peak GPU GB", lambda r, s: _gb(s.get("peak_gpu_gb"))))
    if gpu_used:
        columns.append(("GPU in use GB", lambda r, s: _gb(s.get("peak_gpu_used_gb"))))
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


BASELINE = "torch DataLoader + xarray"
# Bar colours by kind of row: zarrdali's own, the loaders it replaces, decode ceilings.
KIND_COLORS = {"zarrdali": "#2f6fd0", "peer": "#e08a2c", "ceiling": "#9a9a9a"}


def row_kind(name: str) -> str:
    """``zarrdali``, ``ceiling`` (decode-only rates, not loaders) or ``peer``."""
    if name.startswith("zarrdali"):
        return "zarrdali"
    if name.startswith("numcodecs"):
        return "ceiling"
    return "peer"


def plot_throughput(path: Path, rows: list[dict]) -> bool:
    """Median samples/s per loader, one panel per store, min–max whiskers.

    Bars are coloured by kind (zarrdali, peers, ceilings) and labelled with
    their ratio to the torch DataLoader over xarray on the same store; loaders
    that were skipped or failed are listed in their panel with the reason.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    stores = list(dict.fromkeys(r["store_label"] for r in rows))
    if not any(_ok(r) for r in rows):
        return False
    heights = [max(1, len([r for r in rows if r["store_label"] == s])) for s in stores]
    fig, axes = plt.subplots(
        len(stores),
        1,
        figsize=(9, 1.0 + 0.42 * sum(heights) + 0.6 * len(stores)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    top = max(r["summary"]["samples_per_s"]["max"] for r in rows if _ok(r))
    for ax, store in zip(axes[:, 0], stores, strict=True):
        mine = [r for r in rows if r["store_label"] == store]
        base = next((r for r in mine if _ok(r) and r["summary"]["name"] == BASELINE), None)
        base_rate = base["summary"]["samples_per_s"]["median"] if base else None
        names, notes = [], []
        for y, r in enumerate(mine):
            s = r["summary"]
            names.append(s["name"])
            if not _ok(r):
                reason = (s.get("error") or s["status"]).splitlines()[0][:90]
                ax.text(1.0, y, f"  {s['status']}: {reason}", va="center", fontsize=7, color="#a33")
                continue
            rate = s["samples_per_s"]
            ax.barh(
                y,
                rate["median"],
                xerr=[[rate["median"] - rate["min"]], [rate["max"] - rate["median"]]],
                color=KIND_COLORS[row_kind(s["name"])],
                capsize=3,
                height=0.7,
            )
            label = f"  {rate['median']:,.0f}/s"
            if s["name"] == BASELINE:
                label += "  (baseline)"
            elif base_rate:
                label += f"  ·  {rate['median'] / base_rate:.1f}× torch"
            notes.append((y, rate["max"], label))
        for y, x, label in notes:
            ax.text(x, y, label, va="center", fontsize=8)
        ax.set_yticks(range(len(mine)), names, fontsize=8)
        ax.set_ylim(len(mine) - 0.4, -0.6)  # first row on top
        ax.set_xscale("log")
        ax.set_xlim(1.0, top * 15)
        ax.set_title(store, loc="left", fontsize=9, fontweight="bold")
        ax.grid(axis="x", which="major", alpha=0.3)
    axes[-1, 0].set_xlabel("samples / s (median, whiskers min–max; log scale)")
    handles = [Patch(color=c, label=k) for k, c in KIND_COLORS.items()]
    fig.suptitle("zarrdali bench: throughput per loader", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    # below the panels, never on the data
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        fontsize=8,
        ncols=3,
        frameon=False,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


# Line colours, never one twice in a plot: zarrdali's rows in blues (its default
# row the strongest, drawn thick and on top), the peers in warm and other hues,
# the ceilings in greys (dashed).
_PALETTES = {
    "zarrdali": ["#0b3d91", "#3f7fe0", "#00a0b0", "#7fb3ff", "#1d6f9f", "#5f4bb6"],
    "peer": ["#e66100", "#2ca02c", "#c2185b", "#8c564b", "#bcbd22", "#d62728", "#ff9da7"],
    "ceiling": ["#000000", "#6b6b6b", "#a0a0a0", "#3d3d3d", "#c7c7c7"],
}
_EXTRA_COLORS = ["#17becf", "#9467bd", "#aec7e8", "#ffbb78", "#98df8a", "#f7b6d2", "#dbdb8d"]
# zarrdali's own row, the one the plot is about
MAIN_ROW = "zarrdali[cpu]"


def line_colors(names: list[str]) -> dict[str, str]:
    """A distinct colour per loader name, by kind (see ``_PALETTES``); zarrdali's
    main row always gets the strongest blue."""
    colors: dict[str, str] = {}
    used: set[str] = set()
    spare = iter(_EXTRA_COLORS)
    for name in sorted(dict.fromkeys(names), key=_row_order):
        free = [c for c in _PALETTES[row_kind(name)] if c not in used]
        color = free[0] if free else next(c for c in spare if c not in used)
        colors[name] = color
        used.add(color)
    return colors


def _row_order(name: str) -> tuple[int, int]:
    """Legend order: zarrdali's rows, then peers, then ceilings; the main row first."""
    kind = {"zarrdali": 0, "peer": 1, "ceiling": 2}[row_kind(name)]
    return kind, 0 if name == MAIN_ROW else 1


def plot_batch_sizes(path: Path, rows: list[dict]) -> bool:
    """Median samples/s against batch size, one line per loader, one panel per store
    (whiskers: min–max), log-log; False without matplotlib or data.

    Every loader has its own colour, the same in every panel; zarrdali's default
    row is drawn thick and on top; the legend sits beside the panels, never on
    the data.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if _ok(r) and r.get("batch_size")]
    if not ok:
        return False
    stores = list(dict.fromkeys(r["store_label"] for r in ok))
    names = sorted(dict.fromkeys(r["summary"]["name"] for r in ok), key=_row_order)
    colors = line_colors(names)
    fig, axes = plt.subplots(1, len(stores), figsize=(5.2 * len(stores), 4.6), squeeze=False)
    markers = {"zarrdali": "o", "peer": "s", "ceiling": "^"}
    lines = {}
    for ax, store in zip(axes[0], stores, strict=True):
        mine = [r for r in ok if r["store_label"] == store]
        for name in names:
            pts = sorted(
                (r["batch_size"], r["summary"]["samples_per_s"])
                for r in mine
                if r["summary"]["name"] == name
            )
            if not pts:
                continue
            sizes = [b for b, _ in pts]
            med = [st["median"] for _, st in pts]
            err = [
                [m - st["min"] for m, (_, st) in zip(med, pts, strict=True)],
                [st["max"] - m for m, (_, st) in zip(med, pts, strict=True)],
            ]
            kind = row_kind(name)
            main = name == MAIN_ROW
            lines[name] = ax.errorbar(
                sizes,
                med,
                yerr=err,
                color=colors[name],
                marker=markers[kind],
                markersize=8 if main else 5,
                linewidth=3.2 if main else 1.4,
                linestyle="--" if kind == "ceiling" else "-",  # ceilings: dashed
                capsize=3,
                zorder=10 if main else 2,
                label=name,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["batch_size"] for r in mine}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        # plain numbers (20, 50, 100), not 2x10^1, on major and the labelled minor ticks
        ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
        ax.yaxis.set_minor_formatter(
            matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
        )
        ax.set_xlabel("batch size")
        ax.set_title(store, loc="left", fontsize=10, fontweight="bold")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("samples / s (median, whiskers min–max)")
    fig.suptitle("zarrdali bench: samples/s against batch size", x=0.01, ha="left", fontsize=10)
    fig.legend(
        [lines[n] for n in names if n in lines],
        [n for n in names if n in lines],
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend beside the panels
    plt.close(fig)
    return True


def _ok(row: dict) -> bool:
    s = row["summary"]
    return s["status"] == "ok" and bool(s["samples_per_s"]["median"])


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
