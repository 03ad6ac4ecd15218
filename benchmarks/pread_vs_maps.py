"""What reading a local store with ``pread`` costs against memory maps (CPU path).

Maps spare one copy of every encoded byte, but a file that shrinks while it is
mapped kills the process (SIGBUS). This measures the price of the safe
default: the same batches of the sharded sample store loaded by two CPU
backends, ``memory_map=True`` and ``memory_map=False``, interleaved batch by
batch (A B B A ...) in one process, one decode thread each (as in a DALI
worker process), files in the page cache. Reported per sample: CPU time of
the loading thread (user + system, what contention on a shared machine
barely moves) and wall time.

    python benchmarks/pread_vs_maps.py sample-data/era5_sharded.zarr \
        --out benchmarks/results/pread-vs-maps
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import zarrdali
from zarrdali.bench.report import write_results

VARIABLES = ["t2m", "u10", "v10", "msl"]
SPEC = dict(input_steps=4, target_steps=2, tile=(128, 128), shuffle=True, seed=0)


def measure(store: str, batch_size: int, batches: int, threads: int) -> dict:
    loaders = {
        mode: zarrdali.ZarrLoader(
            store,
            VARIABLES,
            **SPEC,
            batch_size=batch_size,
            device="cpu",
            workers=0,
            num_threads=threads,
            memory_map=(mode == "maps"),
        )
        for mode in ("maps", "pread")
    }
    try:
        plan = loaders["maps"].epoch_plan(0)
        n = min(batches, len(plan))
        cpu = {mode: [] for mode in loaders}
        wall = {mode: [] for mode in loaders}
        for k in range(n):  # warm-up: page cache, shard indexes, maps
            for ld in loaders.values():
                ld.load_batch(plan.batch(k))
        for k in range(n):
            order = ("maps", "pread") if k % 2 == 0 else ("pread", "maps")
            samples = plan.batch(k)
            for mode in order:
                c0, w0 = time.process_time(), time.perf_counter()
                loaders[mode].load_batch(samples)
                cpu[mode].append((time.process_time() - c0) / len(samples))
                wall[mode].append((time.perf_counter() - w0) / len(samples))
        out = {"batch_size": batch_size, "batches": n, "threads": threads}
        for mode in loaders:
            out[f"{mode}_cpu_ms_per_sample"] = 1e3 * statistics.median(cpu[mode])
            out[f"{mode}_wall_ms_per_sample"] = 1e3 * statistics.median(wall[mode])
        ratio = np.array(cpu["pread"]) / np.array(cpu["maps"])
        out["pread_over_maps_cpu"] = float(np.median(ratio))
        out["pread_over_maps_cpu_iqr"] = [float(np.percentile(ratio, q)) for q in (25, 75)]
        out["pread_over_maps_wall"] = float(
            np.median(np.array(wall["pread"]) / np.array(wall["maps"]))
        )
        return out
    finally:
        for ld in loaders.values():
            ld.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="the sharded sample store (zarrdali sample-data DIR)")
    p.add_argument("--batch-sizes", default="8,64,256")
    p.add_argument("--samples", type=int, default=2048, help="samples per batch size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        row = measure(args.store, b, max(4, args.samples // b), args.threads)
        rows.append(row)
        lo, hi = row["pread_over_maps_cpu_iqr"]
        print(
            f"batch {b:4d}: CPU ms/sample maps {row['maps_cpu_ms_per_sample']:.3f} "
            f"pread {row['pread_cpu_ms_per_sample']:.3f} -> pread/maps "
            f"{row['pread_over_maps_cpu']:.3f} (IQR {lo:.3f}-{hi:.3f}); "
            f"wall ratio {row['pread_over_maps_wall']:.3f}",
            flush=True,
        )
    if args.out:
        write_results(args.out, "pread_vs_maps.json", {"rows": rows})


if __name__ == "__main__":
    main()
