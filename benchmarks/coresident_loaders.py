"""Does a second loader in the same process slow the first? Samples/s of the
default CPU loader over a bench-like window (4 warm-up batches, 8 timed) at
batch 256, alone or alternating epoch by epoch with a second loader
(``options``: static fields, masks, nan_fill; ``threads``: workers=0), the way
`zarrdali bench` interleaves its loaders:

    python benchmarks/coresident_loaders.py sample-data/era5_sharded.zarr options
"""

from __future__ import annotations

import sys
import time

import zarrdali

VARIABLES = ["u10", "t2m", "v10", "msl"]
SPEC = dict(input_steps=4, target_steps=2, tile=(128, 128), batch_size=256, shuffle=True, seed=0)
SECOND = {
    "options": dict(static=["lsm", "orography"], masks=True, nan_fill=0.0),
    "threads": dict(workers=0),
}


def window(loader: zarrdali.ZarrLoader, epoch: int) -> float:
    """Samples/s over batches 4-11 of ``epoch`` (the rest of the epoch is dropped)."""
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(4):
        next(it)
    t0 = time.perf_counter()
    for _ in range(8):
        next(it)
    seconds = time.perf_counter() - t0
    it.close()
    return 8 * SPEC["batch_size"] / seconds


def main() -> None:
    store, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "alone"
    first = zarrdali.ZarrLoader(store, VARIABLES, device="cpu", **SPEC)
    second = None
    if mode != "alone":
        second = zarrdali.ZarrLoader(store, VARIABLES, device="cpu", **SPEC, **SECOND[mode])
    try:
        for epoch in range(3):
            if second is not None:
                window(second, epoch)
            print(f"{mode} epoch {epoch}: {window(first, epoch):.0f} samples/s", flush=True)
    finally:
        first.close()
        if second is not None:
            second.close()


if __name__ == "__main__":
    main()
