"""The CPU path at small batches, before and after whole batches per worker, in one run.

Issue 30: on tiles that are whole inner chunks (nothing for partial decoding
to skip), batch 8 trailed the ceiling. Each batch used to be cut into parts
for every worker (at batch 8 on 2 workers: parts of 4 samples), each part
costing its worker a plan, a locate and its lists and the training process a
wake-up. Now a batch under 2 x 16 samples goes whole to one worker and more
batches are loaded ahead (``zarrdali.cpu.epoch.parts_per_batch``).

This runs, epoch by epoch in turn as ``zarrdali bench`` does (the same
runners, samples and timing): the file ceiling, TensorStore, zarrdali with
the policy before ("parts of every batch": ``prefetch`` batches ahead, at
least 8 samples per worker in flight, ``ceil(2 * workers / (ahead + 1))``
parts) and zarrdali as it is now, at each batch size, on chunk-grid tiles of
the sharded sample store. It writes ``bench.json``, ``bench.md`` and
``throughput.png`` like the bench, with the load average before and after.

    flock /tmp/zarrdali-bench.lock python benchmarks/small_batches.py \\
        sample-data/era5_sharded.zarr --batch-size 8 64 256 --out bench-out/small-batches
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import replace

import zarrdali.cpu.epoch as loader_module
from zarrdali.bench.main import LOADERS, run_bench
from zarrdali.bench.runners import Runner, RunResult, zarrdali_runner
from zarrdali.bench.spec import BenchSpec

BEFORE = "zarrdali[cpu] parts of every batch (before)"
PEERS = ("TensorStore", "zarr-python")


def ahead_before(prefetch: int, batch_size: int, workers: int) -> int:
    """Batches loaded ahead before issue 30: at least 8 samples per worker in flight."""
    return max(prefetch, min(64, -(-8 * workers // batch_size) - 1))


def parts_before(workers: int, ahead: int, batch_size: int) -> int:
    """Parts per batch before issue 30: about two per worker among the batches in flight."""
    return max(1, -(-2 * workers // (ahead + 1)))


@contextlib.contextmanager
def policy_before() -> Iterator[None]:
    """The loader's batch-splitting policy as it was, while an epoch of the
    'before' row starts (the loader reads it when it opens each epoch)."""
    saved = loader_module.batches_ahead, loader_module.parts_per_batch
    loader_module.batches_ahead, loader_module.parts_per_batch = ahead_before, parts_before
    try:
        yield
    finally:
        loader_module.batches_ahead, loader_module.parts_per_batch = saved


def before_runner(spec: BenchSpec, result: RunResult) -> Runner:
    """zarrdali[cpu] with the policy before issue 30, epoch by epoch."""
    with policy_before():
        inner = zarrdali_runner(spec, result, "cpu")
    try:
        while True:
            with policy_before():
                try:
                    next(inner)
                except StopIteration:
                    return
            yield
    finally:
        inner.close()


def ratio_lines(rows: list[dict]) -> list[str]:
    """Each zarrdali row against the ceiling and the best peer, per batch size."""
    rate = {
        (r["batch_size"], r["summary"]["name"]): r["summary"]["samples_per_s"]["median"]
        for r in rows
        if r["summary"]["status"] == "ok"
    }
    lines = []
    for b in dict.fromkeys(r["batch_size"] for r in rows):
        ceiling = rate.get((b, "numcodecs ceiling from files (pread + decode)"))
        peers = [v for (bb, name), v in rate.items() if bb == b and name.startswith(PEERS)]
        for name in (BEFORE, "zarrdali[cpu]"):
            own = rate.get((b, name))
            if own is None:
                continue
            parts = [f"{own:.0f}/s"]
            if ceiling:
                parts.append(f"{own / ceiling:.2f}x the ceiling")
            if peers:
                parts.append(f"{own / max(peers):.2f}x the best peer")
            lines.append(f"batch {b}, {name}: {', '.join(parts)}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="a sharded store whose inner chunks divide the tile")
    p.add_argument("--variables", nargs="+", default=["t2m", "u10", "v10", "msl"])
    p.add_argument("--batch-size", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--samples", type=int, default=512, help="timed samples per epoch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--placement", default="chunk-grid", choices=["grid", "chunk-grid"])
    p.add_argument("--peers", nargs="+", default=["file-ceiling", "tensorstore"])
    p.add_argument(
        "--whole-field",
        action="store_true",
        help="the whole-field workload instead (zarrdali bench --workload whole-field: every "
        "variable, 2+1 steps, tile None, 4 warm-up batches); use --batch-size 1 2 4 --samples 24",
    )
    p.add_argument("--out", default="bench-out/small-batches")
    args = p.parse_args()
    LOADERS["zarrdali-cpu-before"] = (BEFORE, before_runner)
    loaders = [*args.peers, "zarrdali-cpu-before", "zarrdali-cpu"]
    base = BenchSpec(
        store=args.store,
        variables=tuple(args.variables),
        epochs=args.epochs,
        placement=args.placement,
    )
    warmup = None
    if args.whole_field:
        import zarr

        group = zarr.open_group(args.store, mode="r")
        names = tuple(sorted(v for v, arr in group.arrays() if arr.ndim >= 3))
        base = replace(base, variables=names, input_steps=2, target_steps=1, tile=None)
        warmup = 4
    specs = [base.at_batch_size(b, args.samples, None, warmup) for b in args.batch_size]
    load_before = os.getloadavg()
    label = os.path.basename(os.path.normpath(args.store))
    if args.whole_field:
        label += ", whole fields"
    elif args.placement == "chunk-grid":
        label += ", chunk-grid tiles"
    command = shlex.join(["python", *sys.argv])
    payload = run_bench([(label, args.store)], specs, loaders, args.out, command=command)
    load_after = os.getloadavg()
    print(payload["table"])
    print("\nmedian samples/s ratios:")
    for line in ratio_lines(payload["results"]):
        print(f"  {line}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    with open(os.path.join(args.out, "load.txt"), "w") as f:
        f.write(f"before {load_before}\nafter {load_after}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
