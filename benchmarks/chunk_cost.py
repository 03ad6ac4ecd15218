"""CPU time to read and decode one chunk, four ways, in one thread: what bounds a
loader on a store's chunks, measured with the thread's CPU clock (so the figures
hold on a shared machine, where wall time does not).

    python benchmarks/chunk_cost.py sample-data/wb2_era5_240x121.zarr temperature

- ``pread + numcodecs``: the decode ceiling from files (``bench/runners.py``);
- ``pread + libzstd context``: zarrdali[cpu]'s default (reused zstd contexts);
- ``map + libzstd context``: zarrdali[cpu] with ``memory_map=True`` (no copy of
  the encoded bytes, a page fault per page instead);
- ``pread only``: the copy of the encoded bytes alone.

Whole-field chunks (one step, all levels) are decode-bound: what a loader can
save besides decoding is the difference between the first and the others.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import time
from pathlib import Path

import numpy as np
from numcodecs import zstd

from zarrdali.batch.zstdctx import ZstdContexts


def chunk_files(array: Path, n: int) -> list[Path]:
    files = sorted(p for p in (array / "c").rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"{array}: no chunk files (not an unsharded Zarr v3 array?)")
    return files[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("array")
    parser.add_argument("--chunks", type=int, default=40, help="chunk files timed (40)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    meta = json.loads((args.store / args.array / "zarr.json").read_text())
    codecs = [c["name"] for c in meta["codecs"]]
    if codecs != ["bytes", "zstd"]:
        raise SystemExit(f"{args.array}: codecs {codecs}; this script times bytes + zstd")
    shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    nbytes = int(np.prod(shape)) * np.dtype(meta["data_type"]).itemsize
    files = chunk_files(args.store / args.array, args.chunks)
    out = np.empty(nbytes, np.uint8)
    buf = np.empty(max(p.stat().st_size for p in files), np.uint8)
    contexts = ZstdContexts.create()
    if contexts is None:
        raise SystemExit("this numcodecs build does not export libzstd's API")
    ctx = contexts.context()

    def pread(path: Path) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.preadv(fd, [memoryview(buf)], 0)
        finally:
            os.close(fd)

    def pread_numcodecs(path: Path) -> None:
        zstd.decompress(memoryview(buf)[: pread(path)], out)

    def pread_context(path: Path) -> None:
        n = pread(path)
        contexts.decompress_exactly(ctx, out.ctypes.data, nbytes, buf.ctypes.data, n)

    def map_context(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        os.close(fd)
        src = np.frombuffer(mapped, np.uint8)
        contexts.decompress_exactly(ctx, out.ctypes.data, nbytes, src.ctypes.data, size)
        del src
        mapped.close()

    ways = {
        "pread + numcodecs": pread_numcodecs,
        "pread + libzstd context": pread_context,
        "map + libzstd context": map_context,
        "pread only": pread,
    }
    encoded = sum(p.stat().st_size for p in files) / len(files)
    ratio = encoded / nbytes
    print(f"{args.array}: chunks {shape}, {nbytes / 1e6:.2f} MB decoded, {ratio:.2f} of it on disk")
    print(f"CPU ms per chunk, median (min-max) of {args.rounds} rounds:")
    results: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.rounds):
            for name, way in ways.items():
                t = time.thread_time()
                for path in files:
                    way(path)
                results[name].append(1e3 * (time.thread_time() - t) / len(files))
    finally:
        contexts.close()
    for name, values in results.items():
        print(f"  {name:24s} {np.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")


if __name__ == "__main__":
    main()
