"""Where one batch's CPU time goes on the CPU path, in one thread, and what a
batch costs beyond its samples: the profile behind issue 30's small batches.

    python benchmarks/batch_cost.py sample-data/era5_sharded.zarr --batch-size 8

On tiles of the chunk grid (every tile one inner chunk: nothing for partial
decoding to skip) it reports, with the process's CPU clock (so the figures
hold on a shared machine):

- the stages of ``load_into`` at ``--batch-size`` (cProfile's own time per
  function, grouped: zstd, pread, plan, locate, describe, the rest; cProfile
  times the wall clock, so a store not in the page cache shows in pread: run
  it twice);
- the fixed cost of a batch: CPU per sample at ``--batch-size`` and at
  ``--large`` alternated in one process, their difference times the batch size;
- libzstd itself: one inner chunk decoded by numcodecs' libzstd (what
  zarrdali calls), the system's libzstd and python-zstandard (its
  ``decompress``, a new bytes object per chunk), when present, in
  microseconds per chunk: whether another zstd build would decode faster.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import ctypes.util
import pstats
import statistics
import time

import numpy as np

import zarrdali
from zarrdali.batch.load import load_into
from zarrdali.batch.zstdctx import ZstdContexts

VARIABLES = ["t2m", "u10", "v10", "msl"]
# (file, function) as cProfile names them -> stage; plan, locate and describe with
# their callees (cumulative time), zstd and pread on their own
STAGES = {
    ("zstdctx.py", "decompress"): ("zstd (libzstd, by context)", False),
    ("~", "<built-in method posix.preadv>"): ("pread", False),
    ("plan.py", "plan_batch"): ("plan", True),
    ("locate.py", "locate"): ("locate", True),
    ("backend.py", "describe"): ("describe", True),
}


def make_run(store: str, batch_size: int):
    loader = zarrdali.ZarrLoader(
        store, VARIABLES, input_steps=4, target_steps=2, tile=(128, 128),
        batch_size=batch_size, shuffle=True, seed=0, device="cpu",
        cover_edges=False, workers=0, num_threads=1,
    )  # fmt: skip
    plan = loader.epoch_plan(0)
    outs = [np.empty((batch_size, n, 4, 128, 128), np.float32) for n in (4, 2)]

    def run(n: int) -> None:
        for k in range(n):
            samples = plan.batch(k % len(plan))
            load_into(loader.backend, loader.layouts, loader.spec, (128, 128), samples, outs, None)

    return loader, run


def stages(run, n: int) -> dict[str, float]:
    """CPU seconds per stage over ``n`` batches, and the rest of the thread's time."""
    profile = cProfile.Profile()
    profile.enable()
    run(n)
    profile.disable()
    stats = pstats.Stats(profile).stats
    total = sum(own for (_, _, own, _, _) in stats.values())
    out = {}
    for (file, _, name), (_, _, own, cumulative, _) in stats.items():
        for (where, function), (stage, whole) in STAGES.items():
            if name == function and file.endswith(where):
                out[stage] = out.get(stage, 0.0) + (cumulative if whole else own)
    out["the rest (Python per chunk, copies, finish)"] = total - sum(out.values())
    return out


def zstd_speeds(store: str) -> dict[str, float]:
    """Microseconds per inner chunk of t2m's first shard, per zstd build."""
    from pathlib import Path

    import zarr

    array = zarr.open_array(store, path="t2m", mode="r")
    inner = int(np.prod(array.shards) // np.prod(array.chunks))
    raw = (Path(store) / "t2m" / "c" / "0" / "0" / "0").read_bytes()  # the first shard
    nbytes = int(np.prod(array.chunks)) * array.dtype.itemsize
    # the shard index at the end: (offset, size) per inner chunk, then its crc32c
    index = np.frombuffer(raw[-(inner * 16 + 4) : -4], dtype="<u8").reshape(-1, 2)
    index = index[index[:, 0] != np.iinfo(np.uint64).max]
    src = np.frombuffer(raw, dtype=np.uint8)
    out = np.empty(nbytes, dtype=np.uint8)
    frames = [(int(o), int(n)) for o, n in index]
    results = {}

    def best(loop) -> float:
        times = []
        for _ in range(5):
            t = time.process_time()
            loop()
            times.append(time.process_time() - t)
        return min(times) / len(frames) * 1e6

    contexts = ZstdContexts.create()
    if contexts is not None:
        ctx, fn = contexts.context(), contexts._decompress
        base, dst = src.ctypes.data, out.ctypes.data
        results["numcodecs' libzstd"] = best(
            lambda: [fn(ctx, dst, nbytes, base + o, n) for o, n in frames]
        )
        contexts.close()
    name = ctypes.util.find_library("zstd")
    if name:
        lib = ctypes.CDLL(name)
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        sys_fn = lib.ZSTD_decompressDCtx
        sys_fn.restype = ctypes.c_size_t
        sys_fn.argtypes = [ctypes.c_void_p] + [ctypes.c_void_p, ctypes.c_size_t] * 2
        sys_ctx = lib.ZSTD_createDCtx()
        base, dst = src.ctypes.data, out.ctypes.data
        results[f"system {name}"] = best(
            lambda: [sys_fn(sys_ctx, dst, nbytes, base + o, n) for o, n in frames]
        )
        lib.ZSTD_freeDCtx(sys_ctx)
    try:
        import zstandard
    except ImportError:
        return results
    decompressor = zstandard.ZstdDecompressor()
    blobs = [raw[o : o + n] for o, n in frames]
    results["python-zstandard"] = best(lambda: [decompressor.decompress(b) for b in blobs])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="the bench's sharded sample store (era5_sharded.zarr)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--large", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    small, run_small = make_run(args.store, args.batch_size)
    large, run_large = make_run(args.store, args.large)
    n_small, samples = 128, 128 * args.batch_size
    n_large = max(1, samples // args.large)
    run_small(8)
    run_large(2)

    spent = stages(run_small, n_small)
    total = sum(spent.values())
    print(
        f"one thread, batch {args.batch_size}, {n_small} batches: "
        "time by stage (cProfile, wall clock)"
    )
    for stage, seconds in spent.items():
        print(f"  {stage:28s} {seconds / n_small * 1e3:6.2f} ms/batch  {seconds / total:5.1%}")

    per_small, per_large = [], []
    for _ in range(args.rounds):  # alternated: the machine's drift hits both alike
        t = time.process_time()
        run_small(n_small)
        per_small.append((time.process_time() - t) / samples * 1e3)
        t = time.process_time()
        run_large(n_large)
        per_large.append((time.process_time() - t) / (n_large * args.large) * 1e3)
    fixed = [(s - g) * args.batch_size for s, g in zip(per_small, per_large, strict=True)]
    print(
        f"CPU ms/sample, median of {args.rounds}: batch {args.batch_size} "
        f"{statistics.median(per_small):.3f}, batch {args.large} "
        f"{statistics.median(per_large):.3f}; a batch's fixed cost "
        f"{statistics.median(fixed):.2f} ms (rounds: {', '.join(f'{x:.2f}' for x in fixed)})"
    )
    small.close()
    large.close()

    print("one 128 x 128 float32 zstd chunk, best of 5 passes over the first shard's:")
    for name, us in zstd_speeds(args.store).items():
        print(f"  {name:40s} {us:6.1f} us/chunk ({65536 / us / 1e3:.2f} GB/s)")


if __name__ == "__main__":
    main()
