"""Remote stores against real servers on 127.0.0.1: moto's S3 server (with a
middleware that logs requests, delays them, answers 503 SlowDown / 429 and
refuses unknown access keys), ``http.server`` with range requests, and an
Icechunk repository on local storage. No client library is mocked.

The oracle is zarr-python reading the same URL (through fsspec/s3fs) at
``batch["index"]``; request counts are the server's own log.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

import zarrdali
from storefactory import VarSpec, chunk_files, chunk_key, delete_chunks, write_store
from zarrdali.batch.locate import ChunkLocator
from zarrdali.batch.plan import plan_batch
from zarrdali.io.ranges import coalesce_arrays
from zarrdali.io.sources import ObstoreSource, ZarrStoreSource
from zarrdali.store.open import load_layouts, open_group

pytest.importorskip("obstore")
pytest.importorskip("moto")
from zarrdali.bench.objectserver import RangeHTTPServer, S3Server, upload

NT, NY, NX = 12, 21, 33
SPECS = [
    VarSpec("sharded", shape=(NT, NY, NX), chunks=(1, 8, 8), shards=(4, 16, 16), seed=1),
    VarSpec("plain", shape=(NT, NY, NX), chunks=(2, 8, 8), seed=2),
    VarSpec("levels", shape=(NT, 2, NY, NX), chunks=(1, 1, 8, 8), shards=(2, 2, 16, 16), seed=3),
]
BUCKET, PREFIX = "zarrdali", "tests/store.zarr"
URL = f"s3://{BUCKET}/{PREFIX}"
KW = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=4, device="cpu", workers=0)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("remote") / "store.zarr", SPECS)


@pytest.fixture(scope="module")
def server(local_store):
    with S3Server() as s3:
        upload(s3.endpoint, BUCKET, local_store, PREFIX)
        yield s3


@pytest.fixture
def s3(server):
    """The module's server, reset: no delay, no failures, log cleared."""
    server.configure(delay_s=0, fail={}, keys=["zarrdali-test-key"], clear_log=True)
    return server


def oracle_group(s3) -> zarr.Group:
    """zarr-python reading the same URL, through fsspec (s3fs)."""
    pytest.importorskip("s3fs")
    return zarr.open_group(URL, mode="r", storage_options=s3.storage_options())


def expected_window(arrays, variables, t0, y0, x0, steps, hw=(8, 8)) -> np.ndarray:
    parts = []
    for v in variables:
        a = np.asarray(arrays[v][t0 : t0 + steps, ..., y0 : y0 + hw[0], x0 : x0 + hw[1]])
        parts.append(a if a.ndim == 4 else a[:, None])
    return np.concatenate(parts, axis=1).astype(np.float32)


def check_epoch(loader, group, variables) -> int:
    """Every batch equals zarr-python at its index; each sample served once. Returns batches.

    zarr-python reads each variable of ``group`` whole once; windows are cut from that.
    """
    arrays = {v: group[v][...] for v in variables}
    seen = Counter()
    n = 0
    for batch in loader:
        n += 1
        index = batch["index"].numpy()
        frames = np.concatenate([batch["input"].numpy(), batch["target"].numpy()], axis=1)
        for i, (t0, y0, x0) in enumerate(index.tolist()):
            want = expected_window(arrays, variables, t0, y0, x0, 3)
            np.testing.assert_array_equal(frames[i], want, err_msg=f"sample {(t0, y0, x0)}")
            seen[(t0, y0, x0)] += 1
    assert n == len(loader)
    assert set(seen.values()) == {1}, "a sample was served twice"
    assert len(seen) == len(loader.candidates)
    return n


def data_gets(s3, var: str) -> list[tuple[str, str | None]]:
    """(key, Range) of the GETs of chunk objects of ``var`` that the server answered."""
    return [
        (r.path, r.range)
        for r in s3.requests()
        if r.method == "GET" and f"/{var}/c/" in r.path and r.status < 300
    ]


# -- correctness -------------------------------------------------------------------


@pytest.mark.parametrize("variables", [["sharded"], ["plain"], ["sharded", "plain", "levels"]])
def test_batches_equal_zarr_python_reading_the_url(s3, variables):
    loader = zarrdali.ZarrLoader(
        URL, variables, shuffle=True, storage_options=s3.storage_options(), **KW
    )
    assert isinstance(loader.backend.source, ObstoreSource)
    assert all(layout.fast_path for layout in loader.layouts)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*read through zarr-python.*")
        check_epoch(loader, oracle_group(s3), variables)
    stats = loader.backend.stats()
    assert stats["requests"] > 0 and stats["bytes"] > 0 and stats["peak_in_flight"] >= 1


def test_fsspec_when_obstore_is_missing(s3, local_store, monkeypatch):
    """Without obstore, a URL is opened with fsspec (s3fs) and read through its async
    range requests."""
    pytest.importorskip("s3fs")
    monkeypatch.setattr("zarrdali.io.remote.obstore_available", lambda: False)
    loader = zarrdali.ZarrLoader(URL, ["sharded"], storage_options=s3.storage_options(), **KW)
    assert isinstance(loader.backend.source, ZarrStoreSource)
    assert type(loader.group.store.inner).__name__ == "FsspecStore"
    check_epoch(loader, zarr.open_group(str(local_store), mode="r"), ["sharded"])
    assert all(rng for _, rng in data_gets(s3, "sharded")), "no whole-shard GET"


# -- requests --------------------------------------------------------------------


def expected_reads(local_store: Path, layouts_local, plans, max_gap: int):
    """Multiset of (key, Range header) of the coalesced reads, from the local copy."""
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


def test_get_requests_are_the_coalesced_ranges(s3, local_store):
    """One GET per coalesced range (no whole-shard fetch), each shard index once."""
    loader = zarrdali.ZarrLoader(
        URL, ["sharded", "levels"], shuffle=True, storage_options=s3.storage_options(), **KW
    )
    # After the constructor: metadata, and the probe that fetched the index of the
    # first shard of each variable (cached, so not fetched again below).
    s3.configure(clear_log=True)
    group, name = open_group(local_store)
    layouts_local = load_layouts(group, name, ["sharded", "levels"])
    plans = []
    for k in range(len(loader)):
        samples = loader.epoch_plan().batch(k)
        loader.load_batch(samples)
        plans.append(plan_batch(layouts_local, samples, n_frames=3, frame_step=1, tile_hw=(8, 8)))
    got = Counter()
    index_gets = Counter()
    for var in ("sharded", "levels"):
        for path, rng in data_gets(s3, var):
            assert rng is not None, f"whole-shard GET of {path}"
            if rng.startswith("bytes=-"):
                index_gets[path] += 1
            else:
                got[(path, rng)] += 1
    max_gap = loader.backend.source.max_gap
    assert got == expected_reads(local_store, layouts_local, plans, max_gap)
    assert set(index_gets.values()) == {1}, "each shard index is fetched once"
    shards = chunk_files(local_store, "sharded") + chunk_files(local_store, "levels")
    assert len(index_gets) + 2 == len(shards), "every other shard's index, once"


def test_in_flight_requests_are_bounded(s3):
    s3.configure(delay_s=0.02)
    loader = zarrdali.ZarrLoader(
        URL, ["plain"], storage_options=s3.storage_options(), max_in_flight=3, **KW
    )
    s3.configure(clear_log=True)
    loader.load_batch(loader.epoch_plan().batch(0))
    assert 1 < s3.peak_in_flight() <= 3
    assert loader.backend.stats()["peak_in_flight"] <= 3


# -- retries and errors ------------------------------------------------------------


@pytest.mark.parametrize("status", ["503 Slow Down", "429 Too Many Requests"])
def test_throttling_is_retried_nothing_lost_nothing_duplicated(s3, local_store, status):
    local = zarr.open_group(str(local_store), mode="r")
    runs = []
    for fail in ({}, {"/sharded/c/": [4, status]}):  # the same epoch, then with failures
        loader = zarrdali.ZarrLoader(URL, ["sharded"], storage_options=s3.storage_options(), **KW)
        s3.configure(clear_log=True, fail=fail)
        check_epoch(loader, local, ["sharded"])
        runs.append(s3.requests())
    refused = [r for r in runs[1] if r.status == int(status.split()[0])]
    assert len(refused) == 4, "the server refused the first requests"
    assert not any(r.status >= 300 for r in runs[0])

    def answered(log) -> Counter:
        return Counter((r.path, r.range) for r in log if "/c/" in r.path and r.status < 300)

    # The same requests answered, as often as without failures: nothing lost or repeated.
    assert answered(runs[1]) == answered(runs[0])


def test_http_server_errors_retried_through_fsspec(tmp_path, local_store):
    """A plain HTTP server answering 503: fsspec does not retry, zarrdali does."""
    pytest.importorskip("aiohttp")
    with RangeHTTPServer(local_store.parent) as http:
        url = f"{http.url}/{local_store.name}"
        store = zarr.storage.FsspecStore.from_url(url, read_only=True)
        loader = zarrdali.ZarrLoader(store, ["sharded"], **KW)
        assert isinstance(loader.backend.source, ZarrStoreSource)
        http.fail["/sharded/c/"] = 3
        check_epoch(loader, zarr.open_group(str(local_store), mode="r"), ["sharded"])
        assert http.fail["/sharded/c/"] == 0
        assert loader.backend.stats()["retries"] == 3


def test_missing_store_is_named_before_training(s3):
    with pytest.raises(zarrdali.StoreNotFoundError, match=r"nothing-here\.zarr"):
        zarrdali.ZarrLoader(
            f"s3://{BUCKET}/nothing-here.zarr", ["a"], storage_options=s3.storage_options(), **KW
        )
    with pytest.raises(zarrdali.StoreNotFoundError, match="bucket does not exist"):
        zarrdali.ZarrLoader(
            "s3://no-such-bucket/x.zarr", ["a"], storage_options=s3.storage_options(), **KW
        )


def test_missing_variable_lists_the_arrays(s3):
    with pytest.raises(zarrdali.VariableNotFoundError, match=r"'nope'.*sharded"):
        zarrdali.ZarrLoader(URL, ["nope"], storage_options=s3.storage_options(), **KW)


def test_wrong_credentials_name_the_store_before_training(s3):
    bad = s3.storage_options(key="wrong-key")
    with pytest.raises(zarrdali.StoreAccessError, match="refused") as info:
        zarrdali.ZarrLoader(URL, ["sharded"], storage_options=bad, **KW)
    assert URL in str(info.value) and "credentials" in str(info.value)


def test_credentials_revoked_mid_training_name_the_store(s3):
    loader = zarrdali.ZarrLoader(URL, ["sharded"], storage_options=s3.storage_options(), **KW)
    s3.configure(keys=["someone-else"])
    with pytest.raises(zarrdali.StoreAccessError, match="refused") as info:
        loader.load_batch(loader.epoch_plan().batch(len(loader) - 1))
    assert URL in str(info.value)


def test_missing_chunks_read_as_fill_value(s3, tmp_path):
    """A chunk object (or a whole shard) never written is the fill value, as locally."""
    path = write_store(tmp_path / "holes.zarr", SPECS[:2])
    for var in ("sharded", "plain"):
        files = chunk_files(path, var)
        delete_chunks(path, var, [chunk_key(path, var, f) for f in files[:2]])
    upload(s3.endpoint, BUCKET, path, "tests/holes.zarr")
    url = f"s3://{BUCKET}/tests/holes.zarr"
    loader = zarrdali.ZarrLoader(
        url, ["sharded", "plain"], storage_options=s3.storage_options(), **KW
    )
    check_epoch(loader, zarr.open_group(str(path), mode="r"), ["sharded", "plain"])


# -- other kinds of stores -------------------------------------------------------


@pytest.mark.parametrize("client", ["obstore", "fsspec"])
def test_https_style_store_with_range_requests(local_store, client, monkeypatch):
    if client == "fsspec":
        pytest.importorskip("aiohttp")
        monkeypatch.setattr("zarrdali.io.remote.obstore_available", lambda: False)
    with RangeHTTPServer(local_store.parent) as http:
        url = f"{http.url}/{local_store.name}"
        loader = zarrdali.ZarrLoader(url, ["sharded", "plain"], **KW)
        check_epoch(loader, zarr.open_group(str(local_store), mode="r"), ["sharded", "plain"])
        shard_gets = [(p, r) for p, r in http.requests if "/sharded/c/" in p]
        assert shard_gets and all(r for _, r in shard_gets), "no whole-shard GET"


def test_icechunk_repository(tmp_path):
    icechunk = pytest.importorskip("icechunk")
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(tmp_path / "repo")))
    session = repo.writable_session("main")
    local = write_store(tmp_path / "src.zarr", SPECS[:2])
    source = zarr.open_group(str(local), mode="r")
    target = zarr.open_group(session.store, mode="w")
    for name in ("sharded", "plain"):
        arr = source[name]
        out = target.create_array(
            name,
            shape=arr.shape,
            dtype=arr.dtype,
            chunks=arr.chunks,
            shards=arr.shards,
            compressors=arr.compressors,
            fill_value=arr.fill_value,
            dimension_names=arr.metadata.dimension_names,
        )
        out[...] = arr[...]
    session.commit("sample")
    store = repo.readonly_session("main").store
    loader = zarrdali.ZarrLoader(store, ["sharded", "plain"], **KW)
    assert isinstance(loader.backend.source, ZarrStoreSource)
    assert all(layout.fast_path for layout in loader.layouts)
    check_epoch(loader, zarr.open_group(store, mode="r"), ["sharded", "plain"])
    # What a worker process gets: the pickled reader reopens the session's store.
    import pickle

    from zarrdali.cpu.reader import EpochReader

    reader = EpochReader(
        loader.store_ref,
        loader.variables,
        loader.spec,
        loader.candidates,
        loader.sampler,
        0,
        0,
        backend_type=type(loader.backend),
    )
    (inputs, targets), samples = pickle.loads(pickle.dumps(reader))(1)
    expected = loader._load_frames(samples)
    np.testing.assert_array_equal(inputs, expected[0])
    np.testing.assert_array_equal(targets, expected[1])


# -- read-through cache ------------------------------------------------------------


def test_cache_reads_the_network_once(s3, tmp_path, local_store):
    cache = tmp_path / "cache"
    local = zarr.open_group(str(local_store), mode="r")
    opts = dict(storage_options=s3.storage_options(), cache_dir=cache, **KW)
    first = zarrdali.ZarrLoader(URL, ["sharded", "plain"], shuffle=True, **opts)
    check_epoch(first, local, ["sharded", "plain"])
    assert data_gets(s3, "sharded") and data_gets(s3, "plain")
    s3.configure(clear_log=True)
    # A new loader (as another process or a later run would be) with another shuffle.
    again = zarrdali.ZarrLoader(URL, ["sharded", "plain"], shuffle=True, seed=7, **opts)
    check_epoch(again, local, ["sharded", "plain"])
    assert data_gets(s3, "sharded") == [] and data_gets(s3, "plain") == []
    assert again.backend.stats()["cache_hits"] > 0


def test_cache_stays_within_its_budget(s3, tmp_path, local_store):
    cache = tmp_path / "cache"
    budget = 20_000
    loader = zarrdali.ZarrLoader(
        URL,
        ["sharded", "plain"],
        storage_options=s3.storage_options(),
        cache_dir=cache,
        cache_bytes=budget,
        **KW,
    )
    check_epoch(loader, zarr.open_group(str(local_store), mode="r"), ["sharded", "plain"])
    stats = loader.backend.stats()
    assert stats["cache_bytes_written"] > budget and stats["cache_evicted"] > 0
    total = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert total <= budget + budget // 16 + 4096  # evicted past the budget as it goes


def _epoch_in_worker(url: str, options: dict, cache_dir: str) -> list[tuple]:
    loader = zarrdali.ZarrLoader(
        url, ["sharded", "plain"], storage_options=options, cache_dir=cache_dir, **KW
    )
    out = []
    for k in range(len(loader)):
        samples = loader.epoch_plan().batch(k)
        out.append((samples, loader.load_batch(samples)))
    return out


def test_cache_shared_by_processes(s3, tmp_path, local_store):
    """Two processes fill and read one cache directory at once: both get exact data."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    cache = str(tmp_path / "cache")
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        runs = list(pool.map(_epoch_in_worker, [URL] * 3, [s3.storage_options()] * 3, [cache] * 3))
    group = zarr.open_group(str(local_store), mode="r")
    arrays = {v: group[v][...] for v in ("sharded", "plain")}
    for run in runs:
        for samples, window in run:
            for i, (t0, y0, x0) in enumerate(samples.tolist()):
                want = expected_window(arrays, ["sharded", "plain"], t0, y0, x0, 3)
                np.testing.assert_array_equal(window[i].astype(np.float32), want)
    leftovers = [p for p in Path(cache).rglob(".tmp-*")]
    assert leftovers == []


# -- worker processes --------------------------------------------------------------


@pytest.mark.slow
def test_dali_worker_processes_reopen_the_url(s3):
    loader = zarrdali.ZarrLoader(
        URL, ["sharded"], storage_options=s3.storage_options(), **{**KW, "workers": 1}
    )
    assert loader.workers == 1
    check_epoch(loader, oracle_group(s3), ["sharded"])


# -- zarrdali prepare ----------------------------------------------------------------


def test_prepare_reads_and_writes_remote_stores(s3, tmp_path):
    import xarray as xr

    from zarrdali.prep.prepare import PROGRESS_FILE, prepare

    values = np.random.default_rng(0).standard_normal((6, 20, 24)).astype("float32")
    ds = xr.Dataset({"t2m": (("time", "y", "x"), values)})
    src = tmp_path / "src.zarr"
    ds.to_zarr(src, zarr_format=3, consolidated=False)
    upload(s3.endpoint, BUCKET, src, "prep/src.zarr")
    opts = s3.storage_options()
    src_url, dst_url = f"s3://{BUCKET}/prep/src.zarr", f"s3://{BUCKET}/prep/dst.zarr"

    assert prepare(src_url, dst_url, tile=(8, 8), storage_options=opts, progress=False) == dst_url
    keys = [r.path for r in s3.requests() if r.method == "PUT"]
    assert any("/prep/dst.zarr/t2m/c/" in k for k in keys), "shards written to the bucket"
    loader = zarrdali.ZarrLoader(dst_url, ["t2m"], storage_options=opts, **KW)
    assert loader.layouts[0].shard is not None and loader.layouts[0].fast_path
    check_epoch(loader, zarr.open_group(str(src), mode="r"), ["t2m"])
    gone = zarr.storage.ObjectStore(loader.backend.source.store)
    from zarr.core.sync import sync

    assert not sync(gone.exists(PROGRESS_FILE)), "the progress record is removed at the end"

    back = prepare(dst_url, tmp_path / "back.zarr", storage_options=opts, progress=False)
    np.testing.assert_array_equal(zarr.open_group(str(back), mode="r")["t2m"][...], values)


def test_a_few_inner_chunks_never_fetch_the_shard(s3, tmp_path):
    """One sample of a 2 MB shard of incompressible 16 KB inner chunks: its bytes only."""
    spec = VarSpec(
        "big", shape=(8, 256, 256), chunks=(1, 64, 64), shards=(8, 256, 256), compressor="none"
    )
    path = write_store(tmp_path / "big.zarr", [spec])
    upload(s3.endpoint, BUCKET, path, "tests/big.zarr")
    url = f"s3://{BUCKET}/tests/big.zarr"
    loader = zarrdali.ZarrLoader(
        url, ["big"], input_steps=2, tile=(64, 64), device="cpu", workers=0,
        storage_options=s3.storage_options(),
    )  # fmt: skip
    s3.configure(clear_log=True)
    window = loader.load_batch(np.array([[3, 64, 128]]))
    want = zarr.open_group(str(path), mode="r")["big"][3:5, 64:128, 128:192]
    np.testing.assert_array_equal(window[0, :, 0], want)
    shard = (path / "big" / "c" / "0" / "0" / "0").stat().st_size

    def fetched() -> int:
        gets = data_gets(s3, "big")
        assert gets and all(r and not r.startswith("bytes=-") for _, r in gets)
        return sum(int(r.split("-")[1]) - int(r[6:].split("-")[0]) + 1 for _, r in gets)

    # Two inner chunks (zarr-python lays a shard out in Morton order, so frames t and
    # t + 1 need not be neighbours): one request, their bytes and the gap between.
    assert 2 * 16384 <= fetched() <= 2 * 16384 + loader.backend.source.max_gap < shard
    one = zarrdali.ZarrLoader(
        url, ["big"], tile=(64, 64), device="cpu", workers=0, storage_options=s3.storage_options()
    )
    s3.configure(clear_log=True)
    one.load_batch(np.array([[5, 0, 64]]))
    assert fetched() == 16384, "one inner chunk: exactly its bytes"


# -- zarrdali bench ----------------------------------------------------------------


def test_bench_on_a_url_reports_requests(s3, tmp_path, capsys):
    import json

    from zarrdali.cli import main
    from zarrdali.sample_data import SHARDED, SampleDataSpec, write_sample_data

    data = tmp_path / "sample"
    write_sample_data(data, SampleDataSpec(n_time=30, n_lat=37, n_lon=72), progress=False)
    upload(s3.endpoint, BUCKET, data / SHARDED, f"bench/{SHARDED}")
    out = tmp_path / "bench"
    loaders = ["zarrdali-cpu", "torch-xarray", "numcodecs-ceiling"]
    args = ["bench", f"s3://{BUCKET}/bench/{SHARDED}", "--storage-options"]
    args += [json.dumps(s3.storage_options()), "--loaders", *loaders, "--threads", "1"]
    args += ["--tile", "16", "16", "--batches", "3", "--epochs", "1", "--warmup", "1"]
    args += ["--batch-size", "4", "--out", str(out), "-q"]
    assert main(args) == 0
    rows = {
        r["loader"]: r["summary"] for r in json.loads((out / "bench.json").read_text())["results"]
    }
    assert rows["zarrdali-cpu"]["status"] == "ok", rows["zarrdali-cpu"]["error"]
    assert rows["torch-xarray"]["status"] == "ok", rows["torch-xarray"]["error"]
    assert rows["numcodecs-ceiling"]["status"] == "skipped"
    note = rows["zarrdali-cpu"]["note"]
    requests = int(note.split(" requests")[0].rsplit(" ", 1)[-1])
    assert requests > 0 and " MB" in note and "in flight" in note
    assert "zarrdali[cpu]" in capsys.readouterr().out
