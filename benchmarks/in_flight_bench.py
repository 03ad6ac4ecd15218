"""Requests in flight: the adaptive limit (the default) against fixed limits.

Two servers on 127.0.0.1, each in its own process, serving the sample data's
sharded store:

- ``small``: ``http.server`` with a listen queue of 5 and HTTP/1.0 (a
  connection per request), as a small static-file server is: past a few
  connections at once its queue overflows and the dropped connects wait for
  TCP's retransmission (1 s, then 3 s ...).
- ``s3-5ms`` / ``s3-20ms``: moto's S3 with that delay added to every request
  (``benchmarks/remote_bench.py``'s server), where many requests in flight pay.

For each, ``ZarrLoader`` (CPU path, in-process reads, the reference spec:
4 variables, 4 + 2 frames of 128 x 128, batches of 8) is iterated over the same
batches with the default adaptive limit (at most ``max_in_flight=64``) and with
fixed limits, in turns (A B C ... A B C ...), ``--reps`` times. Reported: the
median seconds per run, and the adaptive run against the best fixed limit.

    python benchmarks/in_flight_bench.py --out benchmarks/results/in-flight-2core
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import zarrdali
from zarrdali.bench.objectserver import RemoteS3Server, upload
from zarrdali.bench.report import write_results
from zarrdali.io.flow import AdaptiveLimit
from zarrdali.sample_data import SHARDED, SampleDataSpec, sample_data_exists, write_sample_data

VARIABLES = ["t2m", "u10", "v10", "msl"]
SPEC = dict(input_steps=4, target_steps=2, tile=(128, 128), batch_size=8, shuffle=True, seed=0)


class SmallHTTPServer:
    """``python -m zarrdali.bench.objectserver --http DIR --backlog 5`` in a process."""

    def __init__(self, directory: Path, backlog: int = 5) -> None:
        command = [sys.executable, "-m", "zarrdali.bench.objectserver", "--http", str(directory)]
        self._proc = subprocess.Popen(
            [*command, "--backlog", str(backlog)],
            stdout=subprocess.PIPE,
            text=True,
        )
        port = int(self._proc.stdout.readline().split()[1])
        self.url = f"http://127.0.0.1:{port}/{SHARDED}"

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


def run(url: str, opts: dict | None, limit: str, batches: int) -> dict:
    """Seconds to serve ``batches`` batches (after one of warm-up) with ``limit``:
    ``"adaptive"`` or a fixed number of requests in flight."""
    fixed = None if limit == "adaptive" else int(limit)
    loader = zarrdali.ZarrLoader(
        url,
        VARIABLES,
        **SPEC,
        device="cpu",
        workers=0,
        storage_options=opts,
        max_in_flight=fixed or 64,
    )
    source = loader.backend.source
    if fixed is not None:
        source.limit = AdaptiveLimit(fixed, adaptive=False)
    try:
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - t0
        it.close()
        stats = source.stats()
    finally:
        loader.close()
    keep = ("requests", "retries", "timeouts", "slow_answers", "in_flight_limit", "peak_in_flight")
    return {"seconds": seconds, **{k: stats[k] for k in keep}}


def scenario(name: str, url: str, opts, limits: list[str], args) -> dict:
    runs: dict[str, list[dict]] = {limit: [] for limit in limits}
    for rep in range(args.reps):
        order = limits if rep % 2 == 0 else limits[::-1]
        for limit in order:
            runs[limit].append(run(url, opts, limit, args.batches))
            r = runs[limit][-1]
            print(
                f"{name:8s} {limit:>8s}: {r['seconds']:7.2f} s  limit at end "
                f"{r['in_flight_limit']:3d}, peak {r['peak_in_flight']:3d}, "
                f"{r['slow_answers']} slow, {r['timeouts']} stalled",
                flush=True,
            )
    median = {limit: statistics.median(r["seconds"] for r in rs) for limit, rs in runs.items()}
    fixed = {k: v for k, v in median.items() if k != "adaptive"}
    best = min(fixed, key=fixed.get)
    summary = {
        "median_seconds": median,
        "best_fixed": best,
        "adaptive_over_best_fixed": median["adaptive"] / fixed[best],
        "adaptive_over_64": median["adaptive"] / fixed["64"] if "64" in fixed else None,
        "runs": runs,
    }
    print(
        f"{name}: adaptive {median['adaptive']:.2f} s, best fixed ({best}) {fixed[best]:.2f} s "
        f"-> {summary['adaptive_over_best_fixed']:.2f}x",
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="sample-data")
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--small-limits", default="adaptive,1,2,4,6,8")
    p.add_argument("--s3-limits", default="adaptive,16,64")
    p.add_argument("--delays-ms", default="5,20")
    p.add_argument("--out", default=None)
    p.add_argument("--only", choices=["small", "s3"], default=None, help="one kind of server")
    args = p.parse_args(argv)
    data = Path(args.data_dir)
    if not sample_data_exists(data):
        write_sample_data(data, SampleDataSpec(), progress=False)
    results = {}
    if args.only != "s3":
        small = SmallHTTPServer(data)
        try:
            limits = args.small_limits.split(",")
            results["small"] = scenario("small", small.url, None, limits, args)
        finally:
            small.close()
    if args.only == "small":
        if args.out:
            spec = {**SPEC, "variables": VARIABLES, "batches": args.batches, "reps": args.reps}
            write_results(args.out, "in_flight.json", results, spec=spec)
        return
    with RemoteS3Server() as s3:
        upload(s3.endpoint, "bench", data / SHARDED, SHARDED)
        url = f"s3://bench/{SHARDED}"
        for delay in (float(d) for d in args.delays_ms.split(",")):
            s3.configure(delay_s=delay / 1000)
            name = f"s3-{delay:g}ms"
            limits = args.s3_limits.split(",")
            results[name] = scenario(name, url, s3.storage_options(), limits, args)
    if args.out:
        spec = {**SPEC, "variables": VARIABLES, "batches": args.batches, "reps": args.reps}
        write_results(args.out, "in_flight.json", results, spec=spec)


if __name__ == "__main__":
    main()
