"""How long the first batch of every epoch takes against a steady batch (CPU path).

A loader that starts its worker processes again every epoch pays their start
(spawn, imports, reopening the store) at each epoch's first batch; with
persistent workers (the default) only the first epoch does. For each epoch this
prints the wait for the first batch (from ``iter()`` to the batch in hand) and
the median of the epoch's later batches, in a loop that only takes batches (the
batch time is then the loader's throughput limit), and the ratio of the two:

    python benchmarks/first_batch.py sample-data/era5_plain.zarr --batch-size 64
    python benchmarks/first_batch.py STORE --persistent-workers 0   # the old way

``--batches`` limits every epoch to its first batches (a validation-sized
epoch), so many epochs run quickly. Measured timings depend on the machine's
load: run it on a quiet machine for figures to quote.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time

import zarrdali


def has_persistent_workers() -> bool:
    """Whether this zarrdali keeps workers across epochs (older ones restart them)."""
    return "persistent_workers" in inspect.signature(zarrdali.ZarrLoader).parameters


def run(args: argparse.Namespace, persistent: bool) -> list[dict]:
    options = {}
    if has_persistent_workers():
        options["persistent_workers"] = persistent
    epochs = []
    with zarrdali.ZarrLoader(
        args.store,
        args.variables,
        input_steps=args.input_steps,
        target_steps=args.target_steps,
        tile=tuple(args.tile),
        batch_size=args.batch_size,
        shuffle=True,
        seed=0,
        device="cpu",
        workers=args.workers,
        **options,
    ) as loader:
        for epoch in range(args.epochs):
            start = time.perf_counter()
            times = []
            for k, _batch in enumerate(loader):
                now = time.perf_counter()
                times.append(now - start)
                start = now
                if args.batches and k + 1 >= args.batches:
                    break
            del _batch
            steady = statistics.median(times[2:]) if len(times) > 3 else float("nan")
            epochs.append(
                {
                    "epoch": epoch,
                    "first_ms": times[0] * 1e3,
                    "steady_ms": steady * 1e3,
                    "ratio": times[0] / steady,
                    "batches": len(times),
                }
            )
    return epochs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--variables", nargs="+", default=["u10", "t2m", "v10", "msl"])
    parser.add_argument("--input-steps", type=int, default=4)
    parser.add_argument("--target-steps", type=int, default=2)
    parser.add_argument("--tile", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="(default: one per core)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12, help="per epoch (0: whole epochs)")
    parser.add_argument(
        "--modes",
        type=int,
        nargs="+",
        default=[0, 1],
        choices=(0, 1),
        help="persistent_workers values to run, in order (default: 0 1)",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(
        f"zarrdali {zarrdali.__version__}, {os.cpu_count()} cores, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; batch {args.batch_size}, "
        f"{args.batches or 'all'} batches per epoch"
    )
    modes = args.modes if has_persistent_workers() else [0]
    results = {}
    for persistent in modes:
        label = f"persistent_workers={bool(persistent)}"
        if not has_persistent_workers():
            label = "workers started every epoch (no persistent_workers in this zarrdali)"
        print(label)
        epochs = results[bool(persistent)] = run(args, bool(persistent))
        for e in epochs:
            print(
                f"  epoch {e['epoch']}: first batch {e['first_ms']:7.0f} ms, steady "
                f"{e['steady_ms']:6.0f} ms ({e['batches']} batches): {e['ratio']:.2f}x"
            )
        later = [e["ratio"] for e in epochs[1:]]
        if later:
            print(
                f"  epochs after the first: first batch {statistics.median(later):.2f}x a "
                f"steady batch (median), at most {max(later):.2f}x"
            )
    print(f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            out = {"args": vars(args), "load": load, "epochs": results}
            json.dump(out, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
