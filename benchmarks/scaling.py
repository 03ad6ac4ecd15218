"""How zarrdali's cost grows with the work: samples/s and host memory against the
batch size and against the number of channels, on tiles and on whole fields.

Four sweeps, each point a fresh process (so memory is that point's alone):

- tiles, batch size: 4+2 frames of 128 x 128 tiles (the loader's default
  grid: on the 128 x 128 chunk grid but for the edge row and column) of the 4
  surface variables, batches of 8 to 256;
- tiles, channels: the same at batch 32, with 4 to 69 channels (the surface
  variables, then 13 pressure levels of one more variable at a time);
- whole fields, batch size: 2+1 frames of whole 121 x 240 fields of the 4
  surface variables, batches of 8 to 256;
- whole fields, channels: the same at batch 8, 4 to 69 channels.

Data: a WeatherBench2-layout sample store (:mod:`zarrdali.sample_wb2`: 5
pressure-level variables x 13 levels + 4 surface variables = 69 channels) on
WeatherBench2's 1.5-degree grid for whole fields, and on a 0.5-degree grid
(361 x 720) copied by ``zarrdali prepare`` into 128 x 128 inner chunks in
shards for tiles; both written into ``--data-dir`` on first use.

Each point runs ``ZarrLoader(..., device="cpu")`` with its defaults (worker
processes decoding into shared memory) in a child process, iterated as a
training loop would (across epochs where an epoch is shorter than the timed
batches): ``--warmup`` batches, then batches for at least ``--seconds`` (and
at least ``--min-batches``). Memory is zarrdali's alone: the proportional set
size (PSS, ``/proc/<pid>/smaps_rollup``: shared pages split between the
processes that map them, so the shared-memory ring counts once) of the child and
every process below it (the workers), sampled every 20 ms by this process,
peak over the run, less the child's own PSS just before the loader was made
(Python, numpy, torch, zarr imported: what any training process holds
without zarrdali). Every point runs ``--passes`` times (sweep after sweep);
the table gives its best samples/s (a busy machine only slows a run down) and
its highest memory figures.

Prints a table and writes ``scaling.json``, ``scaling.md`` and
``scaling.png`` to ``--out``.

    python benchmarks/scaling.py --out benchmarks/results/scaling-cpu-2core
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

SURFACE = (
    "2m_temperature",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "mean_sea_level_pressure",
)
LEVEL_VARIABLES = (
    "geopotential",
    "temperature",
    "u_component_of_wind",
    "v_component_of_wind",
    "specific_humidity",
)
N_LEVELS = 13
TILE_STORE = "tiles_361x720.zarr"
BATCH_SIZES = (8, 32, 64, 128, 256)
CHANNEL_STEPS = tuple(range(len(LEVEL_VARIABLES) + 1))  # level variables added: 4..69 channels
WORKLOADS = {
    # name: (input_steps, target_steps, tile, batch for the channel sweep)
    "tiles": (4, 2, (128, 128), 32),
    "whole fields": (2, 1, None, 8),
}


def variables_with(n_level_variables: int) -> list[str]:
    return [*SURFACE, *LEVEL_VARIABLES[:n_level_variables]]


def channels_of(n_level_variables: int) -> int:
    return len(SURFACE) + N_LEVELS * n_level_variables


# -- data --------------------------------------------------------------------------


def ensure_stores(data_dir: Path) -> dict[str, str]:
    """The whole-field store (WeatherBench2's 1.5-degree grid) and the tile store
    (0.5-degree grid, prepared into 128 x 128 inner chunks), written on first use."""
    from zarrdali.sample_wb2 import WB2_STORE, WB2SampleSpec, wb2_sample_exists, write_wb2_sample

    whole_dir, tile_src = data_dir / "whole", data_dir / "tiles-src"
    if not wb2_sample_exists(whole_dir):
        print(f"writing the whole-field store to {whole_dir} (once)", file=sys.stderr)
        write_wb2_sample(whole_dir, WB2SampleSpec(), progress=False)
    tiles = data_dir / TILE_STORE
    if not (tiles / "zarr.json").exists():
        if not wb2_sample_exists(tile_src):
            print(f"writing the 361 x 720 source to {tile_src} (once)", file=sys.stderr)
            spec = WB2SampleSpec(n_time=24, n_lat=361, n_lon=720, time_block=2)
            write_wb2_sample(tile_src, spec, progress=False)
        print(f"preparing the tile store {tiles} (once)", file=sys.stderr)
        cmd = [sys.executable, "-m", "zarrdali", "prepare", str(tile_src / WB2_STORE), str(tiles)]
        subprocess.run([*cmd, "--tile", "128x128", "-q"], check=True)
    return {"whole fields": str(whole_dir / WB2_STORE), "tiles": str(tiles)}


# -- one point, in a child process ---------------------------------------------------


def pss_kib(pid: int) -> int:
    """The proportional set size of ``pid`` (KiB); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def child_main(point: dict) -> None:
    """Run one point: print ``ready`` (imports done, no loader yet), wait for the
    parent's go, then time the loader and print its result as JSON."""
    import numpy as np
    import torch  # noqa: F401  (what a training process holds anyway)
    import zarr  # noqa: F401

    import zarrdali

    print("ready", flush=True)
    sys.stdin.readline()  # the parent has read the baseline
    t0 = time.perf_counter()
    loader = zarrdali.ZarrLoader(
        point["store"],
        point["variables"],
        input_steps=point["input_steps"],
        target_steps=point["target_steps"],
        tile=point["tile"],
        batch_size=point["batch_size"],
        shuffle=True,
        seed=0,
        device="cpu",
        workers=point.get("workers"),  # None: the loader's default
    )
    built = time.perf_counter() - t0

    def batches():
        while True:
            yield from loader

    it = batches()
    for _ in range(point["warmup"]):
        next(it)
    n = k = 0
    t0 = time.perf_counter()
    while k < point["min_batches"] or time.perf_counter() - t0 < point["seconds"]:
        batch = next(it)
        n += len(batch["index"])
        k += 1
    seconds = time.perf_counter() - t0
    workers = loader.workers
    it.close()
    loader.close()
    result = {"samples": n, "batches": k, "seconds": seconds, "constructor_s": built}
    result.update(samples_per_s=n / seconds, workers=workers, numpy=np.__version__)
    print(json.dumps(result), flush=True)


def run_point(point: dict) -> dict:
    """One point in a child process, its process tree's PSS sampled meanwhile."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(point)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"point {point} did not start")
        baseline = pss_kib(proc.pid)
        peak = {"total": 0, "main": 0, "others": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pids = descendants(proc.pid)
                each = [pss_kib(p) for p in pids]
                peak["total"] = max(peak["total"], sum(each))
                peak["main"] = max(peak["main"], each[0])
                peak["others"] = max(peak["others"], sum(each[1:]))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        done.set()
        sampler.join()
        if proc.wait(timeout=60) != 0 or not line:
            raise RuntimeError(f"point {point} failed (exit {proc.returncode})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(line)
    mib = 1 / 1024
    result.update(
        zarrdali_peak_mib=(peak["total"] - baseline) * mib,
        training_process_share_mib=(peak["main"] - baseline) * mib,
        worker_processes_mib=peak["others"] * mib,
        baseline_mib=baseline * mib,
    )
    return result


def report_point(point: dict, result: dict) -> None:
    print(
        f"{point['workload']:>12} {point['sweep']:>10}: batch {point['batch_size']:>3}, "
        f"{point['channels']:>2} channels: {result['samples_per_s']:8.1f} samples/s, "
        f"zarrdali {result['zarrdali_peak_mib']:7.0f} MiB "
        f"(workers {result['worker_processes_mib']:.0f}, "
        f"training process {result['training_process_share_mib']:.0f})",
        flush=True,
    )


def best_of(point: dict, runs: list[dict]) -> dict:
    """A point's row: the best samples/s of its runs, the highest of each memory figure."""
    row = {**point, **max(runs, key=lambda r: r["samples_per_s"])}
    for key in ("zarrdali_peak_mib", "training_process_share_mib", "worker_processes_mib"):
        row[key] = max(r[key] for r in runs)
    row["runs"] = runs
    return row


def points(stores: dict[str, str], args) -> list[dict]:
    """Every point of the four sweeps (a point both sweeps share is run once per sweep)."""
    out = []
    for workload, (steps_in, steps_out, tile, channel_batch) in WORKLOADS.items():
        common = dict(
            workload=workload,
            store=stores[workload],
            input_steps=steps_in,
            target_steps=steps_out,
            tile=tile,
            warmup=args.warmup,
            seconds=args.seconds,
            min_batches=args.min_batches,
        )
        for b in args.batch_sizes:
            out.append(dict(common, sweep="batch size", batch_size=b, variables=variables_with(0)))
        for n in args.level_variables:
            v = variables_with(n)
            out.append(dict(common, sweep="channels", batch_size=channel_batch, variables=v))
    for p in out:
        p["channels"] = channels_of(len(p["variables"]) - len(SURFACE))
        h, w = p["tile"] or ((121, 240) if p["workload"] == "whole fields" else (361, 720))
        p["batch_mib"] = (
            p["batch_size"] * (p["input_steps"] + p["target_steps"]) * p["channels"] * h * w * 4
        ) / 2**20
    return out


# -- report ----------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    lines = []
    for workload in WORKLOADS:
        for sweep in ("batch size", "channels"):
            sel = [r for r in rows if r["workload"] == workload and r["sweep"] == sweep]
            if not sel:
                continue
            fixed = (
                f"{sel[0]['channels']} channels"
                if sweep == "batch size"
                else f"batch {sel[0]['batch_size']}"
            )
            lines += [
                f"**{workload}, against the {sweep}** ({fixed}):",
                "",
                "| batch | channels | samples/s | MB/s served | one batch MiB | "
                "zarrdali peak MiB | its worker processes' peak | "
                "the training process's peak share |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in sel:
                served = r["samples_per_s"] * r["batch_mib"] / r["batch_size"] * 2**20 / 1e6
                lines.append(
                    f"| {r['batch_size']} | {r['channels']} | {r['samples_per_s']:.1f} | "
                    f"{served:.0f} | {r['batch_mib']:.1f} | {r['zarrdali_peak_mib']:.0f} | "
                    f"{r['worker_processes_mib']:.0f} | {r['training_process_share_mib']:.0f} |"
                )
            lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, sweep in enumerate(("batch size", "channels")):
        x_key = "batch_size" if sweep == "batch size" else "channels"
        for workload, marker, color in zip(WORKLOADS, "os", ("C0", "C1"), strict=True):
            sel = [r for r in rows if r["workload"] == workload and r["sweep"] == sweep]
            if not sel:
                continue
            x = [r[x_key] for r in sel]
            style = dict(marker=marker, color=color)
            axes[0, col].plot(x, [r["samples_per_s"] for r in sel], **style, label=workload)
            peak = [r["zarrdali_peak_mib"] for r in sel]
            axes[1, col].plot(x, peak, **style, label=f"{workload}: zarrdali's peak")
            one_batch = [r["batch_mib"] for r in sel]
            axes[1, col].plot(x, one_batch, ls=":", **style, label=f"{workload}: one batch")
        for row in (0, 1):
            axes[row, col].set_xscale("log", base=2)
            axes[row, col].set_yscale("log")
            axes[row, col].grid(True, which="both", alpha=0.3)
            axes[row, col].set_xlabel(x_key.replace("_", " "))
        axes[0, col].set_ylabel("samples/s")
        axes[1, col].set_ylabel("peak host memory of zarrdali, MiB")
        axes[0, col].set_title(f"against the {sweep}")
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=8)
    fig.suptitle("zarrdali[cpu]: cost as work grows (tiles 4+2 x 128x128; whole fields 2+1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("zarrdali", "zarr", "numcodecs", "numpy", "torch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("bench-data/scaling"))
    p.add_argument("--out", type=Path, default=Path("bench-out/scaling"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    p.add_argument(
        "--level-variables",
        type=int,
        nargs="+",
        default=list(CHANNEL_STEPS),
        help="pressure-level variables (13 channels each) beside the 4 surface ones",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed batches")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per point (at least)")
    p.add_argument("--min-batches", type=int, default=4, help="timed batches per point (at least)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument(
        "--passes",
        type=int,
        default=2,
        help="runs of every point, one sweep after the other; reported: the best samples/s "
        "and the highest peak memory (a busy machine only ever slows a point down)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, help="only redo the table and plot of this scaling.json")
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    if args.report:
        rows = json.loads(args.report.read_text())["rows"]
        (args.report.parent / "scaling.md").write_text(markdown(rows) + "\n")
        plot(rows, args.report.parent / "scaling.png")
        return 0
    from zarrdali.bench.report import _git_commit

    commit = _git_commit()  # the checkout zarrdali is imported from
    stores = ensure_stores(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    todo = [p for p in points(stores, args) if p["workload"] in args.workloads]
    runs: list[list[dict]] = [[] for _ in todo]
    for k in range(args.passes):
        for point, done in zip(todo, runs, strict=True):
            done.append(run_point(point))
            print(f"pass {k + 1}: ", end="")
            report_point(point, done[-1])
    rows = [best_of(point, done) for point, done in zip(todo, runs, strict=True)]
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "commit": commit,
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - t0,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    (args.out / "scaling.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(rows)
    (args.out / "scaling.md").write_text(table + "\n")
    plot(rows, args.out / "scaling.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
