"""Decode benchmark: the same chunks decoded, and batches assembled, several ways.

Rows (rates are decoded GB/s: bytes of decoded chunks per second):

* ``numcodecs``       numcodecs on all CPU cores (threads; decode only, bytes in memory)
* ``zarrdali-cpu``    zarrdali's CPU backend (read + decode + assemble), for reference
* ``gpu-host``        the GPU backend's host work per batch (locate + describe_batch),
                      numpy only: runs without a GPU
* ``nvcomp-capi``     nvCOMP's batched C API alone (ctypes, as the backend binds it):
                      payloads already on the device, one call per batch per codec,
                      pointer arrays prepared: the GPU decode ceiling
* ``nvcomp-python``   the same through nvCOMP's Python API (``Codec.decode``)
* ``dali-inflate``    DALI's ``fn.decoders.inflate`` on the same LZ4 payloads inside a
                      pipeline, one sample per batch (LZ4 stores only)
* ``zarrdali-gpu[R]`` zarrdali's GPU backend, ``load_batch`` per batch: read (R =
                      ``kvikio`` or ``pinned``) + decode (C API) + gather
* ``zarrdali-gpu[R,warm-cache]`` the same with ``cache="gpu"`` after one pass has
                      filled the cache: no file bytes are read

The synthetic stores (``--chunks``, default both): ``1m``: one chunk per
(time, variable) field of 361 x 720 float32 (1.04 MB); ``64k``: 128 x 128
float32 chunks (64 KiB) in shards of one field each. Each row is warmed up,
repeated, and reported as median (min–max); GPU work is synchronized before a
clock is read. Without a GPU the GPU rows say why they are missing
(``gpu-host`` still runs). Prints a system header and writes JSON (system, GPU,
driver, versions, commit, kvikIO mode and settings, peak device memory, cache
counters, the command) to ``--out``.

    python benchmarks/decode_gpu.py --out bench-out/decode_gpu.json
    python benchmarks/decode_gpu.py --codec lz4 --out bench-out/decode_gpu_lz4.json
    python benchmarks/decode_gpu.py --store sample-data/era5.zarr --variables t2m u10 \\
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

CHUNKINGS = {
    "1m": dict(chunks=(1, 361, 720), shards=None),
    "64k": dict(chunks=(1, 128, 128), shards=(1, 384, 768)),
}


def _synthetic_store(
    path: Path, compressor: str, n_time: int, n_vars: int, chunking: str
) -> list[str]:
    """An ERA5-like store of ``n_vars`` float32 arrays (n_time, 361, 720)."""
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
    layout = CHUNKINGS[chunking]
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
                chunks=layout["chunks"],
                shards=layout["shards"],
                dtype="float32",
                serializer=BytesCodec(),
                compressors=compressors,
                dimension_names=["time", "latitude", "longitude"],
            )
            data = np.empty((n_time, 361, 720), dtype=np.float32)
            for t in range(n_time):
                data[t] = (
                    280
                    + 10 * np.sin(y / 30 + t / 5 + v) * np.cos(x / 40)
                    + rng.normal(0, 0.5, y.shape)
                )
            arr[...] = data
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


def _row(name: str, seconds: list[float], nbytes: int, samples: int, note: str = "", **extra):
    return {
        "name": name,
        "status": "ok",
        "note": note,
        "seconds": seconds,
        "decoded_gb_per_s": _stats([nbytes / s / 1e9 for s in seconds]),
        "samples_per_s": _stats([samples / s for s in seconds]) if samples else None,
        **extra,
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


def _skipped(name: str, why: str, status: str = "skipped") -> dict:
    return {"name": name, "status": status, "note": why}


def _print_row(row: dict) -> None:
    if row["status"] != "ok":
        print(f"{row['name']:>32}: {row['status']} ({row['note']})")
        return
    if "ms_per_batch" in row:
        m = row["ms_per_batch"]
        print(
            f"{row['name']:>32}: {m['median']:.3f} ms/batch ({m['min']:.3f}–{m['max']:.3f})"
            f"  [{row['note']}]"
        )
        return
    g, s = row["decoded_gb_per_s"], row["samples_per_s"]
    line = f"{row['name']:>32}: {g['median']:.2f} GB/s ({g['min']:.2f}–{g['max']:.2f})"
    if s:
        line += f", {s['median']:.0f} samples/s"
    print(line + (f"  [{row['note']}]" if row["note"] else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="JSON output path")
    p.add_argument("--store", help="Zarr v3 store (default: synthetic ERA5-like ones)")
    p.add_argument("--variables", nargs="*", help="arrays of --store (default: all)")
    p.add_argument("--codec", default="zstd", help="synthetic store codec: zstd or lz4")
    p.add_argument(
        "--chunks", nargs="+", default=["64k", "1m"], choices=sorted(CHUNKINGS),
        help="synthetic store chunkings (default: both)",
    )  # fmt: skip
    p.add_argument("--time-steps", type=int, default=24, help="synthetic store time steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="frames per sample")
    p.add_argument("--tile", type=int, nargs=2, default=(128, 128))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--reads", nargs="+", default=["kvikio", "pinned"], choices=["kvikio", "pinned"],
        help="GPU read paths to compare",
    )  # fmt: skip
    p.add_argument(
        "--cache-budget", type=int, default=None,
        help="bytes of the warm-cache rows' GPU cache (default: twice the batches' payloads)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from zarrdali.bench.report import header_text, system_info
    from zarrdali.gpu import missing_gpu_requirements

    info = system_info()
    missing = missing_gpu_requirements()
    info["gpu_stack"] = "ok" if not missing else "missing: " + "; ".join(missing)
    if not missing:
        try:
            from zarrdali.gpu import io_details

            info["kvikio"] = io_details()
        except Exception as err:  # reported, not fatal
            info["kvikio"] = f"unknown ({type(err).__name__}: {err})"
    print(header_text(info))
    if "kvikio" in info:
        print(f"# kvikIO: {info['kvikio']}")

    sections = []
    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory(prefix="zarrdali-decode-bench-")
        stores = []
        for chunking in args.chunks:
            path = Path(tmp.name) / f"synthetic-{args.codec}-{chunking}.zarr"
            names = _synthetic_store(path, args.codec, args.time_steps, 2, chunking)
            stores.append((f"{args.codec}, {chunking} chunks", path, names))
    else:
        stores = [(Path(args.store).name, Path(args.store), args.variables)]
    try:
        for label, store, variables in stores:
            sections.append(_section(args, label, store, variables, missing))
    finally:
        if tmp is not None:
            tmp.cleanup()

    payload = {
        "system": info,
        "command": [sys.executable, *sys.argv] if argv is None else ["decode_gpu.py", *argv],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sections": sections,
        # flat, as before: every row with its section's label
        "results": [{**row, "section": sec["label"]} for sec in sections for row in sec["results"]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"# wrote {args.out}")
    return 0


def _section(args, label: str, store: Path, variables, missing: list[str]) -> dict:
    """Every row on one store."""
    from zarrdali.batch.host import PosixReader
    from zarrdali.batch.locate import ChunkLocator
    from zarrdali.batch.plan import plan_batch
    from zarrdali.cpu.backend import CpuBackend
    from zarrdali.gpu.describe import describe_batch
    from zarrdali.store.open import load_layouts, open_group

    group, store_name = open_group(store)
    if not variables:
        variables = sorted(k for k, _ in group.arrays())
    layouts = load_layouts(group, store_name, variables)

    # Batches of random samples, and the chunks they need.
    rng = np.random.default_rng(args.seed)
    nt, ny, nx = layouts[0].shape[0], layouts[0].shape[-2], layouts[0].shape[-1]
    th, tw = min(args.tile[0], ny), min(args.tile[1], nx)
    steps = min(args.steps, nt)
    plans = []
    for _ in range(args.batches):
        samples = np.stack(
            [
                rng.integers(0, nt - steps + 1, args.batch_size),
                rng.integers(0, ny - th + 1, args.batch_size),
                rng.integers(0, nx - tw + 1, args.batch_size),
            ],
            axis=1,
        )
        plans.append(plan_batch(layouts, samples, n_frames=steps, frame_step=1, tile_hw=(th, tw)))
    decoded_bytes = sum(pl.decoded_nbytes(layouts) for pl in plans)
    n_samples = args.batches * args.batch_size
    print(
        f"## {label}: store {store_name}, variables {variables}, {args.batches} batches x "
        f"{args.batch_size} samples x {steps} steps x {th}x{tw}, "
        f"{decoded_bytes / 1e6:.1f} MB of chunks decoded per pass"
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
        _print_row(rows[-1])

    cpu = CpuBackend(group, store_name, args.threads)
    try:
        secs = _time(
            lambda: [cpu.load_batch(layouts, pl) for pl in plans], args.warmup, args.repeats
        )
    finally:
        cpu.close()
    rows.append(_row("zarrdali-cpu", secs, decoded_bytes, n_samples, "read+decode+assemble"))
    _print_row(rows[-1])

    def gpu_host_pass() -> None:
        for pl in plans:
            describe_batch(layouts, pl, locator.locate(pl), store_name=store_name)

    secs = _time(gpu_host_pass, args.warmup, args.repeats)
    rows.append(_host_row("gpu-host", secs, len(plans), "locate + describe_batch, numpy only"))
    _print_row(rows[-1])

    if missing:
        why = "no GPU stack: " + "; ".join(missing)
        names = ["nvcomp-capi", "nvcomp-python", "dali-inflate"]
        names += [f"zarrdali-gpu[{r}{c}]" for r in args.reads for c in ("", ",warm-cache")]
        for name in names:
            rows.append(_skipped(name, why))
            _print_row(rows[-1])
    else:
        ctx = dict(layouts=layouts, plans=plans, encoded=encoded, group=group, store=store_name)
        for make in (_capi_row, _python_api_row, _dali_inflate_row):
            rows.append(_guarded(make, args, ctx))
            _print_row(rows[-1])
        for read in args.reads:
            for warm in (False, True):
                rows.append(_guarded(_zarrdali_gpu_row, args, ctx, read, warm, decoded_bytes))
                _print_row(rows[-1])
    return {
        "label": label,
        "store": store_name,
        "variables": variables,
        "decoded_bytes_per_pass": decoded_bytes,
        "results": rows,
    }


def _guarded(make, args, ctx, *more) -> dict:
    """A GPU row, or a ``failed`` row saying why (the others still run)."""
    try:
        return make(args, ctx, *more)
    except Exception as err:  # a report: every row that can run, runs
        name = getattr(make, "row_name", make.__name__)
        if more:
            name = f"zarrdali-gpu[{more[0]}{',warm-cache' if more[1] else ''}]"
        return _skipped(name, f"{type(err).__name__}: {err}", status="failed")


# -- payloads on the device, by codec -------------------------------------------------------
def _device_payloads(cp, layouts, plans, encoded):
    """Per batch: ``{algorithm: (payload buffer, in offsets, in sizes, out sizes, shapes)}``,
    payloads at 8-byte-aligned offsets of one device buffer (outside any clock)."""
    from zarrdali.gpu.describe import (
        NVCOMP_ALGORITHMS,
        aligned_offsets,
        payload_bounds,
        payload_trims,
    )

    batches = []
    for pl, enc in zip(plans, encoded, strict=True):
        by_alg: dict[str, list] = {}
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
            raw = np.frombuffer(data, np.uint8)[skip : skip + length]
            by_alg.setdefault(alg, []).append((raw, layout.chunk_nbytes, layout.chunk_shape))
        out = {}
        for alg, items in by_alg.items():
            sizes = np.array([len(r) for r, _, _ in items], dtype=np.int64)
            offsets, total = aligned_offsets(sizes)
            host = np.zeros(max(total, 8), dtype=np.uint8)
            for (raw, _, _), o in zip(items, offsets.tolist(), strict=True):
                host[o : o + len(raw)] = raw
            outs = np.array([n for _, n, _ in items], dtype=np.int64)
            out[alg] = (cp.asarray(host), offsets, sizes, outs, [s for _, _, s in items])
        batches.append(out)
    return batches


def _capi_row(args, ctx) -> dict:
    """nvCOMP's batched C API alone: one call per batch per codec, pointers prepared."""
    import cupy as cp

    from zarrdali.gpu.decode import IN_STAGING, N_ROWS, device_pointers, nvcomp_capi
    from zarrdali.gpu.describe import aligned_offsets

    api = nvcomp_capi()
    stream = cp.cuda.Stream(non_blocking=True)
    calls, keep, nbytes, temp_bytes = [], [], 0, 256
    with stream:
        for by_alg in _device_payloads(cp, ctx["layouts"], ctx["plans"], ctx["encoded"]):
            for alg, (payload, offsets, sizes, outs, _) in by_alg.items():
                n = len(sizes)
                out_offsets, out_total = aligned_offsets(outs)
                table = np.empty((N_ROWS, n), dtype=np.int64)
                table[:] = [np.full(n, IN_STAGING), offsets, sizes, out_offsets, outs]
                decoded = cp.empty(out_total, dtype=cp.uint8)
                table_dev = cp.asarray(table)
                ptrs = device_pointers(cp, table_dev, (payload.data.ptr, 0), decoded.data.ptr)
                need = api.temp_bytes(alg, n, int(outs.max()), int(outs.sum()))
                temp_bytes = max(temp_bytes, need)
                statuses = cp.full(n, -1, dtype=cp.int32)
                actual = cp.zeros(n, dtype=cp.uint64)
                keep += [payload, decoded, table_dev, ptrs, statuses, actual]
                calls.append((alg, n, ptrs, table_dev, actual, statuses, outs))
                nbytes += int(outs.sum())
        # One temp for every call (they run one after the other on one stream),
        # as a backend stream's DecodeTemp serves its calls: the largest call's need.
        temp = cp.empty(temp_bytes, cp.uint8)
    if not calls:
        return _skipped("nvcomp-capi", "no chunk uses a codec nvCOMP decodes")

    def capi_pass() -> None:
        for alg, n, ptrs, table_dev, actual, statuses, _ in calls:
            status = api.decompress(
                alg,
                ptrs[0].data.ptr,
                table_dev[2].data.ptr,
                table_dev[4].data.ptr,
                actual.data.ptr,
                n,
                temp.data.ptr,
                temp.nbytes,
                ptrs[1].data.ptr,
                statuses.data.ptr,
                stream.ptr,
            )
            if status:
                raise RuntimeError(f"nvcompBatched{alg}DecompressAsync returned {status}")
        stream.synchronize()

    secs = _time(capi_pass, args.warmup, args.repeats)
    bad = sum(int(cp.count_nonzero(c[5])) for c in calls)
    wrong = sum(int(cp.count_nonzero(c[4] != cp.asarray(c[6].astype(np.uint64)))) for c in calls)
    note = (
        f"{len(calls)} calls per pass, {bad} bad statuses, {wrong} wrong sizes, "
        f"temp {temp.nbytes / 1e9:.2f} GB"
    )
    return _row("nvcomp-capi", secs, nbytes, 0, note)


_capi_row.row_name = "nvcomp-capi"


def _python_api_row(args, ctx) -> dict:
    """The same decode through nvCOMP's Python API (one nvcomp.Array per chunk)."""
    import cupy as cp
    from nvidia import nvcomp

    stream = cp.cuda.Stream(non_blocking=True)
    prepared, nbytes = [], 0
    codecs: dict[str, object] = {}
    with stream:
        for by_alg in _device_payloads(cp, ctx["layouts"], ctx["plans"], ctx["encoded"]):
            for alg, (payload, offsets, sizes, outs, _) in by_alg.items():
                codec = codecs.get(alg)
                if codec is None:
                    codec = codecs[alg] = nvcomp.Codec(
                        algorithm=alg,
                        bitstream_kind=nvcomp.BitstreamKind.RAW,
                        device_id=cp.cuda.Device().id,
                        cuda_stream=stream.ptr,
                    )
                ins = [
                    payload[o : o + n]
                    for o, n in zip(offsets.tolist(), sizes.tolist(), strict=True)
                ]
                dst = [cp.empty(int(n), dtype=cp.uint8) for n in outs.tolist()]
                cfg = codec.decompression_config(codec.compression_config(outs.tolist()))
                prepared.append((codec, nvcomp.as_arrays(ins, stream.ptr), dst, cfg))
                nbytes += int(outs.sum())
    if not prepared:
        return _skipped("nvcomp-python", "no chunk uses a codec nvCOMP decodes")

    def python_pass() -> None:
        for codec, ins, dst, cfg in prepared:
            codec.decode(ins, out=dst, decompression_config=cfg)
        stream.synchronize()

    secs = _time(python_pass, args.warmup, args.repeats)
    return _row("nvcomp-python", secs, nbytes, 0, "Codec.decode, payloads on device, batched")


_python_api_row.row_name = "nvcomp-python"


def _dali_inflate_row(args, ctx) -> dict:
    """DALI's fn.decoders.inflate on the batches' LZ4 payloads, one sample per batch."""
    import cupy as cp
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    batches = _device_payloads(cp, ctx["layouts"], ctx["plans"], ctx["encoded"])
    lz4 = [b["LZ4"] for b in batches if "LZ4" in b]
    if not lz4:
        return _skipped("dali-inflate", "no LZ4 chunks (run with --codec lz4)")
    shapes = {tuple(s) for b in lz4 for s in b[4]}
    if len(shapes) != 1:
        return _skipped("dali-inflate", f"chunks of several shapes {sorted(shapes)}")
    (shape,) = shapes
    device_id = cp.cuda.Device().id

    @pipeline_def(batch_size=1, num_threads=2, device_id=device_id, prefetch_queue_depth=1)
    def pipe():
        data = fn.external_source(name="data", device="gpu", dtype=types.UINT8, ndim=1)
        # DALI's "int" arguments are int32
        offsets = fn.external_source(name="offsets", device="cpu", dtype=types.INT32, ndim=1)
        sizes = fn.external_source(name="sizes", device="cpu", dtype=types.INT32, ndim=1)
        return fn.decoders.inflate(
            data,
            chunk_offsets=offsets,
            chunk_sizes=sizes,
            shape=list(shape),
            dtype=types.FLOAT,
            algorithm="LZ4",
        )

    pipeline = pipe()
    pipeline.build()
    nbytes = sum(int(b[3].sum()) for b in lz4)
    lz4 = [(payload, o.astype(np.int32), n.astype(np.int32)) for payload, o, n, _, _ in lz4]

    def dali_pass() -> None:
        for payload, offsets, sizes in lz4:
            pipeline.feed_input("data", [payload])
            pipeline.feed_input("offsets", [offsets])
            pipeline.feed_input("sizes", [sizes])
            (out,) = pipeline.run()
            out.as_tensor()  # the batch is complete
        cp.cuda.Device().synchronize()

    secs = _time(dali_pass, args.warmup, args.repeats)
    # Once, outside the clock: the first batch's output against numcodecs.
    layouts, plan, enc = ctx["layouts"], ctx["plans"][0], ctx["encoded"][0]
    want = []
    for v, data in zip(plan.chunk_var.tolist(), enc, strict=True):
        layout = layouts[v]
        if data is not None and layout.codec is not None and layout.codec.compressor == "lz4":
            out = np.empty(layout.chunk_nbytes, dtype=np.uint8)
            layout.codec.decode_into(memoryview(data), out)
            want.append(out)
    payload, offsets, sizes = lz4[0]
    pipeline.feed_input("data", [payload])
    pipeline.feed_input("offsets", [offsets])
    pipeline.feed_input("sizes", [sizes])
    (got,) = pipeline.run()
    got = cp.asarray(got.as_tensor()).get().view(np.uint8).reshape(-1)
    same = bool(want) and got.tobytes() == np.concatenate(want).tobytes()
    note = f"fn.decoders.inflate, one sample per batch; equals numcodecs: {same}"
    return _row("dali-inflate", secs, nbytes, 0, note)


_dali_inflate_row.row_name = "dali-inflate"


def _zarrdali_gpu_row(args, ctx, read: str, warm: bool, decoded_bytes: int) -> dict:
    """zarrdali's GPU backend: read + decode + gather, per batch, synchronized."""
    from zarrdali.gpu import GpuBackend

    layouts, plans = ctx["layouts"], ctx["plans"]
    name = f"zarrdali-gpu[{read}{',warm-cache' if warm else ''}]"
    kw: dict = {"read": read}
    if warm:
        budget = args.cache_budget
        if budget is None:  # twice the batches' payloads: everything fits
            budget = 2 * sum(len(d) for enc in ctx["encoded"] for d in enc if d is not None)
        kw.update(cache="gpu", cache_budget=max(int(budget), 64 << 20))
    backend = GpuBackend(ctx["group"], ctx["store"], args.threads, **kw)
    try:

        def gpu_pass() -> None:
            for pl in plans:
                backend.load_batch(layouts, pl)  # synchronizes its stream

        if warm:
            gpu_pass()  # fills the cache
        before = backend.transfers.snapshot()
        secs = _time(gpu_pass, args.warmup, args.repeats)
        after = backend.transfers.snapshot()
        read_bytes = after["file_read_bytes"] - before["file_read_bytes"]
        passes = args.warmup + args.repeats
        note = (
            f"{backend.read_mode} reads, kvikIO {backend.io_mode}, decode {backend.decode_mode}, "
            f"{read_bytes / passes / 1e6:.1f} MB read per pass"
        )
        return _row(
            name,
            secs,
            decoded_bytes,
            len(plans) * args.batch_size,
            note,
            transfers=after,
            memory=backend.memory_stats(),
            cache=backend.cache_stats(),
            io=backend.io,
        )
    finally:
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
