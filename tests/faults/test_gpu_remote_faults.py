"""The GPU path's remote reader (``GpuBackend(read="pinned")``: the store's byte
source into pinned memory) under the same faults as the CPU path: a hung
connection and a damaged read-through cache. Run on the CPU stand-in of the
GPU libraries (``tests/fakegpu.py``); each batch equals the CPU backend's.
"""

from __future__ import annotations

import numpy as np
import pytest

import fakegpu
from zarrdali.batch.plan import plan_batch
from zarrdali.bench.objectserver import RangeHTTPServer
from zarrdali.cpu.backend import CpuBackend
from zarrdali.io.connect import make_source
from zarrdali.store.open import load_layouts, open_group

pytest.importorskip("obstore")

VARIABLES = ["sharded", "plain"]
SAMPLES = np.array([[0, 0, 0], [3, 13, 25], [5, 7, 5], [6, 13, 0], [1, 0, 25], [7, 5, 17]])


def _batches(backend, layouts) -> list[bytes]:
    out = []
    for k in range(0, len(SAMPLES), 2):
        plan = plan_batch(layouts, SAMPLES[k : k + 2], n_frames=3, frame_step=2, tile_hw=(8, 8))
        got = backend.load_batch(layouts, plan)
        out.append(np.asarray(got.get() if hasattr(got, "get") else got).tobytes())
    return out


def _gpu(group, name, **source_options):
    from zarrdali.gpu import GpuBackend

    source = make_source(group, name, **source_options)
    return GpuBackend(group, name, num_threads=2, source=source, read="pinned")


@pytest.mark.time_limit(120)
def test_gpu_reader_resends_a_hung_request(remote_store, monkeypatch):
    fakegpu.install(monkeypatch)
    with RangeHTTPServer(remote_store.parent) as http:
        group, name = open_group(f"{http.url}/{remote_store.name}")
        layouts = load_layouts(group, name, VARIABLES)
        cpu = CpuBackend(group, name, 2)
        gpu = _gpu(group, name)
        try:
            want = _batches(cpu, layouts)
            _batches(gpu, layouts)  # the usual latency, learnt
            http.faults.hang["/sharded/c/"] = 1  # shard indexes are cached: a chunk read hangs
            assert _batches(gpu, layouts) == want
            stats = gpu.source.stats()
        finally:
            gpu.close()
            cpu.close()
    assert http.faults.hang["/sharded/c/"] == 0
    assert stats["timeouts"] == 1 and stats["retries"] >= 1


@pytest.mark.time_limit(120)
def test_gpu_reader_drops_damaged_cache_entries(remote_store, tmp_path, monkeypatch):
    fakegpu.install(monkeypatch)
    cache_dir = tmp_path / "cache"
    with RangeHTTPServer(remote_store.parent) as http:
        group, name = open_group(f"{http.url}/{remote_store.name}")
        layouts = load_layouts(group, name, VARIABLES)
        cpu = CpuBackend(group, name, 2)
        try:
            want = _batches(cpu, layouts)
        finally:
            cpu.close()
        first = _gpu(group, name, cache_dir=cache_dir)
        try:
            assert _batches(first, layouts) == want
        finally:
            first.close()
        entries = [p for p in cache_dir.rglob("*") if p.is_file()]
        for path in entries:  # one byte flipped in every entry
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0x10
            path.write_bytes(bytes(raw))
        again = _gpu(group, name, cache_dir=cache_dir)
        try:
            assert _batches(again, layouts) == want
            stats = again.source.stats()
        finally:
            again.close()
    assert stats["cache_dropped"] >= len(entries) and stats["requests"] > 0
