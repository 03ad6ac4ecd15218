"""Remote-store benchmark: zarrdali against the usual ways of reading an S3 URL.

Starts moto's S3 server in its own process on 127.0.0.1 (with a delay added to
every request, as a far-away object store has), uploads the sample data's
sharded store, and for each delay measures on the reference sample spec
(4 variables, 4 + 2 frames of 128 x 128, batches of 8):

- ``zarrdali`` — ``ZarrLoader("s3://...")``, the fast path (one concurrent,
  coalesced fetch per batch), iterated as a user would (DALI, prefetch);
- ``zarr-python fallback`` — the same loader reading chunk by chunk through
  zarr-python, as every remote store was read before;
- ``xarray sample by sample`` — ``xr.open_zarr(url)`` and one ``isel`` per sample;
- ``zarrdali device=cuda, read=pinned|kvikio`` — the GPU backend's
  ``load_batch`` (no DALI) with the byte source into pinned memory and one copy
  per batch, or kvikIO's remote file into device memory: which is faster
  (skipped, with the reason, where there is no GPU);
- ``plain range-GET client`` — obstore issuing exactly the byte ranges zarrdali
  fetched, all at once (``--max-in-flight`` at a time), no decoding: what the
  server delivers.

The server runs on its own core (``--server-cores``, the last cores of the
machine) and both clients on the others, as a remote store's server is
elsewhere: on a 2-core machine a client that decodes would otherwise take the
CPU time of the (CPU-bound, one Python process) server, and the comparison
would measure decoding rather than requests. Each row also reports the CPU
time its process and the server spent per MB received.

Prints a table and writes ``remote.json`` and ``remote.md`` to ``--out``.

    python benchmarks/remote_bench.py --out benchmarks/results/remote-cpu-2core

``--faults`` measures what failures cost instead (``faults.json`` in ``--out``):

- a flaky server: ``http.server`` in its own process serving the sharded store,
  answering 503 to one GET in three and resetting one connection in seven, at
  random (``--fail-rate``, ``--reset-rate``), against the same server without
  faults: the constructor plus ``--flaky-batches`` batches of the reference spec
  (24 x 8 = 192 samples), runs interleaved (clean, flaky, flaky, clean, ...),
  ``--repeats`` of each; reported: the median seconds of each and their ratio;
- a store that accepts connections and never answers: how long the constructor
  takes to fail, for each ``--dead-timeouts`` value of ``request_timeout``, and
  what it raises.

    python benchmarks/remote_bench.py --faults --out benchmarks/results/remote-faults-2core
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

import zarrdali
from zarrdali.bench.objectserver import RemoteS3Server, upload
from zarrdali.sample_data import SHARDED, SampleDataSpec, sample_data_exists, write_sample_data

BUCKET = "bench"
VARIABLES = ["t2m", "u10", "v10", "msl"]
SPEC = dict(input_steps=4, target_steps=2, tile=(128, 128), batch_size=8, shuffle=True)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, all threads, or of process ``pid``."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ms_per_mb(before: tuple[float, float], server_pid: int | None, nbytes: int) -> dict:
    """CPU milliseconds per MB received since ``before`` (this process, the server)."""
    mb = max(nbytes, 1) / 1e6
    out = {"client_cpu_ms_per_mb": 1000 * (cpu_seconds() - before[0]) / mb}
    if server_pid is not None:
        out["server_cpu_ms_per_mb"] = 1000 * (cpu_seconds(server_pid) - before[1]) / mb
    return out


def cpu_now(server_pid: int | None) -> tuple[float, float]:
    return cpu_seconds(), (cpu_seconds(server_pid) if server_pid is not None else 0.0)


def zarrdali_run(url, opts, args, workers: int, server_pid: int | None = None) -> dict:
    """Samples/s of ZarrLoader over ``args.batches`` batches after ``args.warmup``."""
    loader = zarrdali.ZarrLoader(
        url,
        VARIABLES,
        **SPEC,
        seed=args.seed,
        device="cpu",
        workers=workers,
        storage_options=opts,
        max_in_flight=args.max_in_flight,
    )
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    bytes0 = loader.backend.stats().get("bytes", 0)  # fetched in this process (workers=0)
    cpu0 = cpu_now(server_pid)
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        n += len(next(it)["index"])
    seconds = time.perf_counter() - t0
    stats = loader.backend.stats()
    cpu = cpu_ms_per_mb(cpu0, server_pid, stats.get("bytes", 0) - bytes0)
    it.close()
    loader.close()
    return {
        **cpu,
        "samples_per_s": n / seconds,
        "seconds": seconds,
        "samples": n,
        # bytes received while the timed batches were served (prefetch runs ahead at the
        # same pace, so this is the rate the network delivered to zarrdali)
        "network_mb_per_s": (stats.get("bytes", 0) - bytes0) / seconds / 1e6,
        "source": stats,
    }


GPU_READS = ("pinned", "kvikio")


def gpu_run(url, opts, args, read: str) -> dict:
    """Samples/s of the GPU backend's ``load_batch`` (read, decode, gather; no DALI)
    with ``read`` ("pinned": the byte source into pinned memory, one copy per batch;
    "kvikio": kvikIO's remote file into device memory), or why it was skipped."""
    from zarrdali.batch.plan import plan_batch
    from zarrdali.gpu import backend as gpu_backend
    from zarrdali.io.connect import make_source
    from zarrdali.store.open import load_layouts, open_group

    missing = gpu_backend.missing_gpu_requirements()
    if missing:
        return {"status": "skipped", "reason": "no GPU path here: " + "; ".join(missing)}
    if read == "kvikio":  # kvikIO's remote file takes credentials from the environment
        os.environ.update(
            AWS_ACCESS_KEY_ID=opts["key"],
            AWS_SECRET_ACCESS_KEY=opts["secret"],
            AWS_DEFAULT_REGION=opts["client_kwargs"]["region_name"],
            AWS_ENDPOINT_URL=opts["endpoint_url"],
        )
    group, name = open_group(url, storage_options=opts)
    layouts = load_layouts(group, name, VARIABLES)
    loader = zarrdali.ZarrLoader(
        url, VARIABLES, **SPEC, seed=args.seed, device="cpu", workers=0, storage_options=opts
    )
    plan, n_batches = loader.epoch_plan(), len(loader)
    loader.close()
    source = make_source(group, name, max_in_flight=args.max_in_flight)
    try:
        backend = gpu_backend.GpuBackend(group, name, read=read, source=source)
    except Exception as err:  # e.g. kvikIO built without remote-file support
        source.close()
        return {"status": "skipped", "reason": f"{type(err).__name__}: {err}"}
    steps = SPEC["input_steps"] + SPEC["target_steps"]
    try:
        n, seconds = 0, 0.0
        for k in range(args.warmup + args.batches):
            samples = plan.batch(k % n_batches)
            batch_plan = plan_batch(
                layouts, samples, n_frames=steps, frame_step=1, tile_hw=SPEC["tile"]
            )
            t0 = time.perf_counter()
            backend.load_batch(layouts, batch_plan)  # synchronizes its own stream
            if k >= args.warmup:
                seconds += time.perf_counter() - t0
                n += len(samples)
        stats = backend.stats()
    finally:
        backend.close()
    return {
        "status": "ok",
        "samples_per_s": n / seconds,
        "seconds": seconds,
        "samples": n,
        "read": backend.read_mode,
        "source": stats,
    }


def fallback_run(url, opts, args) -> dict:
    """The same loader, every chunk read through zarr-python (the old path for URLs)."""
    loader = zarrdali.ZarrLoader(
        url, VARIABLES, **SPEC, seed=args.seed, device="cpu", workers=0, storage_options=opts
    )
    loader.layouts = [replace(layout, key_prefix=None) for layout in loader.layouts]
    plan = loader.epoch_plan()
    t0 = time.perf_counter()
    n = 0
    for k in range(args.fallback_batches):
        samples = plan.batch(k)
        loader.load_batch(samples)
        n += len(samples)
    seconds = time.perf_counter() - t0
    loader.close()
    return {"samples_per_s": n / seconds, "seconds": seconds, "samples": n}


def xarray_run(url, opts, args) -> dict:
    """xarray reading the URL sample by sample (one isel + .values per variable)."""
    import xarray as xr

    loader = zarrdali.ZarrLoader(
        url, VARIABLES, **SPEC, seed=args.seed, device="cpu", workers=0, storage_options=opts
    )
    samples = np.concatenate([loader.epoch_plan().batch(k) for k in range(4)])[: args.xr_samples]
    loader.close()
    ds = xr.open_zarr(url, storage_options=opts, consolidated=False, mask_and_scale=False)
    dims = ds[VARIABLES[0]].dims
    t0 = time.perf_counter()
    for t, y, x in samples.tolist():
        sel = {dims[0]: slice(t, t + 6), dims[-2]: slice(y, y + 128), dims[-1]: slice(x, x + 128)}
        window = ds[VARIABLES].isel(sel)
        np.stack([window[v].values for v in VARIABLES], axis=1)
    seconds = time.perf_counter() - t0
    return {"samples_per_s": len(samples) / seconds, "seconds": seconds, "samples": len(samples)}


def raw_client_run(server, ranges, args, server_pid: int | None = None) -> dict:
    """obstore fetching ``ranges`` [(key, start, end)] concurrently: what the server delivers."""
    import obstore
    from obstore.store import S3Store

    opts = server.storage_options()
    store = S3Store(
        BUCKET,
        endpoint=server.endpoint,
        access_key_id=opts["key"],
        secret_access_key=opts["secret"],
        region="us-east-1",
        client_options={"allow_http": True},
    )

    async def fetch_all() -> int:
        limit = asyncio.Semaphore(args.max_in_flight)

        async def one(key, start, end) -> int:
            async with limit:
                data = await obstore.get_range_async(store, key, start=start, end=end)
                return len(memoryview(data))

        return sum(await asyncio.gather(*(one(*r) for r in ranges)))

    asyncio.run(fetch_all())  # warm the connections
    cpu0 = cpu_now(server_pid)
    t0 = time.perf_counter()
    nbytes = asyncio.run(fetch_all())
    seconds = time.perf_counter() - t0
    return {
        **cpu_ms_per_mb(cpu0, server_pid, nbytes),
        "mb_per_s": nbytes / seconds / 1e6,
        "requests_per_s": len(ranges) / seconds,
        "seconds": seconds,
        "requests": len(ranges),
        "bytes": nbytes,
    }


def ranged_gets(server) -> list[tuple[str, int, int]]:
    """(key, start, end) of every answered ranged GET in the server's log."""
    out = []
    prefix = f"/{BUCKET}/"
    for r in server.requests():
        if r.method != "GET" or r.status >= 300 or not r.range or "=-" in r.range:
            continue
        a, b = r.range.split("=", 1)[1].split("-")
        out.append((r.path[len(prefix) :], int(a), int(b) + 1))
    return out


def median_row(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("zarrdali", "zarr", "obstore", "numcodecs", "xarray", "s3fs", "moto"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


class HTTPServerProcess:
    """``python -m zarrdali.bench.objectserver --http DIR`` in its own process (it then
    shares no GIL with the loader), with random faults."""

    def __init__(self, directory: Path, fail_rate: float = 0.0, reset_rate: float = 0.0):
        command = [sys.executable, "-m", "zarrdali.bench.objectserver", "--http", str(directory)]
        rates = ["--fail-rate", str(fail_rate), "--reset-rate", str(reset_rate)]
        self._proc = subprocess.Popen([*command, *rates], stdout=subprocess.PIPE, text=True)
        port = int(self._proc.stdout.readline().split()[1])
        self.url = f"http://127.0.0.1:{port}/{SHARDED}"

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


def timed_epoch(url: str, batches: int, args) -> dict:
    """Seconds from the constructor to the end of ``batches`` batches (a user's view),
    and what the source counted."""
    t0 = time.perf_counter()
    loader = zarrdali.ZarrLoader(url, VARIABLES, **SPEC, seed=args.seed, device="cpu", workers=0)
    try:
        built = time.perf_counter() - t0
        n = 0
        for n, _ in enumerate(loader, 1):
            if n == batches:
                break
        seconds = time.perf_counter() - t0
        stats = loader.backend.stats()
    finally:
        loader.close()
    keep = ("requests", "retries", "timeouts", "transient_errors", "slow_answers")
    keep += ("in_flight_limit", "in_flight_decreases", "peak_in_flight")
    return {
        "seconds": seconds,
        "constructor_seconds": built,
        "batches": n,
        **{k: stats.get(k) for k in keep},
    }


def dead_endpoint(timeout_s: float) -> dict:
    """How long the constructor takes to fail against a server that never answers."""
    from zarrdali.bench.objectserver import SilentServer

    with SilentServer() as silent:
        t0 = time.perf_counter()
        try:
            zarrdali.ZarrLoader(
                f"{silent.url}/{SHARDED}",
                VARIABLES,
                **SPEC,
                device="cpu",
                workers=0,
                request_timeout=timeout_s,
            ).close()
            error = None
        except Exception as err:  # what the user gets is what is measured
            error = f"{type(err).__module__}.{type(err).__name__}: {err}"
        seconds = time.perf_counter() - t0
    return {"request_timeout": timeout_s, "seconds": seconds, "error": error}


def faults_main(args) -> dict:
    if not sample_data_exists(args.data_dir):
        write_sample_data(args.data_dir, SampleDataSpec(n_time=args.n_time), progress=False)
    servers = {
        "clean": HTTPServerProcess(args.data_dir),
        "flaky": HTTPServerProcess(args.data_dir, args.fail_rate, args.reset_rate),
    }
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        timed_epoch(servers["clean"].url, 2, args)  # imports and first-use costs, untimed
        for rep in range(args.repeats):
            order = ["clean", "flaky"] if rep % 2 == 0 else ["flaky", "clean"]
            for name in order:
                r = timed_epoch(servers[name].url, args.flaky_batches, args)
                runs[name].append(r)
                print(f"{name}: {json.dumps(r)}", flush=True)
    finally:
        for server in servers.values():
            server.close()
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    dead = [dead_endpoint(t) for t in args.dead_timeouts]
    for d in dead:
        print(f"dead endpoint: {json.dumps(d)}", flush=True)
    return {
        "flaky": {
            "fail_rate": args.fail_rate,
            "reset_rate": args.reset_rate,
            "samples": args.flaky_batches * SPEC["batch_size"],
            "median_seconds": median,
            "flaky_over_clean": median["flaky"] / median["clean"],
            "runs": runs,
        },
        "dead_endpoint": dead,
    }


def faults_markdown(result: dict) -> str:
    f = result["flaky"]
    lines = [
        f"Flaky server ({f['fail_rate']:.3g} of GETs 503, {f['reset_rate']:.3g} of connections "
        f"reset), {f['samples']} samples, constructor included:",
        "",
        "| server | median s | runs (s) |",
        "|---|---|---|",
    ]
    for name, rs in f["runs"].items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        lines.append(f"| {name} | {f['median_seconds'][name]:.2f} | {each} |")
    lines += ["", f"flaky / clean: {f['flaky_over_clean']:.2f}x", ""]
    lines += [
        "| never answers, request_timeout | constructor fails after | error |",
        "|---|---|---|",
    ]
    for d in result["dead_endpoint"]:
        lines.append(f"| {d['request_timeout']:g} s | {d['seconds']:.2f} s | {d['error']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("sample-data-remote"))
    p.add_argument("--n-time", type=int, default=48, help="hourly steps of the sample data")
    p.add_argument("--delays-ms", type=float, nargs="+", default=[5.0, 20.0])
    p.add_argument("--batches", type=int, default=12, help="timed batches per zarrdali run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fallback-batches", type=int, default=1)
    p.add_argument("--xr-samples", type=int, default=16)
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="zarrdali's worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--server-cores",
        type=int,
        default=1,
        help="cores (the machine's last) the S3 server runs on, the clients on the others; "
        "0: no pinning",
    )
    p.add_argument(
        "--no-peers",
        action="store_true",
        help="zarrdali and the plain client only (no fallback, xarray or GPU rows)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out/remote"))
    p.add_argument("--faults", action="store_true", help="what failures cost (see above)")
    p.add_argument("--fail-rate", type=float, default=1 / 3)
    p.add_argument("--reset-rate", type=float, default=1 / 7)
    p.add_argument("--flaky-batches", type=int, default=24)
    p.add_argument("--dead-timeouts", type=float, nargs="+", default=[2.0, 5.0])
    args = p.parse_args(argv)
    commit = _commit()  # at the start: the code that runs
    if args.faults:
        args.out.mkdir(parents=True, exist_ok=True)
        result = faults_main(args)
        payload = {
            "command": " ".join([sys.executable, *sys.argv]),
            "commit": commit,
            "versions": versions(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "load_average": os.getloadavg(),
            "spec": {**SPEC, "variables": VARIABLES},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **result,
        }
        (args.out / "faults.json").write_text(json.dumps(payload, indent=2) + "\n")
        table = faults_markdown(result)
        (args.out / "faults.md").write_text(table + "\n")
        print(table)
        return 0

    if args.workers:
        raise SystemExit("--workers > 0: the source's byte counts live in the workers; use 0")
    warnings.filterwarnings("ignore", message=".*read through zarr-python.*")
    if not sample_data_exists(args.data_dir):
        write_sample_data(args.data_dir, SampleDataSpec(n_time=args.n_time), progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    cores = sorted(os.sched_getaffinity(0))
    server_cpus = None
    if 0 < args.server_cores < len(cores):
        server_cpus = set(cores[-args.server_cores :])
        os.sched_setaffinity(0, set(cores[: -args.server_cores]))  # before any thread starts
    with RemoteS3Server(cpus=server_cpus) as server:
        upload(server.endpoint, BUCKET, args.data_dir / SHARDED, SHARDED)
        url, opts = f"s3://{BUCKET}/{SHARDED}", server.storage_options()
        for delay in args.delays_ms:
            server.configure(delay_s=delay / 1000, clear_log=True)
            runs, raws = [], []
            for _ in range(args.repeats):  # interleaved: the machine's drift hits both alike
                server.configure(clear_log=True)
                runs.append(zarrdali_run(url, opts, args, args.workers, server.pid))
                ranges = ranged_gets(server)
                raws.append(raw_client_run(server, ranges, args, server.pid))
            fast = runs[-1]
            raw = dict(raws[-1])
            raw["mb_per_s"] = median_row(raws, "mb_per_s")["median"]
            raw["requests_per_s"] = median_row(raws, "requests_per_s")["median"]
            for key in ("client_cpu_ms_per_mb", "server_cpu_ms_per_mb"):
                raw[key] = median_row(raws, key)["median"]
            skipped = {"samples_per_s": float("nan"), "status": "skipped (--no-peers)"}
            fallback = skipped if args.no_peers else fallback_run(url, opts, args)
            xr_row = skipped if args.no_peers else xarray_run(url, opts, args)
            gpu_rows = {}
            if not args.no_peers:
                gpu_rows = {read: gpu_run(url, opts, args, read) for read in GPU_READS}
            z = median_row(runs, "samples_per_s")
            z_mb = median_row(runs, "network_mb_per_s")["median"]
            row = {
                "delay_ms": delay,
                "zarrdali": {
                    "samples_per_s": z,
                    "network_mb_per_s": z_mb,
                    "requests_last_run": fast["source"].get("requests"),
                    "bytes_last_run": fast["source"].get("bytes"),
                    "peak_in_flight": fast["source"].get("peak_in_flight"),
                    "in_flight_limit_last_run": fast["source"].get("in_flight_limit"),
                    "max_in_flight": args.max_in_flight,
                    "client_cpu_ms_per_mb": median_row(runs, "client_cpu_ms_per_mb")["median"],
                    "server_cpu_ms_per_mb": median_row(runs, "server_cpu_ms_per_mb")["median"],
                    "runs": [
                        {k: r[k] for k in ("samples_per_s", "network_mb_per_s")} for r in runs
                    ],
                },
                "zarrdali_gpu": gpu_rows,
                "zarr_python_fallback": fallback,
                "xarray_sample_by_sample": xr_row,
                "plain_range_get_client": raw,
                "ratios": {
                    "zarrdali / xarray (samples/s)": z["median"] / xr_row["samples_per_s"],
                    "zarrdali / fallback (samples/s)": z["median"] / fallback["samples_per_s"],
                    # per repeat (zarrdali's run and the plain client's right after), median
                    "zarrdali / plain client (MB/s)": statistics.median(
                        r["network_mb_per_s"] / c["mb_per_s"]
                        for r, c in zip(runs, raws, strict=True)
                    ),
                },
            }
            results.append(row)
            print(json.dumps({"delay_ms": delay, **row["ratios"]}), flush=True)

    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "commit": commit,
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "server_cpus": sorted(server_cpus) if server_cpus else None,
        "load_average_after": os.getloadavg(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }
    (args.out / "remote.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(results)
    (args.out / "remote.md").write_text(table + "\n")
    print(table)
    return 0


def markdown(results: list[dict]) -> str:
    lines = [
        "| delay/request | loader | samples/s median (min–max) | network MB/s | "
        "CPU ms per MB: client, server |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        z = r["zarrdali"]["samples_per_s"]
        d = f"{r['delay_ms']:g} ms"
        zd = r["zarrdali"]
        lines.append(
            f"| {d} | zarrdali (fast path; peak {zd['peak_in_flight']} in flight) | "
            f"{z['median']:.1f} ({z['min']:.1f}–{z['max']:.1f}) | "
            f"{zd['network_mb_per_s']:.1f} | {_cpu(zd)} |"
        )
        for read, g in r.get("zarrdali_gpu", {}).items():
            what = f"{g['samples_per_s']:.1f}" if g["status"] == "ok" else f"skipped: {g['reason']}"
            lines.append(
                f"| {d} | zarrdali device=cuda, read={read} (load_batch) | {what} | – | – |"
            )
        lines.append(
            f"| {d} | zarr-python fallback | "
            f"{r['zarr_python_fallback']['samples_per_s']:.2f} | – | – |"
        )
        lines.append(
            f"| {d} | xarray sample by sample | "
            f"{r['xarray_sample_by_sample']['samples_per_s']:.2f} | – | – |"
        )
        raw = r["plain_range_get_client"]
        lines.append(
            f"| {d} | plain range-GET client (same ranges, no decode) | – | "
            f"{raw['mb_per_s']:.1f} ({raw['requests_per_s']:.0f} requests/s) | {_cpu(raw)} |"
        )
    lines.append("")
    for r in results:
        ratios = ", ".join(f"{k}: {v:.2f}x" for k, v in r["ratios"].items())
        lines.append(f"- {r['delay_ms']:g} ms: {ratios}")
    return "\n".join(lines)


def _cpu(row: dict) -> str:
    """CPU ms per MB of a row's client and of the server, or – where not measured."""
    if "client_cpu_ms_per_mb" not in row:
        return "–"
    return f"{row['client_cpu_ms_per_mb']:.2f}, {row.get('server_cpu_ms_per_mb', float('nan')):.2f}"


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
