import contextlib
import sys

sys.path.insert(0, "/work/wt/issue30-small-batches/benchmarks")
import zarrdali.cpu.epoch as E
from zarrdali.bench.main import LOADERS, run_bench
from zarrdali.bench.runners import zarrdali_runner
from zarrdali.bench.spec import BenchSpec


def ahead_plus(prefetch, batch_size, workers):
    return max(prefetch, min(64, -(-2 * workers // E.max_parts(batch_size, workers))))


@contextlib.contextmanager
def patched():
    saved = E.batches_ahead
    E.batches_ahead = ahead_plus
    try:
        yield
    finally:
        E.batches_ahead = saved


def plus_runner(spec, result):
    with patched():
        inner = zarrdali_runner(spec, result, "cpu")
    try:
        while True:
            with patched():
                try:
                    next(inner)
                except StopIteration:
                    return
            yield
    finally:
        inner.close()


def main():
    LOADERS["zd-plus"] = ("zarrdali[cpu] 4 ahead", plus_runner)
    store = "/work/wt/issue30-small-batches/sample-data/era5_sharded.zarr"
    base = BenchSpec(
        store=store, variables=("t2m", "u10", "v10", "msl"), placement="chunk-grid", epochs=6
    )
    specs = [base.at_batch_size(8, 512, None, None)]
    p = run_bench(
        [("sharded cg", store)],
        specs,
        ["file-ceiling", "tensorstore", "zarrdali-cpu", "zd-plus"],
        "/tmp/h30/ab4",
        progress=False,
    )
    print(p["table"])


if __name__ == "__main__":
    main()
