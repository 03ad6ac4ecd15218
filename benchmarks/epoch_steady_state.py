"""Milliseconds per batch through whole epochs of the CPU path, and samples/s over
the bench's window (batches 4-11) and over the epoch after its first batch.

`zarrdali bench` times a window of a few batches per epoch; at batch 256 on the
sample store that is 8 of 17 batches. This script shows whether the window is
the epoch's steady state, in a process that runs nothing else:

    python benchmarks/epoch_steady_state.py sample-data/era5_plain.zarr 256 --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import time

import zarrdali


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with zarrdali.ZarrLoader(
        args.store,
        ["u10", "t2m", "v10", "msl"],
        input_steps=4,
        target_steps=2,
        tile=(128, 128),
        batch_size=args.batch_size,
        shuffle=True,
        seed=0,
        device="cpu",
        workers=args.workers,
    ) as loader:
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            t = [time.perf_counter()]
            for _ in loader:
                t.append(time.perf_counter())
            ms = " ".join(f"{(b - a) * 1e3:.0f}" for a, b in itertools.pairwise(t))
            window = 8 * args.batch_size / (t[12] - t[4]) if len(t) > 12 else float("nan")
            rest = (len(t) - 2) * args.batch_size / (t[-1] - t[1])
            print(f"epoch {epoch}: ms per batch {ms}")
            print(f"  batches 4-11: {window:.0f} samples/s; from batch 1: {rest:.0f} samples/s")


if __name__ == "__main__":
    main()
