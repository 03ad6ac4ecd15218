"""``device="cuda"`` end to end (skipped without a GPU): same batches as the CPU path."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import zarrdali
from storefactory import VarSpec
from test_loader_oracle import loader_for, run_epochs

pytestmark = pytest.mark.gpu

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


@pytest.fixture
def store(make_store):
    return make_store(*VARS)


def _numpy(batches):
    return [{k: v.cpu().numpy() for k, v in b.items()} for b in batches]


def test_cuda_batches_equal_cpu_batches(store):
    kw = dict(normalize=STATS, augment=("flip", "rot90"), batch_size=6)
    cpu = loader_for(store, ["a", "b", "c"], device="cpu", **kw)
    cuda = loader_for(store, ["a", "b", "c"], device="cuda", **kw)
    got = run_epochs(cuda, [0, 1, 5])
    want = run_epochs(cpu, [0, 1, 5])
    first = next(iter(cuda))
    assert first["input"].is_cuda and first["index"].is_cuda
    for epoch in want:
        assert len(got[epoch]) == len(want[epoch])
        for g, w in zip(got[epoch], want[epoch], strict=True):
            for key in w:
                # DALI's GPU arithmetic may differ from its CPU arithmetic in the last bit
                np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=1e-6)


def test_cuda_resume_mid_epoch(store):
    full = run_epochs(loader_for(store, ["a", "b"], device="cuda", batch_size=5), [3])[3]
    first = loader_for(store, ["a", "b"], device="cuda", batch_size=5)
    first.set_epoch(3)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    it.close()
    resumed = loader_for(store, ["a", "b"], device="cuda", batch_size=5)
    resumed.load_state_dict(state)
    rest = _numpy(resumed)
    for g, w in zip(
        rest, [{k: v.cpu().numpy() for k, v in b.items()} for b in full[4:]], strict=True
    ):
        np.testing.assert_array_equal(g["index"], w["index"])
        np.testing.assert_array_equal(g["input"], w["input"])


def test_no_leaked_threads_or_memory_over_20_epochs(store):
    import cupy

    loader = loader_for(store, ["a", "b"], device="cuda", batch_size=8)
    pool = cupy.get_default_memory_pool()
    used = []
    threads = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        cupy.cuda.Device().synchronize()
        used.append(pool.used_bytes())
        threads.append(threading.active_count())
    assert max(used[5:]) <= max(used[:5]) * 1.1 + 1024  # no growth after warm-up
    assert threads[-1] <= threads[1]


def test_read_error_surfaces_in_the_loop(store, monkeypatch):
    loader = loader_for(store, ["a"], device="cuda", batch_size=4)
    real = loader.backend.load_batch
    calls = {"n": 0}

    def failing(layouts, plan):
        calls["n"] += 1
        if calls["n"] == 3:
            raise zarrdali.ChunkError("injected", store="s", array="a", key="c/0/0/0")
        return real(layouts, plan)

    monkeypatch.setattr(loader.backend, "load_batch", failing)
    with pytest.raises(zarrdali.ChunkError, match="injected"):
        for _ in loader:
            pass
