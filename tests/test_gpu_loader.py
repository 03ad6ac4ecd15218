"""``device="cuda"`` end to end (skipped without a GPU): same batches as the CPU path
and as zarr-python, exact resume and ranks, flat device memory and threads, and
no crash with the garbage collector on.

The GPU path once ran right only with ``gc.disable()``: a finalizer of a
GPU-owning object, run by the collector after what it depended on was gone,
crashed the process (issue 11). Here the collector runs at random points: in
a thread of its own throughout every test (``fakegpu.BackgroundCollector``),
in the prefetch threads (around every batch load), between batches and
between tests, and ``faulthandler`` prints every thread's stack if the process
dies. Device memory is measured as CuPy's pool total (``total_bytes()``: the
blocks it caches too), not only what is in use.
"""

from __future__ import annotations

import faulthandler
import gc
import random
import threading
import warnings
import zlib

import numpy as np
import pytest

import fakegpu
import zarrdali
from storefactory import VarSpec
from test_loader_oracle import Oracle, check_batches, loader_for, to_numpy

pytestmark = pytest.mark.gpu

faulthandler.enable()

VARS = [
    VarSpec("a", shape=(20, 21, 33), chunks=(1, 21, 33)),
    VarSpec(
        "b",
        shape=(20, 2, 21, 33),
        chunks=(2, 1, 8, 8),
        shards=(4, 2, 16, 16),
        dtype="int16",
        endian="big",
    ),
    VarSpec("c", shape=(20, 21, 33), chunks=(1, 8, 8), compressor="lz4", written_time=(0, 12)),
]
STATS = {"a": (0.5, 0.25), "b": ([1.0, -2.0], [3.0, 4.0]), "c": (0.1, 2.0)}

# Stores every batch of which is checked against zarr-python, collector on.
ORACLE_STORES = {
    "zstd-field-chunks": [VarSpec("a", shape=(20, 21, 33), chunks=(1, 21, 33))],
    "sharded-bigendian-levels": [VARS[1]],
    "lz4-missing-chunks": [VARS[2]],
    "gzip-crc32c": [VarSpec("g", shape=(20, 21, 33), compressor="gzip", checksum=True)],
    "blosc-on-host": [VarSpec("z", shape=(20, 21, 33), compressor="blosc", dtype="float64")],
    "mixed": [VARS[0], VarSpec("n", shape=(20, 21, 33), shards=(4, 16, 16), seed=5)],
}


class RandomCollector:
    """``maybe()`` runs ``gc.collect()`` with probability ``p``, in whichever
    thread calls it (seeded: a failure replays the same collections)."""

    def __init__(self, p: float = 0.3, seed: int = 11) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.p = p
        self.collections = 0

    def maybe(self) -> None:
        with self._lock:
            hit = self._rng.random() < self.p
            self.collections += hit
        if hit:
            gc.collect()


@pytest.fixture(autouse=True)
def collect_between_tests(request):
    """The collector between tests and, throughout each, at random points in a
    thread of its own (seeded by the test's id: a failure replays the same)."""
    gc.collect()
    with fakegpu.BackgroundCollector(seed=zlib.crc32(request.node.nodeid.encode())):
        yield
    gc.collect()


@pytest.fixture
def collector(monkeypatch) -> RandomCollector:
    """Collections in the prefetch threads, before and after every batch load
    (patched on the class: an instance attribute would make a reference cycle)."""
    from zarrdali.gpu import GpuBackend

    collector = RandomCollector()
    load_batch = GpuBackend.load_batch

    def collecting(self, layouts, plan, **device_args):  # out=, stream= from the feed
        collector.maybe()
        out = load_batch(self, layouts, plan, **device_args)
        collector.maybe()
        return out

    monkeypatch.setattr(GpuBackend, "load_batch", collecting)
    return collector


@pytest.fixture
def store(make_store):
    return make_store(*VARS)


def cuda_loader(store, variables, **kw) -> zarrdali.ZarrLoader:
    return loader_for(store, variables, device="cuda", **kw)


def epoch(loader, collector: RandomCollector | None = None) -> list[dict]:
    """One epoch as numpy, the collector maybe running between batches."""
    out = []
    for batch in loader:
        out.append(to_numpy(batch))
        if collector is not None:
            collector.maybe()
    return out


def test_cuda_batches_equal_cpu_batches(store, collector):
    kw = dict(normalize=STATS, augment=("flip", "rot90"), batch_size=6)
    with cuda_loader(store, ["a", "b", "c"], **kw) as cuda:
        with loader_for(store, ["a", "b", "c"], device="cpu", **kw) as cpu:
            for e in (0, 1, 5):
                cpu.set_epoch(e)
                cuda.set_epoch(e)
                want = epoch(cpu)
                got = epoch(cuda, collector)
                assert len(got) == len(want)
                for g, w in zip(got, want, strict=True):
                    for key in w:
                        # DALI's GPU arithmetic may differ from its CPU arithmetic in the last bit
                        np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=1e-6)
        first = next(iter(cuda))
        assert first["input"].is_cuda and first["index"].is_cuda
    assert collector.collections > 0


@pytest.mark.parametrize("case", list(ORACLE_STORES))
def test_every_batch_equals_zarr_python_with_the_collector_on(make_store, collector, case):
    specs = ORACLE_STORES[case]
    store = make_store(*specs)
    names = [s.name for s in specs]
    oracle = Oracle(store, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blosc: decoded on the host, warned once
        with cuda_loader(store, names, batch_size=7) as loader:
            for e in (0, 1):
                loader.set_epoch(e)
                batches = epoch(loader, collector)
                assert len(batches) == len(loader)
                check_batches(batches, oracle, input_steps=2, target_steps=1, tile=(8, 8))


def test_cuda_resume_mid_epoch(store, collector):
    with cuda_loader(store, ["a", "b"], batch_size=5) as full:
        full.set_epoch(3)
        everything = epoch(full, collector)
    with cuda_loader(store, ["a", "b"], batch_size=5) as first:
        first.set_epoch(3)
        it = iter(first)
        for _ in range(4):
            next(it)
            collector.maybe()
        state = first.state_dict()
        it.close()
    with cuda_loader(store, ["a", "b"], batch_size=5) as resumed:
        resumed.load_state_dict(state)
        rest = epoch(resumed, collector)
    assert len(rest) == len(everything) - 4
    for g, w in zip(rest, everything[4:], strict=True):
        np.testing.assert_array_equal(g["index"], w["index"])
        np.testing.assert_array_equal(g["input"], w["input"])


def _flat(values: list[int], warm: int = 3) -> bool:
    """No growth after the first ``warm`` measurements (10% slack for the pool)."""
    return max(values[warm:]) <= max(values[:warm]) * 1.1 + 1024


def test_no_leaked_threads_or_memory_over_20_epochs(store, collector):
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    used, total, threads = [], [], []
    with cuda_loader(store, ["a", "b"], batch_size=8) as loader:
        for e in range(20):
            loader.set_epoch(e)
            for k, _ in enumerate(loader):
                collector.maybe()
                if e % 3 == 1 and k == 2:
                    break  # some epochs broken off
            gc.collect()
            cupy.cuda.Device().synchronize()
            used.append(pool.used_bytes())
            total.append(pool.total_bytes())  # cached blocks too: per-stream arenas
            threads.append(threading.active_count())
    assert _flat(used), used
    assert _flat(total), total
    assert max(threads[3:]) <= max(threads[:3]), threads
    assert pool.total_bytes() <= total[0]  # close() gave the cached blocks back


def test_50_loaders_created_and_dropped(store, collector):
    """Half closed, half only dropped. A dropped loader's blocks stay cached in
    CuPy's pool (nothing but a close frees its cache) until the next close
    gives every cached block back: the total is bounded, not growing."""
    import cupy

    pool = cupy.get_default_memory_pool()
    used, total, threads = [], [], []
    for i in range(50):
        loader = cuda_loader(store, ["a", "c"], batch_size=8, seed=i)
        loader.set_epoch(i)
        for k, _ in enumerate(loader):
            collector.maybe()
            if k == i % 4:
                break
        if i % 2:
            loader.close()  # half closed explicitly; the others only dropped
        del loader
        gc.collect()
        cupy.cuda.Device().synchronize()
        used.append(pool.used_bytes())
        total.append(pool.total_bytes())
        threads.append(threading.active_count())
    assert _flat(used, warm=5), used
    assert _flat(total, warm=5), total
    assert max(total[1::2]) <= min(total[0::2]) + 1024, total  # each close freed the cache
    assert max(threads[5:]) <= max(threads[:5]), threads


def test_ranks_serve_disjoint_exact_shares(store, collector):
    """Two ranks of one epoch on the GPU path: the same number of batches, no
    sample twice, every batch equal to zarr-python at its index."""
    oracle = Oracle(store, ["a", "b"])
    seen = []
    counts = []
    for rank in range(2):
        with cuda_loader(store, ["a", "b"], batch_size=4, rank=rank, world_size=2) as loader:
            loader.set_epoch(2)
            batches = epoch(loader, collector)
            counts.append(len(batches))
            check_batches(batches, oracle, input_steps=2, target_steps=1, tile=(8, 8))
            seen += [tuple(i) for b in batches for i in b["index"].tolist()]
    assert counts[0] == counts[1] > 0
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("close", [True, False], ids=["closed", "dropped"])
def test_no_gpu_owning_object_left_to_the_collector(store, close):
    """A cuda loader closed or only dropped is freed by reference counting: the
    collector finds no CuPy array, stream or event, nor any engine object,
    among what it would have to free."""
    import cupy

    gc.collect()
    gc.disable()
    try:
        loader = cuda_loader(store, ["a", "b", "c"], batch_size=5)
        for k, _ in enumerate(loader):
            if k == 3:
                break
        epoch(loader)
        if close:
            loader.close()
        del loader
        found = fakegpu.gpu_garbage(cupy.ndarray, cupy.cuda.Stream, cupy.cuda.Event)
    finally:
        gc.enable()
    assert found == []


def test_read_error_surfaces_in_the_loop(store, collector, monkeypatch):
    from zarrdali.gpu import GpuBackend

    calls = {"n": 0}
    load_batch = GpuBackend.load_batch

    def failing(self, layouts, plan, **device_args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise zarrdali.ChunkError("injected", store="s", array="a", key="c/0/0/0")
        return load_batch(self, layouts, plan, **device_args)

    monkeypatch.setattr(GpuBackend, "load_batch", failing)
    with cuda_loader(store, ["a"], batch_size=4) as loader:
        with pytest.raises(zarrdali.ChunkError, match="injected"):
            epoch(loader, collector)
        gc.collect()
        assert len(epoch(loader, collector)) == len(loader)  # the next epoch runs


def test_closed_cuda_loader_refuses_to_iterate(store):
    loader = cuda_loader(store, ["a"], batch_size=4)
    it = iter(loader)
    next(it)
    loader.close()
    loader.close()
    with pytest.raises(zarrdali.LoaderClosedError, match="was closed"):
        next(it)
    with pytest.raises(zarrdali.LoaderClosedError, match=r"ZarrLoader\(.*\) is closed"):
        iter(loader)
