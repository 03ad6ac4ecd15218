"""The GPU engine reading a remote store itself: an ``s3://`` store on moto's S3
server on 127.0.0.1 (``zarrdali.bench.objectserver``), through the store's byte
source into pinned memory, then one host-to-device copy per batch.

Every test runs on ``fake`` (the CPU stand-ins of ``fakegpu``) and on ``cuda``
(``@pytest.mark.gpu``: a real device; skipped without one). Checked: every
batch of ``GpuBackend.load_batch`` equals ``CpuBackend.load_batch`` on the same
URL bit for bit (sharded, unsharded, levels, LZ4, Blosc decoded on the host,
missing chunks and shards); the server's ranged GETs are exactly the batch's
coalesced ranges (no whole-shard GET), one host-to-device copy per batch; a
refused access names the store, a missing object names array and key; the
loader's ``device="cuda"`` hands the source to the GPU backend.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import fakegpu
from storefactory import VarSpec, chunk_files, chunk_key, delete_chunks, write_store
from zarrdali.batch.locate import ChunkLocator
from zarrdali.batch.plan import plan_batch
from zarrdali.errors import ChunkError, StoreAccessError
from zarrdali.io.ranges import coalesce_arrays
from zarrdali.io.sources import ObstoreSource
from zarrdali.store.open import load_layouts, open_group

pytest.importorskip("obstore")
pytest.importorskip("moto")
from zarrdali.bench.objectserver import S3Server, upload

NT, NY, NX = 12, 21, 33
SPECS = [
    VarSpec("sharded", shape=(NT, NY, NX), chunks=(1, 8, 8), shards=(4, 16, 16), seed=1),
    VarSpec("plain", shape=(NT, NY, NX), chunks=(2, 8, 8), seed=2),
    VarSpec("levels", shape=(NT, 2, NY, NX), chunks=(1, 1, 8, 8), shards=(2, 2, 16, 16), seed=3),
    VarSpec("lz4", shape=(NT, NY, NX), chunks=(2, 8, 8), compressor="lz4", seed=4),
    VarSpec("blosc", shape=(NT, NY, NX), chunks=(2, 8, 8), compressor="blosc", seed=5),
    VarSpec("holes", shape=(NT, NY, NX), chunks=(1, 8, 8), shards=(2, 16, 16), written_time=(0, 7)),
]
BUCKET, PREFIX = "zarrdali", "tests/gpu-store.zarr"
URL = f"s3://{BUCKET}/{PREFIX}"
SAMPLES = np.array(
    [[0, 0, 0], [3, 13, 25], [5, 7, 5], [6, 13, 0], [1, 0, 25], [7, 5, 17], [4, 8, 8]],
    dtype=np.int64,
)
BATCHES = [SAMPLES[:3], SAMPLES[3:], SAMPLES[[6, 0, 4]]]


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> Path:
    path = write_store(tmp_path_factory.mktemp("gpu-remote") / "store.zarr", SPECS)
    files = chunk_files(path, "plain")  # unsharded chunk objects never written: fill value
    delete_chunks(path, "plain", [chunk_key(path, "plain", f) for f in files[:3]])
    return path


@pytest.fixture(scope="module")
def server(local_store):
    with S3Server() as s3:
        upload(s3.endpoint, BUCKET, local_store, PREFIX)
        yield s3


@pytest.fixture
def s3(server):
    server.configure(delay_s=0, fail={}, keys=["zarrdali-test-key"], clear_log=True)
    return server


@pytest.fixture(params=["fake", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    """``"fake"`` (the CPU stand-in installed) or ``"cuda"`` (a real GPU)."""
    if request.param == "fake":
        fakegpu.install(monkeypatch)
    else:
        from zarrdali.gpu import missing_gpu_requirements

        if missing_gpu_requirements():
            pytest.skip(f"no GPU: {missing_gpu_requirements()}")
    return request.param


@pytest.fixture
def backends():
    made: list = []
    yield made
    for backend in made:
        backend.close()


def _plans(layouts):
    return [plan_batch(layouts, b, n_frames=3, frame_step=2, tile_hw=(8, 8)) for b in BATCHES]


def _gpu(group, name, backends, **kw):
    from zarrdali.gpu import GpuBackend

    backend = GpuBackend(group, name, num_threads=2, **kw)
    backends.append(backend)
    return backend


def _load(backend, layouts, plan) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Blosc decoded on the host warns once
        got = backend.load_batch(layouts, plan)
    return got if isinstance(got, np.ndarray) and not hasattr(got, "get") else got.get()


def _cpu_batches(group, name, layouts, plans, backends) -> list[np.ndarray]:
    from zarrdali.cpu.backend import CpuBackend

    cpu = CpuBackend(group, name, 2)
    backends.append(cpu)
    return [np.asarray(cpu.load_batch(layouts, plan)) for plan in plans]


def data_gets(s3, var: str) -> list[tuple[str, str | None]]:
    return [
        (r.path, r.range)
        for r in s3.requests()
        if r.method == "GET" and f"/{var}/c/" in r.path and r.status < 300
    ]


# -- bit for bit --------------------------------------------------------------------
@pytest.mark.parametrize(
    "variables",
    [["sharded"], ["plain"], ["levels"], ["lz4", "blosc"], ["holes", "plain", "sharded"]],
)
def test_gpu_batches_equal_the_cpu_backend(s3, device, backends, variables):
    group, name = open_group(URL, storage_options=s3.storage_options())
    layouts = load_layouts(group, name, variables)
    assert all(layout.fast_path for layout in layouts)
    plans = _plans(layouts)
    want = _cpu_batches(group, name, layouts, plans, backends)
    gpu = _gpu(group, name, backends)
    assert gpu.remote and isinstance(gpu.source, ObstoreSource) and gpu.read_mode == "pinned"
    for epoch in range(2):  # the second epoch: shard indexes cached, same bytes
        for plan, expected in zip(plans, want, strict=True):
            got = _load(gpu, layouts, plan)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert got.tobytes() == expected.tobytes(), f"epoch {epoch}"
    assert gpu.stats()["requests"] > 0


# -- requests -----------------------------------------------------------------------
def _expected_reads(local_store: Path, layouts_local, plans, max_gap: int) -> Counter:
    locator = ChunkLocator("local", layouts_local)
    want = Counter()
    for plan in plans:
        loc = locator.locate(plan)
        present = np.flatnonzero(loc.present)
        reads = coalesce_arrays(
            loc.file[present], loc.offset[present], loc.nbytes[present], max_gap
        )
        for f, start, end in zip(reads.file, reads.start, reads.end, strict=True):
            key = os.path.relpath(loc.paths[f], local_store).replace(os.sep, "/")
            want[(f"/{BUCKET}/{PREFIX}/{key}", f"bytes={start}-{end - 1}")] += 1
    return want


def test_gets_are_the_coalesced_ranges_and_one_copy_per_batch(s3, device, backends, local_store):
    variables = ["sharded", "levels"]
    group, name = open_group(URL, storage_options=s3.storage_options())
    layouts = load_layouts(group, name, variables)
    plans = _plans(layouts)
    gpu = _gpu(group, name, backends)
    assert gpu.max_gap == gpu.source.max_gap, "a staged read is one request"
    gpu.probe(layouts)  # the first shard's index of each variable, before any batch
    s3.configure(clear_log=True)
    for plan in plans:
        _load(gpu, layouts, plan)
    got, index_gets = Counter(), Counter()
    for var in variables:
        for path, rng in data_gets(s3, var):
            assert rng is not None, f"whole-shard GET of {path}"
            if rng.startswith("bytes=-"):
                index_gets[path] += 1
            else:
                got[(path, rng)] += 1
    local, local_name = open_group(local_store)
    layouts_local = load_layouts(local, local_name, variables)
    want = _expected_reads(local_store, layouts_local, _plans(layouts_local), gpu.max_gap)
    assert got == want
    assert set(index_gets.values()) == {1}, "each shard index is fetched once"
    counts = gpu.transfers.snapshot()
    assert counts["file_reads"] == sum(want.values())
    assert counts["host_to_device"] == len(plans), "one staging copy per batch"


# -- errors -------------------------------------------------------------------------
def test_refused_access_names_the_store(s3, device, backends):
    group, name = open_group(URL, storage_options=s3.storage_options())
    layouts = load_layouts(group, name, ["sharded"])
    plans = _plans(layouts)
    gpu = _gpu(group, name, backends)
    _load(gpu, layouts, plans[0])
    s3.configure(keys=["someone-else"])
    with pytest.raises(StoreAccessError, match="refused") as info:
        _load(gpu, layouts, plans[1])
    assert URL in str(info.value)
    s3.configure(keys=["zarrdali-test-key"])  # the backend reads again afterwards
    _load(gpu, layouts, plans[1])


def test_missing_object_names_array_and_key(s3, device, backends, tmp_path):
    """A shard deleted after its index was read: the ranged GET fails with a
    ChunkError naming the array and the shard's key."""
    path = write_store(tmp_path / "gone.zarr", SPECS[:1])
    upload(s3.endpoint, BUCKET, path, "tests/gone.zarr")
    url = f"s3://{BUCKET}/tests/gone.zarr"
    group, name = open_group(url, storage_options=s3.storage_options())
    layouts = load_layouts(group, name, ["sharded"])
    gpu = _gpu(group, name, backends)
    plan = plan_batch(layouts, SAMPLES[:1], n_frames=3, frame_step=2, tile_hw=(8, 8))
    gpu.locator(layouts).locate(plan)  # the shard's index is cached
    import obstore

    obstore.delete(group.store.store, "sharded/c/0/0/0")
    with pytest.raises(ChunkError, match="not found") as info:
        _load(gpu, layouts, plan)
    assert info.value.array == "sharded" and info.value.key == "c/0/0/0"
    assert url in str(info.value)


# -- the loader ---------------------------------------------------------------------
def test_loader_hands_the_source_to_the_gpu_backend(s3, device, local_store):
    import zarr

    import zarrdali

    loader = zarrdali.ZarrLoader(
        URL,
        ["sharded", "plain"],
        input_steps=2,
        target_steps=1,
        tile=(8, 8),
        batch_size=3,
        device="cuda",
        workers=0,
        storage_options=s3.storage_options(),
    )
    try:
        assert isinstance(loader.backend.source, ObstoreSource)
        assert all(layout.fast_path for layout in loader.layouts), "not through zarr-python"
        samples = SAMPLES[:3]
        got = loader.load_batch(samples)
        got = got.get() if hasattr(got, "get") else np.asarray(got)
        local = zarr.open_group(str(local_store), mode="r")
        for i, (t0, y0, x0) in enumerate(samples.tolist()):
            for c, var in enumerate(["sharded", "plain"]):
                want = local[var][t0 : t0 + 3, y0 : y0 + 8, x0 : x0 + 8]
                np.testing.assert_array_equal(got[i, :, c], want)
    finally:
        loader.close()


def test_wrong_credentials_before_training_on_the_gpu_path(s3, device):
    import zarrdali

    with pytest.raises(StoreAccessError, match="refused"):
        zarrdali.ZarrLoader(
            URL,
            ["sharded"],
            tile=(8, 8),
            device="cuda",
            workers=0,
            storage_options=s3.storage_options(key="wrong-key"),
        )


# -- kvikIO's remote file -----------------------------------------------------------
class FakeRemoteFile:
    """``kvikio.remote_file.RemoteFile`` serving ``s3://BUCKET/PREFIX/<key>`` from
    the local copy of the store (the 26.x classmethods; ``pread`` returns a future)."""

    root: Path
    opened: ClassVar[list[str]] = []

    def __init__(self, path: Path) -> None:
        self._path = path

    @classmethod
    def open_s3_url(cls, url: str, nbytes: int | None = None) -> FakeRemoteFile:
        cls.opened.append(url)
        return cls(cls.root / url.removeprefix(f"s3://{BUCKET}/{PREFIX}/"))

    def pread(self, buf, size: int, file_offset: int = 0):
        with open(self._path, "rb") as fh:
            fh.seek(file_offset)
            data = np.frombuffer(fh.read(size), dtype=np.uint8)
        np.asarray(buf)[: len(data)] = data
        return fakegpu._Ready(len(data))


def _install_remote_file(monkeypatch, local_store: Path) -> None:
    import sys
    import types

    module = types.ModuleType("kvikio.remote_file")
    FakeRemoteFile.root, FakeRemoteFile.opened = local_store, []
    module.RemoteFile = FakeRemoteFile
    module.is_remote_file_available = lambda: True
    monkeypatch.setitem(sys.modules, "kvikio.remote_file", module)


@pytest.mark.parametrize("variables", [["sharded", "levels"], ["plain", "sharded", "blosc"]])
def test_kvikio_remote_file_reads_into_device_staging(
    s3, backends, local_store, monkeypatch, variables
):
    """``read="kvikio"`` on an s3:// store: the ranges go through kvikIO's remote
    file (here a fake on the local copy), batches equal the CPU backend's, and no
    data range is fetched through the byte source; unsharded chunks are fetched
    whole through the source (their sizes are unknown until read)."""
    fakegpu.install(monkeypatch)
    _install_remote_file(monkeypatch, local_store)
    group, name = open_group(URL, storage_options=s3.storage_options())
    layouts = load_layouts(group, name, variables)
    plans = _plans(layouts)
    want = _cpu_batches(group, name, layouts, plans, backends)
    gpu = _gpu(group, name, backends, read="kvikio")
    assert gpu.read_mode == "kvikio"
    gpu.probe(layouts)
    s3.configure(clear_log=True)
    for plan, expected in zip(plans, want, strict=True):
        assert _load(gpu, layouts, plan).tobytes() == expected.tobytes()
    assert FakeRemoteFile.opened and all(u.startswith(URL + "/") for u in FakeRemoteFile.opened)
    for var in ("sharded", "levels"):
        assert not [g for g in data_gets(s3, var) if not g[1].startswith("bytes=-")]
    counts = gpu.transfers.snapshot()
    assert counts["file_reads"] > 0


def test_kvikio_remote_file_needs_a_url(s3, backends, local_store, monkeypatch):
    import zarr

    fakegpu.install(monkeypatch)
    _install_remote_file(monkeypatch, local_store)
    group, _ = open_group(URL, storage_options=s3.storage_options())
    other = zarr.open_group(group.store, mode="r")  # a zarr Store object: no URL
    with pytest.raises(ValueError, match="s3:// or http"):
        _gpu(other, "a store object", backends, read="kvikio")
    assert _gpu(other, "a store object", backends).read_mode == "pinned"


# -- the benchmark's GPU rows ---------------------------------------------------------
def test_remote_bench_gpu_rows(s3, tmp_path, monkeypatch):
    """``benchmarks/remote_bench.py``'s GPU rows: skipped with the reason without a
    GPU; on the CPU stand-in the pinned row runs and reports samples/s."""
    import argparse
    import importlib.util

    from zarrdali.sample_data import SHARDED, SampleDataSpec, write_sample_data

    bench_path = Path(__file__).parents[1] / "benchmarks" / "remote_bench.py"
    spec = importlib.util.spec_from_file_location("remote_bench", bench_path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.SPEC, "tile", (16, 16))
    data = tmp_path / "sample"
    write_sample_data(data, SampleDataSpec(n_time=30, n_lat=37, n_lon=72), progress=False)
    upload(s3.endpoint, BUCKET, data / SHARDED, f"bench/{SHARDED}")
    url, opts = f"s3://{BUCKET}/bench/{SHARDED}", s3.storage_options()
    args = argparse.Namespace(seed=0, warmup=1, batches=2, max_in_flight=8)
    from zarrdali.gpu import missing_gpu_requirements

    if missing_gpu_requirements():
        row = bench.gpu_run(url, opts, args, "pinned")
        assert row["status"] == "skipped" and "no GPU path here" in row["reason"]
    fakegpu.install(monkeypatch)
    row = bench.gpu_run(url, opts, args, "pinned")
    assert row["status"] == "ok" and row["samples_per_s"] > 0 and row["read"] == "pinned"
    assert row["source"]["requests"] > 0
    table = bench.markdown(
        [
            {
                "delay_ms": 5.0,
                "zarrdali": {
                    "samples_per_s": {"median": 1.0, "min": 1.0, "max": 1.0},
                    "peak_in_flight": 1,
                    "network_mb_per_s": 1.0,
                },
                "zarrdali_gpu": {"pinned": row, "kvikio": {"status": "skipped", "reason": "x"}},
                "zarr_python_fallback": {"samples_per_s": 1.0},
                "xarray_sample_by_sample": {"samples_per_s": 1.0},
                "plain_range_get_client": {"mb_per_s": 1.0, "requests_per_s": 1.0},
                "ratios": {},
            }
        ]
    )
    assert "read=pinned" in table and "read=kvikio (load_batch) | skipped: x" in table
