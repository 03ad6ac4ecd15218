"""Decode benchmark: the same chunks decoded three ways.

* ``numcodecs``   numcodecs on all CPU cores (threads; decode only, bytes in memory)
* ``nvcomp-raw``  nvCOMP's batched decode alone: payloads already on the device,
                  one ``decode`` call per batch's chunks (the GPU decode ceiling)
* ``zarrdali-gpu`` zarrdali's GPU backend: read (kvikIO) + decode (nvCOMP) +
                  assemble (gather kernel), ``load_batch`` per batch
* ``zarrdali-cpu`` zarrdali's CPU backend on the same batches, for reference
* ``gpu-host``    the GPU backend's host work per batch (locate + describe_batch:
                  staging, slots, gather tables), numpy only: runs without a GPU

Rates are decoded GB/s (bytes of decoded chunks per second) and samples/s.
Each is warmed up, repeated, and reported as median (min–max); GPU work is
synchronized before a clock is read. Without a GPU the GPU rows say why they
are missing (``gpu-host`` still runs). Prints a system header and writes JSON
(system, GPU, driver, versions, commit, kvikIO mode, the command) to ``--out``.

    python benchmarks/decode_gpu.py --out bench-out/decode_gpu.json
    python benchmarks/decode_gpu.py --store sample-data/era5.zarr --variables t2m u10 \
        --out bench-out/decode_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _synthetic_store(path: Path, compressor: str, n_time: int, n_vars: int) -> list[str]:
    """An ERA5-like store: one chunk per (time, variable) field of 361 x 720 float32."""
    import zarr
    from zarr.codecs import BytesCodec, ZstdCodec

    group = zarr.open_group(path, mode="w", zarr_format=3)
    if compressor == "zstd":
        compressors = [ZstdCodec(level=3)]
    elif compressor == "lz4":
        from zarr.codecs.numcodecs import LZ4

        compressors = [LZ4()]
    else:
        raise SystemExit(f"--codec must be zstd or lz4, got {compressor!r}")
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.arange(361), np.arange(720), indexing="ij")
    names = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in range(n_vars):
            name = f"var{v}"
            arr = group.create_array(
                name,
                shape=(n_time, 361, 720),
                chunks=(1, 361, 720),
                dtype="float32",
                serializer=BytesCodec(),
                compressors=compressors,
                dimension_names=["time", "latitude", "longitude"],
            )
            for t in range(n_time):
                field = (
                    280
                    + 10 * np.sin(y / 30 + t / 5 + v) * np.cos(x / 40)
                    + rng.normal(0, 0.5, y.shape)
                )
                arr[t] = field.astype(np.float32)
            names.append(name)
    return names


def _stats(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _time(fn: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _row(name: str, seconds: list[float], nbytes: int, samples: int, note: str = "") -> dict:
    return {
        "name": name,
        "status": "ok",
        "note": note,
        "seconds": seconds,
        "decoded_gb_per_s": _stats([nbytes / s / 1e9 for s in seconds]),
        "samples_per_s": _stats([samples / s for s in seconds]) if samples else None,
    }


def _host_row(name: str, seconds: list[float], batches: int, note: str) -> dict:
    """A row of host work: milliseconds per batch, no throughput."""
    return {
        "name": name,
        "status": "ok",
        "note": note,
        "seconds": seconds,
        "ms_per_batch": _stats([s / batches * 1e3 for s in seconds]),
    }


def _skipped(name: str, why: str) -> dict:
    return {"name": name, "status": "skipped", "note": why}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="JSON output path")
    p.add_argument("--store", help="Zarr v3 store (default: a synthetic ERA5-like one)")
    p.add_argument("--variables", nargs="*", help="arrays of --store (default: all)")
    p.add_argument("--codec", default="zstd", help="synthetic store codec: zstd or lz4")
    p.add_argument("--time-steps", type=int, default=24, help="synthetic store time steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="frames per sample")
    p.add_argument("--tile", type=int, nargs=2, default=(128, 128))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from zarrdali.backends.cpu import CpuBackend, PosixReader
    from zarrdali.backends.gpu import missing_gpu_requirements
    from zarrdali.backends.gpu.plan import describe_batch
    from zarrdali.backends.locate import ChunkLocator
    from zarrdali.batchplan import plan_batch
    from zarrdali.bench.report import header_text, system_info
    from zarrdali.store import load_layouts, open_group

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory(prefix="zarrdali-decode-bench-")
        store = Path(tmp.name) / "synthetic.zarr"
        variables = _synthetic_store(store, args.codec, args.time_steps, 2)
    else:
        store = Path(args.store)
        variables = args.variables
    group, store_name = open_group(store)
    if not variables:
        variables = sorted(k for k, _ in group.arrays())
    layouts = load_layouts(group, store_name, variables)

    # Batches of random samples, and the chunks they need.
    rng = np.random.default_rng(args.seed)
    nt, ny, nx = layouts[0].shape[0], layouts[0].shape[-2], layouts[0].shape[-1]
    th, tw = min(args.tile[0], ny), min(args.tile[1], nx)
    plans = []
    for _ in range(args.batches):
        samples = np.stack(
            [
                rng.integers(0, nt - args.steps + 1, args.batch_size),
                rng.integers(0, ny - th + 1, args.batch_size),
                rng.integers(0, nx - tw + 1, args.batch_size),
            ],
            axis=1,
        )
        plans.append(
            plan_batch(layouts, samples, n_frames=args.steps, frame_step=1, tile_hw=(th, tw))
        )
    decoded_bytes = sum(pl.decoded_nbytes(layouts) for pl in plans)
    n_samples = args.batches * args.batch_size

    info = system_info()
    missing = missing_gpu_requirements()
    info["gpu_stack"] = "ok" if not missing else "missing: " + "; ".join(missing)
    print(header_text(info))
    print(
        f"# store {store_name}, variables {variables}, {args.batches} batches x "
        f"{args.batch_size} samples x {args.steps} steps x {th}x{tw}, "
        f"{decoded_bytes / 1e6:.1f} MB decoded per pass"
    )
    rows: list[dict] = []

    # Encoded bytes of every chunk of every batch, in memory.
    locator = ChunkLocator(store_name, layouts)
    locations = [locator.locate(pl) for pl in plans]
    reader = PosixReader(store_name)
    encoded = [reader.read_chunks(layouts, loc) for loc in locations]
    reader.close()
    with ThreadPoolExecutor(args.threads) as pool:
        # numcodecs on all cores: decode only.
        jobs = []
        for pl, enc in zip(plans, encoded, strict=True):
            for v, data in zip(pl.chunk_var.tolist(), enc, strict=True):
                layout = layouts[v]
                if data is not None and layout.codec is not None:
                    out = np.empty(layout.chunk_nbytes, dtype=np.uint8)
                    jobs.append((layout.codec, memoryview(data), out))

        def numcodecs_pass() -> None:
            list(pool.map(lambda j: j[0].decode_into(j[1], j[2]), jobs))

        nbytes_jobs = sum(j[2].nbytes for j in jobs)
        secs = _time(numcodecs_pass, args.warmup, args.repeats)
        rows.append(_row("numcodecs", secs, nbytes_jobs, 0, f"{args.threads} threads"))

    cpu = CpuBackend(group, store_name, args.threads)
    try:
        secs = _time(
            lambda: [cpu.load_batch(layouts, pl) for pl in plans], args.warmup, args.repeats
        )
    finally:
        cpu.close()
    rows.append(_row("zarrdali-cpu", secs, decoded_bytes, n_samples, "read+decode+assemble"))

    def gpu_host_pass() -> None:
        for pl in plans:
            describe_batch(layouts, pl, locator.locate(pl), store_name=store_name)

    secs = _time(gpu_host_pass, args.warmup, args.repeats)
    rows.append(_host_row("gpu-host", secs, len(plans), "locate + describe_batch, numpy only"))

    if missing:
        why = "no GPU stack: " + "; ".join(missing)
        rows += [_skipped("nvcomp-raw", why), _skipped("zarrdali-gpu", why)]
    else:
        rows += _gpu_rows(args, layouts, plans, encoded, group, store_name, decoded_bytes, info)

    for row in rows:
        if row["status"] != "ok":
            print(f"{row['name']:>14}: {row['status']} ({row['note']})")
            continue
        if "ms_per_batch" in row:
            m = row["ms_per_batch"]
            print(
                f"{row['name']:>14}: {m['median']:.3f} ms/batch ({m['min']:.3f}–{m['max']:.3f})"
                f"  [{row['note']}]"
            )
            continue
        g, s = row["decoded_gb_per_s"], row["samples_per_s"]
        line = f"{row['name']:>14}: {g['median']:.2f} GB/s ({g['min']:.2f}–{g['max']:.2f})"
        if s:
            line += f", {s['median']:.0f} samples/s"
        print(line + (f"  [{row['note']}]" if row["note"] else ""))

    payload = {
        "system": info,
        "command": [sys.executable, *sys.argv] if argv is None else ["decode_gpu.py", *argv],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "store": store_name,
        "variables": variables,
        "decoded_bytes_per_pass": decoded_bytes,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"# wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _gpu_rows(args, layouts, plans, encoded, group, store_name, decoded_bytes, info) -> list[dict]:
    """nvCOMP's raw batched decode and zarrdali's GPU backend (needs a GPU)."""
    import cupy as cp
    from nvidia import nvcomp

    from zarrdali.backends.gpu import GpuBackend
    from zarrdali.backends.gpu.plan import NVCOMP_ALGORITHMS, payload_bounds, payload_trims

    rows = []
    stream = cp.cuda.Stream(non_blocking=True)
    # Device copies of every payload (outside the clock), one decode call per batch.
    batches = []
    nbytes_raw = 0
    for pl, enc in zip(plans, encoded, strict=True):
        by_alg: dict[str, tuple[list, list, list]] = {}
        for v, data in zip(pl.chunk_var.tolist(), enc, strict=True):
            layout = layouts[v]
            if data is None or layout.codec is None:
                continue
            alg = NVCOMP_ALGORITHMS.get(layout.codec.compressor)
            if alg is None:
                continue
            (skip,), (length,) = payload_bounds(
                payload_trims([layout.codec]), np.zeros(1, np.int64), np.array([len(data)])
            )
            ins, outs, sizes = by_alg.setdefault(alg, ([], [], []))
            ins.append(cp.asarray(np.frombuffer(data, np.uint8)[skip : skip + length].copy()))
            outs.append(cp.empty(layout.chunk_nbytes, dtype=cp.uint8))
            sizes.append(layout.chunk_nbytes)
            nbytes_raw += layout.chunk_nbytes
        batches.append(by_alg)
    if nbytes_raw == 0:
        rows.append(_skipped("nvcomp-raw", "no chunk uses a codec nvCOMP decodes"))
    else:
        codecs = {
            alg: nvcomp.Codec(
                algorithm=alg,
                bitstream_kind=nvcomp.BitstreamKind.RAW,
                device_id=cp.cuda.Device().id,
                cuda_stream=stream.ptr,
            )
            for alg in {a for b in batches for a in b}
        }
        prepared = []
        for by_alg in batches:
            for alg, (ins, outs, sizes) in by_alg.items():
                codec = codecs[alg]
                cfg = codec.decompression_config(codec.compression_config(sizes))
                prepared.append((codec, nvcomp.as_arrays(ins, stream.ptr), outs, cfg))

        def raw_pass() -> None:
            for codec, ins, outs, cfg in prepared:
                codec.decode(ins, out=outs, decompression_config=cfg)
            stream.synchronize()

        secs = _time(raw_pass, args.warmup, args.repeats)
        rows.append(_row("nvcomp-raw", secs, nbytes_raw, 0, "payloads on device, batched"))

    backend = GpuBackend(group, store_name, args.threads)
    info["kvikio_mode"] = backend.io_mode
    try:

        def gpu_pass() -> None:
            for pl in plans:
                backend.load_batch(layouts, pl)  # synchronizes its stream

        secs = _time(gpu_pass, args.warmup, args.repeats)
        rows.append(
            _row(
                "zarrdali-gpu",
                secs,
                decoded_bytes,
                len(plans) * args.batch_size,
                f"read+decode+assemble, kvikIO {backend.io_mode}, "
                f"transfers {backend.transfers.snapshot()}",
            )
        )
    finally:
        backend.close()
    return rows


if __name__ == "__main__":
    sys.exit(main())
