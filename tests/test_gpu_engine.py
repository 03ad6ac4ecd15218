"""The GPU engine end to end: ``GpuBackend.load_batch`` against the CPU backend.

Every test runs twice: on ``fake`` (the CPU stand-ins of ``fakegpu``: "device"
arrays are numpy arrays at real host addresses, nvCOMP's batched C API is
emulated on those addresses with numcodecs, the kernels run as their numpy
twins) and on ``cuda`` (``@pytest.mark.gpu``: CuPy, kvikIO and nvCOMP on a real
GPU; skipped without one). On ``fake`` they check the backend's own
orchestration on this machine: the read modes, the C API's pointer, size and
status plumbing, the cache across epochs, the stream/out contract and the
lifetimes of in-flight buffers. On ``cuda`` the same assertions check the
device path itself.

Checked: batches equal the CPU backend's bit for bit for zstd, LZ4, gzip,
uncompressed and Blosc stores, plain and sharded, with missing chunks, for
every dtype the gather loads (and big-endian); a corrupted zstd frame raises
:class:`ChunkError` naming array and key; ``cache="gpu"`` serves identical
batches across epochs, reads no file bytes once warm, and stays within its
budget; ``load_batch(stream=...)`` does not synchronize the stream and gathers
into ``out``.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fakegpu
from storefactory import VarSpec, chunk_files, chunk_key, shard_index
from zarrdali.batch.plan import plan_batch
from zarrdali.errors import BackendUnavailableError, ChunkError, LoaderClosedError
from zarrdali.store.open import load_layouts, open_group

NT, NY, NX = 12, 21, 33
SAMPLES = np.array(
    [[0, 0, 0], [3, 13, 25], [5, 7, 5], [6, 13, 0], [1, 0, 25], [7, 5, 17]], dtype=np.int64
)


def _spec(name: str, **kw) -> VarSpec:
    kw.setdefault("shape", (NT, NY, NX))
    kw.setdefault("chunks", (2, 8, 8))
    return VarSpec(name, **kw)


def _plan(store, names, samples=SAMPLES):
    group, name = open_group(store)
    layouts = load_layouts(group, name, names)
    plan = plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    return group, name, layouts, plan


def _cpu_batch(group, name, layouts, plan) -> np.ndarray:
    from zarrdali.cpu.backend import CpuBackend

    backend = CpuBackend(group, name, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return backend.load_batch(layouts, plan)
    finally:
        backend.close()


def _assert_bitwise(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@dataclass
class Engine:
    kind: str  # "fake" or "cuda"
    cp: Any
    cuda: fakegpu.FakeCuda | None
    backends: list

    def backend(self, group, name, **kw):
        from zarrdali.gpu import GpuBackend

        kw.setdefault("num_threads", 2)
        backend = GpuBackend(group, name, **kw)
        self.backends.append(backend)
        return backend

    def load(self, backend, layouts, plan, **kw) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = backend.load_batch(layouts, plan, **kw)
        if "stream" in kw:
            kw["stream"].synchronize()
        return got.get()


@pytest.fixture(params=["fake", pytest.param("cuda", marks=pytest.mark.gpu)])
def engine(request, monkeypatch):
    if request.param == "fake":
        cuda = fakegpu.install(monkeypatch)
        eng = Engine("fake", cuda.cupy, cuda, [])
        yield eng
        for backend in eng.backends:
            backend.close()
        assert cuda.fault is None, cuda.fault
        return
    import cupy

    eng = Engine("cuda", cupy, None, [])
    # On a device, the collector also runs at random points in a thread of its own.
    with fakegpu.BackgroundCollector(seed=zlib.crc32(request.node.nodeid.encode())):
        yield eng
        for backend in eng.backends:
            backend.close()


READS = ["pinned", "kvikio"]


# -- bit for bit ------------------------------------------------------------------------
@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
@pytest.mark.parametrize("compressor", ["zstd", "lz4", "gzip", "none", "blosc"])
def test_engine_matches_cpu(engine, make_store, compressor, sharded, read):
    shards = (4, 16, 16) if sharded else None
    kw = dict(compressor=compressor, shards=shards)
    store = make_store(_spec("a", **kw), _spec("b", dtype="int16", seed=3, fill_value=7, **kw))
    files = chunk_files(store, "b")
    for f in files[1:3]:  # missing chunks (or shards): the fill value
        f.unlink()
    group, name, layouts, plan = _plan(store, ["a", "b"])
    want = _cpu_batch(group, name, layouts, plan)
    backend = engine.backend(group, name, read=read)
    assert backend.decode_mode == "capi" and backend.read_mode == read
    _assert_bitwise(engine.load(backend, layouts, plan), want)
    counts = backend.transfers.snapshot()
    host_decoded = compressor == "blosc"
    staged = read == "pinned" and not host_decoded  # Blosc: nothing staged on the device
    assert counts["host_to_device"] == int(staged) + int(host_decoded), counts
    assert counts["device_to_host"] == 0
    assert (counts["file_reads"] > 0) != host_decoded  # the host path reads with its own preads
    if engine.cuda is not None and compressor in ("zstd", "lz4", "gzip"):
        algorithm = {"zstd": "Zstd", "lz4": "LZ4", "gzip": "Gzip"}[compressor]
        assert [c[:1] for c in engine.cuda.api.calls] == [(algorithm,)]  # one call per batch


DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64"]


@pytest.mark.parametrize("compressor", ["zstd", "lz4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_dtypes(engine, make_store, compressor, dtype):
    store = make_store(
        _spec("x", dtype=dtype, compressor=compressor, fill_value=3),
        _spec("be", dtype=dtype, compressor=compressor, endian="big", seed=5),
    )
    (chunk_files(store, "x")[2]).unlink()
    group, name, layouts, plan = _plan(store, ["x", "be"])
    backend = engine.backend(group, name)
    _assert_bitwise(engine.load(backend, layouts, plan), _cpu_batch(group, name, layouts, plan))


def test_engine_mixed_codecs_and_fallbacks(engine, make_store):
    specs = [
        _spec("z", compressor="zstd", checksum=True),
        _spec("l", compressor="lz4", shards=(4, 16, 16), checksum=True),  # packed payloads
        _spec("g", compressor="gzip", dtype="float64", fill_value=np.nan),
        _spec("bl", compressor="blosc", shape=(NT, 2, NY, NX), chunks=(2, 1, 8, 8)),
        _spec("tr", unsupported="transpose"),  # zarr-python's
    ]
    store = make_store(*specs)
    group, name, layouts, plan = _plan(store, [s.name for s in specs])
    backend = engine.backend(group, name)
    _assert_bitwise(engine.load(backend, layouts, plan), _cpu_batch(group, name, layouts, plan))
    if engine.cuda is not None:
        assert sorted(c[0] for c in engine.cuda.api.calls) == ["Gzip", "LZ4", "Zstd"]


@pytest.mark.parametrize("read", READS)
def test_decode_in_calls_under_a_temp_budget(engine, make_store, read):
    """nvCOMP's zstd temp is about 3x the decoded bytes: with a stream's share
    of the budget a quarter of one call's need, a batch's zstd group is decoded
    in several calls into the stream's temp buffer, the batch unchanged
    (sharded: payloads decoded unpacked)."""
    store = make_store(
        _spec("z", shards=(4, 16, 16)), _spec("y", seed=4), _spec("l", compressor="lz4", seed=5)
    )
    group, name, layouts, plan = _plan(store, ["z", "y", "l"])
    want = _cpu_batch(group, name, layouts, plan)
    from zarrdali.gpu.decode import nvcomp_capi

    api = engine.cuda.api if engine.cuda is not None else nvcomp_capi()
    size = layouts[0].chunk_nbytes
    n = int(np.sum(plan.chunk_var <= 1))
    from zarrdali.gpu.backend import DECODE_STREAMS

    budget = api.temp_bytes("Zstd", n, size, n * size) // 4
    backend = engine.backend(group, name, read=read, decode_temp_budget=budget * DECODE_STREAMS)
    assert backend.decode_temp_share == budget
    for _ in range(2):
        _assert_bitwise(engine.load(backend, layouts, plan), want)
    (state,) = backend._states
    assert 0 < state.temp.nbytes <= budget
    if engine.cuda is not None:
        calls = [c for c in engine.cuda.api.calls if c[0] == "Zstd"]
        assert len(calls) >= 2 * 4 and sum(c[1] for c in calls) == 2 * n


# -- bad chunks -------------------------------------------------------------------------
def break_zstd_magic(store, array: str, key: str, sharded: bool) -> None:
    """Overwrite the zstd frame magic of a chunk object (of a shard's first
    stored inner chunk), the rest of the frame intact: the one corruption
    nvCOMP rejects with a status. Its header makes any other corrupt input
    undefined behaviour (``zstd.h``: "Providing a corrupt buffer for
    decompression will result in undefined behavior"), and a device fault is
    sticky: every later test of the process would fail."""
    path = Path(store) / array / key
    raw = bytearray(path.read_bytes())
    start = 0
    if sharded:
        index = shard_index(store, array, key)
        start = int(min(off for off, n in index.tolist() if n and off != 2**64 - 1))
    assert bytes(raw[start : start + 4]) == fakegpu.ZSTD_MAGIC
    raw[start : start + 4] = b"\x00\x01\x02\x03"
    path.write_bytes(bytes(raw))


@pytest.mark.corrupt_input
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_corrupted_zstd_frame_raises_chunk_error(engine, make_store, sharded):
    shards = (4, 16, 16) if sharded else None
    store = make_store(_spec("ok", shards=shards), _spec("bad", shards=shards, seed=2))
    path = chunk_files(store, "bad")[0]
    key = chunk_key(store, "bad", path)
    break_zstd_magic(store, "bad", key, sharded)
    group, name, layouts, plan = _plan(store, ["ok", "bad"])
    backend = engine.backend(group, name)
    with pytest.raises(ChunkError) as info:
        engine.load(backend, layouts, plan)
    assert info.value.array == "bad"
    assert info.value.key.startswith(key)
    if engine.kind == "fake":
        assert "nvcompErrorCannotDecompress" in str(info.value)
    # The backend is still usable: a batch without the bad chunk loads.
    good = _plan(store, ["ok"])
    got = engine.load(backend, good[2], good[3])
    _assert_bitwise(got, _cpu_batch(*good))


def flip_a_payload_byte(store, array: str, key: str, sharded: bool) -> bytes:
    """Flip one byte in the middle of a stored chunk (a shard's first stored inner
    chunk), before its crc32c: the chunk's stored bytes, as they were."""
    path = Path(store) / array / key
    raw = bytearray(path.read_bytes())
    start, end = 0, len(raw)
    if sharded:
        index = shard_index(store, array, key)
        start, n = min((int(o), int(n)) for o, n in index.tolist() if n and o != 2**64 - 1)
        end = start + n
    original = bytes(raw[start:end])
    raw[start + (end - start - 4) // 2] ^= 0x5A
    path.write_bytes(bytes(raw))
    return original


@pytest.mark.corrupt_input
@pytest.mark.parametrize("cache", [None, "gpu"])
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
@pytest.mark.parametrize("compressor", ["zstd", "lz4", "gzip", "none"])
def test_a_chunk_failing_its_crc32c_is_reported_and_never_decoded(
    engine, make_store, compressor, sharded, cache
):
    """A byte flipped inside a chunk that carries a crc32c: the CPU path reports
    a checksum mismatch for it; so does the GPU path, checked on the device
    (nvCOMP's batched CRC32-C), in the same bad-chunk report, and the chunk's
    bytes never reach nvCOMP's decoder (undefined behaviour: on the stand-in a
    sticky device fault). The backend goes on; with the GPU cache the chunk is
    not kept (the same batch fails again, read again)."""
    shards = (4, 16, 16) if sharded else None
    kw = dict(compressor=compressor, shards=shards, checksum=True)
    store = make_store(_spec("ok", **kw), _spec("bad", seed=2, **kw))
    path = chunk_files(store, "bad")[0]
    key = chunk_key(store, "bad", path)
    stored = bytearray(flip_a_payload_byte(store, "bad", key, sharded))
    stored[(len(stored) - 4) // 2] ^= 0x5A  # as it is now
    payload = bytes(stored[4 if compressor == "lz4" else 0 : -4])  # what a decoder would read
    group, name, layouts, plan = _plan(store, ["ok", "bad"])
    with pytest.raises(ChunkError, match="crc32c checksum mismatch") as cpu:
        _cpu_batch(group, name, layouts, plan)
    if engine.cuda is not None:
        engine.cuda.api.inputs = []
    backend = engine.backend(group, name, cache=cache)
    for _ in range(2 if cache else 1):
        with pytest.raises(ChunkError) as info:
            engine.load(backend, layouts, plan)
        err = info.value
        assert "crc32c checksum mismatch" in str(err) and "checked on the GPU" in str(err)
        assert (err.array, err.key) == (cpu.value.array, cpu.value.key)
        assert err.key.startswith(key)
    if engine.cuda is not None:
        assert engine.cuda.fault is None
        assert engine.cuda.api.crc_calls, "no crc32c computed on the device"
        inputs = engine.cuda.api.inputs
        assert payload not in inputs
        if compressor != "none":
            from zarrdali.gpu.decode import STAND_INS

            algorithm = {"zstd": "Zstd", "lz4": "LZ4", "gzip": "Gzip"}[compressor]
            assert STAND_INS[algorithm] in inputs  # what the decoder got instead
    # The backend is still usable: a batch without the bad chunk loads.
    good = _plan(store, ["ok"])
    _assert_bitwise(engine.load(backend, good[2], good[3]), _cpu_batch(*good))


# -- the GPU chunk cache ----------------------------------------------------------------
def _epoch_plans(layouts, n_batches=4, seed=0):
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n_batches):
        samples = np.stack(
            [
                rng.integers(0, NT - 4, 5),
                rng.integers(0, NY - 8 + 1, 5),
                rng.integers(0, NX - 8 + 1, 5),
            ],
            axis=1,
        )
        plans.append(plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8)))
    return plans


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("budget_pages", [2, 64], ids=["small", "large"])
def test_cache_serves_identical_batches_across_epochs(engine, make_store, budget_pages, read):
    store = make_store(
        _spec("z", shards=(4, 16, 16)),
        _spec("l", compressor="lz4", dtype="int16", seed=4),
        _spec("n", compressor="none", seed=6),  # never cached: read every time
    )
    files = chunk_files(store, "l")
    files[3].unlink()  # a missing chunk: never cached either
    group, name, layouts, _ = _plan(store, ["z", "l", "n"])
    page = 1 << 16
    backend = engine.backend(
        group, name, read=read, cache="gpu", cache_budget=budget_pages * page, cache_page_size=page
    )
    plans = _epoch_plans(layouts)
    want = [_cpu_batch(group, name, layouts, p) for p in plans]
    reads_per_epoch = []
    for _epoch in range(3):
        before = backend.transfers.snapshot()["file_read_bytes"]
        for p, w in zip(plans, want, strict=True):
            _assert_bitwise(engine.load(backend, layouts, p), w)
            backend.cache.book.check()
        reads_per_epoch.append(backend.transfers.snapshot()["file_read_bytes"] - before)
    stats = backend.cache_stats()
    assert stats["capacity"] == budget_pages * page
    assert (
        stats["slot_bytes"] <= stats["capacity"] and stats["resident_bytes"] <= stats["slot_bytes"]
    )
    assert stats["hits"] > 0 and stats["hit_bytes"] > 0
    if budget_pages == 64:  # everything fits: the warm epochs read only the uncompressed array
        n_only = _uncompressed_read_bytes(backend, layouts, plans)
        assert reads_per_epoch[1] == reads_per_epoch[2] == n_only
        assert reads_per_epoch[0] > n_only
        assert stats["evictions"] == 0
    else:  # the cache churns, and the batches are still right
        assert stats["evictions"] > 0
        assert reads_per_epoch[1] > 0


def _uncompressed_read_bytes(backend, layouts, plans) -> int:
    """What a batch reads besides cacheable payloads: the uncompressed chunks."""
    from zarrdali.gpu.describe import plan_staging

    total = 0
    for p in plans:
        loc = backend.locator(layouts).locate(p)
        rows = np.flatnonzero(loc.present & (p.chunk_var == 2))
        n = loc.nbytes[rows]
        s = plan_staging(
            loc.file[rows], loc.offset[rows], n, n * 0, n, n < 0, max_gap=backend.max_gap
        )
        total += int(s.read_nbytes.sum())
    return total


def test_cache_off_by_default_and_validated(engine, make_store):
    store = make_store(_spec("z"))
    group, name = open_group(store)
    backend = engine.backend(group, name)
    assert backend.cache is None and backend.cache_stats() is None
    with pytest.raises(ValueError, match="cache"):
        engine.backend(group, name, cache="host")


@pytest.mark.corrupt_input
def test_crc32c_is_checked_before_nvcomps_python_api_decodes(engine, make_store, monkeypatch):
    """``decode="python"`` (nvCOMP's Python API): the crc32c of the staged chunks
    is computed by the C API's CRC32 and checked on the host before anything is
    decoded; a chunk that fails raises, and the Python API sees no chunk."""
    if engine.kind != "fake":
        pytest.skip("the stand-in shows what reaches the Python API")
    import sys
    import types

    monkeypatch.setitem(sys.modules, "nvidia.nvcomp", types.ModuleType("nvidia.nvcomp"))
    store = make_store(_spec("z", checksum=True), _spec("l", compressor="lz4", checksum=True))
    key = chunk_key(store, "l", chunk_files(store, "l")[0])
    flip_a_payload_byte(store, "l", key, sharded=False)
    group, name, layouts, plan = _plan(store, ["z", "l"])
    backend = engine.backend(group, name, decode="python")
    assert backend.decode_mode == "python"
    decoded = []
    monkeypatch.setattr(
        "zarrdali.gpu.decode.PythonApiDecoder.decode",
        lambda self, *args: decoded.append(args),
    )
    with pytest.raises(ChunkError, match="crc32c checksum mismatch") as info:
        engine.load(backend, layouts, plan)
    assert info.value.array == "l" and info.value.key.startswith(key)
    assert not decoded and engine.cuda.api.crc_calls


# -- host-to-device traffic ----------------------------------------------------------------
@pytest.mark.parametrize("finish", [False, True], ids=["raw", "finished"])
def test_a_batchs_tables_go_to_the_device_in_one_copy(engine, make_store, finish):
    """The decode table, crc32c jobs, copy jobs (uncompressed chunks, cache
    admissions), the four gather tables and the finishing kernel's two: one
    host-to-device copy per batch (each had its own upload), the batch as the
    CPU backend's."""
    from zarrdali.batch.finish import Finish

    store = make_store(
        _spec("z", checksum=True),
        _spec("l", compressor="lz4", shards=(4, 16, 16), seed=4),
        _spec("n", compressor="none", dtype="int16", seed=5),
    )
    group, name, layouts, plan = _plan(store, ["z", "l", "n"])
    want = _cpu_batch(group, name, layouts, plan)
    backend = engine.backend(group, name, cache="gpu")
    kw = {}
    if finish:
        channels = plan.out_shape[2]
        mean, std = np.full(channels, 0.5, np.float32), np.full(channels, 2.0, np.float32)
        kw["finish"] = Finish(mean, std)
        want = (want.astype(np.float32) - np.float32(0.5)) / np.float32(2.0)
    for epoch in range(2):  # the second from the GPU cache
        before = backend.transfers.snapshot()["control_to_device"]
        _assert_bitwise(engine.load(backend, layouts, plan, **kw), want)
        assert backend.transfers.snapshot()["control_to_device"] - before == 1, epoch


# -- the stream and out contract ---------------------------------------------------------
def test_load_batch_on_a_given_stream_into_out(engine, make_store):
    store = make_store(_spec("z", shards=(4, 16, 16)), _spec("l", compressor="lz4"))
    group, name, layouts, plan = _plan(store, ["z", "l"])
    want = _cpu_batch(group, name, layouts, plan)
    backend = engine.backend(group, name, read="pinned")
    cp = engine.cp
    stream = cp.cuda.Stream(non_blocking=True)
    out = cp.empty(plan.out_shape, dtype=want.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = backend.load_batch(layouts, plan, out=out, stream=stream)
    assert got is out
    if engine.kind == "fake":
        assert stream.synchronized == 0  # returned without synchronizing the stream
    stream.synchronize()
    _assert_bitwise(out.get(), want)
    with pytest.raises(ValueError, match="out must be"):
        backend.load_batch(layouts, plan, out=cp.empty((1, 2), dtype=want.dtype), stream=stream)


def test_buffers_in_flight_are_held_until_their_event(engine, make_store):
    if engine.kind != "fake":
        pytest.skip("event timing is only controllable on the fake device")
    cuda = engine.cuda
    store = make_store(_spec("z"))
    group, name, layouts, plan = _plan(store, ["z"])
    backend = engine.backend(group, name, batches_per_thread=3)
    stream = cuda.cupy.cuda.Stream(non_blocking=True)
    cuda.hold_events = True  # the stream "runs" until the test completes it
    for k in range(5):
        backend.load_batch(layouts, plan, stream=stream)
        state = backend._states[0]
        assert len(state.inflight) == min(k + 1, 3)  # bounded: the host waited for the oldest
    assert stream.synchronized == 0
    waits = cuda.host_waits
    cuda.complete_events()
    cuda.hold_events = False
    backend.load_batch(layouts, plan, stream=stream)
    assert len(state.inflight) == 1  # the completed ones were released
    assert cuda.host_waits >= waits


def test_close_releases_and_refuses(engine, make_store):
    store = make_store(_spec("z"))
    group, name, layouts, plan = _plan(store, ["z"])
    backend = engine.backend(group, name, cache="gpu", cache_budget=1 << 22)
    engine.load(backend, layouts, plan)
    backend.close()
    assert backend._states == [] and backend.cache.arena is None
    with pytest.raises(LoaderClosedError):
        backend.load_batch(layouts, plan)
    backend.close()  # idempotent


def test_memory_stats_report_a_peak(engine, make_store):
    store = make_store(_spec("z"))
    group, name, layouts, plan = _plan(store, ["z"])
    backend = engine.backend(group, name)
    engine.load(backend, layouts, plan)
    stats = backend.memory_stats()
    assert stats["peak_pool_bytes"] >= stats["pool_bytes"] >= 0


# -- decode modes -----------------------------------------------------------------------
def test_decode_capi_required_but_missing(engine, make_store, monkeypatch):
    if engine.kind != "fake":
        pytest.skip("the C API is present on a GPU host")
    from zarrdali.gpu import backend as gpu_backend
    from zarrdali.gpu.decode import CApiUnavailableError

    def missing():
        raise CApiUnavailableError("libnvcomp lacks nvcompBatchedZstdDecompressAsync")

    monkeypatch.setattr(gpu_backend, "nvcomp_capi", missing)
    store = make_store(_spec("z"))
    group, name = open_group(store)
    with pytest.raises(BackendUnavailableError, match="decode='python'"):
        engine.backend(group, name, decode="capi")
    with pytest.raises(ValueError, match="decode must be"):
        engine.backend(group, name, decode="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("compressor", ["zstd", "lz4", "gzip"])
def test_python_api_fallback_matches_cpu(make_store, compressor):
    from zarrdali.gpu import GpuBackend

    store = make_store(_spec("a", compressor=compressor, shards=(4, 16, 16)))
    group, name, layouts, plan = _plan(store, ["a"])
    backend = GpuBackend(group, name, decode="python")
    try:
        got = backend.load_batch(layouts, plan).get()
    finally:
        backend.close()
    _assert_bitwise(got, _cpu_batch(group, name, layouts, plan))


def test_make_backend_passes_gpu_options(engine, make_store):
    from zarrdali.errors import ConfigError
    from zarrdali.paths import make_backend

    store = make_store(_spec("z"))
    group, name = open_group(store)
    backend = make_backend("cuda", group, name, 2, cache="gpu", cache_budget=1 << 22, read=None)
    engine.backends.append(backend)
    assert backend.cache is not None and backend.cache.book.capacity == 1 << 22
    make_backend("cpu", group, name, 1, cache=None).close()  # None: the default, any device
    with pytest.raises(ConfigError, match="cache='gpu' is for device='cuda' only"):
        make_backend("cpu", group, name, 1, cache="gpu")


def test_loader_cache_option_needs_cuda(make_store):
    import zarrdali
    from zarrdali.errors import ConfigError

    store = make_store(_spec("z"))
    with pytest.raises(ConfigError, match="cache='gpu'"):
        zarrdali.ZarrLoader(store, ["z"], tile=(8, 8), device="cpu", cache="gpu")
