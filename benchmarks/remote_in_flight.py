"""Does zarrdali leave a remote store's server idle? Requests in flight, sampled
every millisecond while zarrdali reads from the remote bench's S3 server.

    python benchmarks/remote_in_flight.py --delay-ms 5

The setup is ``remote_bench.py``'s (moto's S3 server pinned to the last core,
this process to the others, the sharded sample store): ``--repeats`` loaders
(seeds 0, 1, ...) each serve ``--batches`` timed batches while a thread samples
the byte source's requests in flight and those queued for a slot. Prints, per
loader, samples/s, how often 0, 1-3, 4-15 and 16+ requests were in flight,
the adaptive limit it settled at, and the consumer's median wait.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import remote_bench as rb

import zarrdali
from zarrdali.bench.objectserver import RemoteS3Server, upload
from zarrdali.sample_data import SHARDED, SampleDataSpec, sample_data_exists, write_sample_data

BANDS = {"0": (0, 1), "1-3": (1, 4), "4-15": (4, 16), "16+": (16, 1 << 30)}


def trace(url: str, opts: dict, seed: int, batches: int) -> str:
    loader = zarrdali.ZarrLoader(
        url, rb.VARIABLES, **rb.SPEC, seed=seed, device="cpu", workers=0,
        storage_options=opts, max_in_flight=64,
    )  # fmt: skip
    it = iter(loader)
    for _ in range(2):
        next(it)
    limit = loader.backend.source.limit
    samples: list[tuple[int, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((limit.in_flight, len(limit._waiters), limit.limit))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    waits = []
    t0 = time.perf_counter()
    for _ in range(batches):
        w = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - w)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    it.close()
    loader.close()
    flying = [s[0] for s in samples]
    share = {k: sum(lo <= f < hi for f in flying) / len(flying) for k, (lo, hi) in BANDS.items()}
    bands = ", ".join(f"{k}: {v:.0%}" for k, v in share.items())
    return (
        f"seed {seed}: {batches * rb.SPEC['batch_size'] / seconds:.1f} samples/s; in flight "
        f"{bands}; median {statistics.median(flying)}, limit {samples[-1][2]}, queued at most "
        f"{max(s[1] for s in samples)}; consumer waits median "
        f"{statistics.median(waits) * 1e3:.0f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("sample-data-remote"))
    p.add_argument("--delay-ms", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=16)
    args = p.parse_args()
    if not sample_data_exists(args.data_dir):
        write_sample_data(args.data_dir, SampleDataSpec(n_time=48), progress=False)
    cores = sorted(os.sched_getaffinity(0))
    server_cpus = {cores[-1]} if len(cores) > 1 else None
    if server_cpus:
        os.sched_setaffinity(0, set(cores[:-1]))
    with RemoteS3Server(cpus=server_cpus) as server:
        upload(server.endpoint, rb.BUCKET, args.data_dir / SHARDED, SHARDED)
        url, opts = f"s3://{rb.BUCKET}/{SHARDED}", server.storage_options()
        server.configure(delay_s=args.delay_ms / 1000, clear_log=True)
        print(f"{args.delay_ms:g} ms per request")
        for seed in range(args.repeats):
            print(trace(url, opts, seed, args.batches), flush=True)


if __name__ == "__main__":
    main()
