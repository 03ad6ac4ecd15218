"""What the batch options cost: zarrdali[cpu] with and without timestamps, static fields, masks.

Each configuration runs in its own process (``--baseline-src`` adds a row for
another checkout's ``src``, e.g. the commit before the options existed), in
interleaved rounds, so a drift of the machine's speed affects all alike. The
figure compared is CPU time per sample of the whole process tree (training
process and worker processes), which contention from other work on the
machine barely moves; samples/s is printed too but on a shared machine it is
mostly noise.

    python benchmarks/options_cost.py sample-data/era5_sharded.zarr --rounds 6 \\
        --baseline-src ../main/src --out benchmarks/results/options-cpu-2core
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "default": {},  # timestamps served where the store has a time coordinate
    "time=False": {"time": False},
    "static": {"static": ["lsm", "orography"]},
    "masks": {"masks": True},
    "nan_fill": {"nan_fill": 0.0},
    "static+masks+nan_fill": {"static": ["lsm", "orography"], "masks": True, "nan_fill": 0.0},
}


def _tree_cpu() -> float:
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:
            continue
        total += c.user + c.system
    return total


def measure(store: str, options: dict, epochs: int, batches: int) -> dict:
    """In this process: one warm-up pass, then ``epochs`` of ``batches`` timed."""
    import zarrdali

    loader = zarrdali.ZarrLoader(
        store,
        ["t2m", "u10", "v10", "msl"],
        input_steps=4,
        target_steps=2,
        tile=(128, 128),
        batch_size=8,
        shuffle=True,
        device="cpu",
        **options,
    )
    it = iter(loader)
    for _ in zip(range(4), it, strict=False):  # spawn the workers, warm the page cache
        pass
    it.close()
    samples, keys = 0, []
    cpu0, t0 = _tree_cpu(), time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        it = iter(loader)
        for _, batch in zip(range(batches), it, strict=False):
            samples += len(batch["index"])
            keys = sorted(batch)
        it.close()
    wall, cpu = time.perf_counter() - t0, _tree_cpu() - cpu0
    loader.close()
    return {"samples": samples, "wall_s": wall, "cpu_s": cpu, "keys": keys}


def _child(args: argparse.Namespace, mode: str, src: str | None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.path.abspath(src)
    options = {} if mode == "baseline" else MODES[mode]
    cmd = [
        sys.executable,
        __file__,
        "--child",
        json.dumps(options),
        args.store,
        "--epochs",
        str(args.epochs),
        "--batches",
        str(args.batches),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--baseline-src", help="another checkout's src/ for a 'baseline' row")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.store, json.loads(args.child), args.epochs, args.batches)))
        return
    modes = (["baseline"] if args.baseline_src else []) + list(args.modes)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            src = args.baseline_src if mode == "baseline" else None
            runs[mode].append(_child(args, mode, src))
            print(f"round {r + 1} {mode}: {runs[mode][-1]}", file=sys.stderr)
    rows = []
    for mode, rs in runs.items():
        cpu = [1e3 * x["cpu_s"] / x["samples"] for x in rs]
        rate = [x["samples"] / x["wall_s"] for x in rs]
        rows.append(
            {
                "mode": mode,
                "keys": rs[-1]["keys"],
                "cpu_ms_per_sample": {
                    "median": statistics.median(cpu),
                    "min": min(cpu),
                    "max": max(cpu),
                    "all": cpu,
                },
                "samples_per_s": {
                    "median": statistics.median(rate),
                    "min": min(rate),
                    "max": max(rate),
                },
            }
        )
    ref_mode = "default" if "default" in args.modes else rows[0]["mode"]
    ref = next(r for r in rows if r["mode"] == ref_mode)["cpu_ms_per_sample"]["median"]
    lines = [
        f"| configuration | batch keys | CPU ms/sample median (min–max) | × {ref_mode} "
        "| samples/s median (min–max) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        c, s = r["cpu_ms_per_sample"], r["samples_per_s"]
        lines.append(
            f"| {r['mode']} | {', '.join(r['keys'])} | {c['median']:.2f} ({c['min']:.2f}–"
            f"{c['max']:.2f}) | {c['median'] / ref:.3f} | {s['median']:.1f} ({s['min']:.1f}–"
            f"{s['max']:.1f}) |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        payload = {
            "command": " ".join(sys.argv),
            "commit": commit,
            "machine": {
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "spec": {"epochs": args.epochs, "batches": args.batches, "rounds": args.rounds},
            "rows": rows,
        }
        (args.out / "options.json").write_text(json.dumps(payload, indent=2))
        (args.out / "options.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
