"""What the GPU engine holds over its life, and where, on the CPU stand-in of CuPy
(``fakegpu``: a memory pool that caches freed blocks per stream as CuPy 14's
does, per-thread current devices and streams, device checks on every call).

* Device memory: epochs reuse the backend's streams, so the pool's total
  (``total_bytes()``, cached blocks included) stays flat over epochs; ``close()``
  gives every cached block back; backends closed or dropped one after another
  do not pile up.
* No object owning GPU memory or a stream sits in a reference cycle: a closed
  and a dropped backend are freed by reference counting alone.
* nvCOMP's temp memory is one buffer per loading thread, each within its share
  of the budget: no loading thread's decode waits for another's; the batch's
  check is read where the batch is handed on, not by the loading threads.
* ``decode="auto"`` falls back to the Python API when libnvcomp does not load.
* Every thread working for a backend (prefetch threads, host pool, the
  caller's) works on the backend's device (``torchrun``: ``LOCAL_RANK``).
* The feed's wait for DALI's copy of a ring buffer comes after the batch's
  decode, just before the gather writes the buffer.
"""

from __future__ import annotations

import gc
import sys
import threading
import types
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest

import fakegpu
from storefactory import VarSpec, chunk_files
from zarrdali.batch.backend import batch_dtype
from zarrdali.batch.load import load_frames
from zarrdali.batch.plan import plan_batch
from zarrdali.errors import BackendUnavailableError
from zarrdali.sampling.epochs import SampleSpec
from zarrdali.store.open import load_layouts, open_group

NT, NY, NX = 12, 21, 33
SPEC = SampleSpec(input_steps=2, target_steps=1, frame_step=2, tile=(8, 8))
RNG = np.random.default_rng(5)
BATCHES = [
    np.stack(
        [RNG.integers(0, NT - 4, 5), RNG.integers(0, NY - 7, 5), RNG.integers(0, NX - 7, 5)],
        axis=1,
    )
    for _ in range(6)
]


def _specs():
    return [
        VarSpec("z", shape=(NT, NY, NX), chunks=(2, 8, 8), shards=(4, 16, 16)),
        VarSpec("l", shape=(NT, NY, NX), chunks=(2, 8, 8), compressor="lz4", dtype="int16", seed=3),
        VarSpec("b", shape=(NT, NY, NX), chunks=(2, 8, 8), compressor="blosc", seed=4),
    ]


@pytest.fixture
def store(make_store):
    store = make_store(*_specs())
    chunk_files(store, "l")[2].unlink()  # a missing chunk: the fill value
    return store


def _cpu_windows(group, name, layouts) -> list[np.ndarray]:
    from zarrdali.cpu.backend import CpuBackend

    backend = CpuBackend(group, name, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [backend.load_batch(layouts, _plan(layouts, b)) for b in BATCHES]
    finally:
        backend.close()


def _plan(layouts, samples):
    return plan_batch(layouts, samples, n_frames=SPEC.n_frames, frame_step=2, tile_hw=(8, 8))


def _backend(group, name, **kw):
    from zarrdali.gpu import GpuBackend

    kw.setdefault("num_threads", 2)
    return GpuBackend(group, name, **kw)


def _load_for(backend, layouts):
    """The loader's ``load(k, **device_args)``, through ``epoch_reader.load_frames``."""

    def load(k: int, **device_args):
        samples = BATCHES[k]
        frames = load_frames(backend, layouts, SPEC, (8, 8), samples, split=False, **device_args)
        return frames, samples

    return load


def run_epoch(backend, layouts, n: int | None = None, want=None) -> None:
    """One epoch through the backend's feed, as DALI drives it: ``get(k)`` in
    order, the batch read (DALI's copy) before the next ``get``."""
    n = len(BATCHES) if n is None else n
    feed = backend.batch_source(_load_for(backend, layouts), len(BATCHES), depth=2, batch_size=5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Blosc: decoded on the host, warned once
            for k in range(n):
                (window,), samples = feed.get(k)
                got = np.array(window)  # DALI's copy
                assert np.array_equal(samples, BATCHES[k])
                if want is not None:
                    assert got.tobytes() == want[k].tobytes(), f"batch {k}"
                del window
    finally:
        feed.close()


# -- device memory ---------------------------------------------------------------------
def test_pool_total_stays_flat_over_epochs_and_close_gives_it_back(store, monkeypatch):
    cuda = fakegpu.install(monkeypatch)
    pool = cuda.cupy.get_default_memory_pool()
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l", "b"])
    want = _cpu_windows(group, name, layouts)
    backend = _backend(group, name, cache="gpu", cache_budget=1 << 20, cache_page_size=1 << 16)
    totals, arenas = [], []
    for epoch in range(8):
        run_epoch(backend, layouts, n=len(BATCHES) if epoch % 3 else 3, want=want)
        totals.append(pool.total_bytes())
        arenas.append(pool.arenas())
    # Streams made once (the feed stream, one per prefetch thread, one per
    # thread state), so every epoch's blocks are cached under the same streams,
    # where the next epoch reuses them: no arena of a dead stream.
    made = len(cuda.streams_made)
    run_epoch(backend, layouts)
    assert len(cuda.streams_made) == made
    assert all(a <= arenas[0] | arenas[1] for a in arenas[2:]), [len(a) for a in arenas]
    # Flat but for what the threads' order of batches adds to the arenas.
    assert max(totals[3:]) <= 1.1 * totals[2], totals
    backend.close()
    assert pool.used_bytes() == 0 and pool.total_bytes() == 0
    assert cuda.pinned_frees == 1


@pytest.mark.parametrize("close", [True, False], ids=["closed", "dropped"])
def test_backends_one_after_another_do_not_pile_up(store, monkeypatch, close):
    """Each closed backend gives its blocks back; a dropped one leaves its blocks
    cached (no close: nothing frees the pool's cache) until the next close."""
    cuda = fakegpu.install(monkeypatch)
    pool = cuda.cupy.get_default_memory_pool()
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l", "b"])
    totals = []
    for i in range(6):
        backend = _backend(group, name)
        run_epoch(backend, layouts, n=2 + i % 3)
        if close or i % 2:
            backend.close()
        del backend
        totals.append(pool.total_bytes())
    if close:
        assert totals == [0] * 6
    else:  # each closed one freed the blocks the dropped one before it left cached
        assert totals[1::2] == [0, 0, 0] and min(totals[0::2]) > 0


# -- no GPU-owning object in a reference cycle -------------------------------------------
@pytest.mark.parametrize("read", ["pinned", "kvikio"])
@pytest.mark.parametrize("close", [True, False], ids=["closed", "dropped"])
def test_no_gpu_owning_object_in_a_reference_cycle(store, monkeypatch, close, read):
    cuda = fakegpu.install(monkeypatch)
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l", "b"])
    gc.collect()
    gc.disable()  # reference counting alone frees what is not in a cycle
    try:
        backend = _backend(
            group, name, read=read, cache="gpu", cache_budget=1 << 20, cache_page_size=1 << 16
        )
        run_epoch(backend, layouts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for samples in BATCHES[:3]:  # on this thread's own stream and state
                backend.load_batch(layouts, _plan(layouts, samples))
        states = list(backend._states)
        assert states and all(s.decoder is not None for s in states)
        refs = [weakref.ref(x) for x in (backend, backend.feed_streams, *states)]
        refs += [weakref.ref(s.stream) for s in states] + [weakref.ref(s.decoder) for s in states]
        del states
        if close:
            backend.close()
        del backend
        alive = [r() for r in refs if r() is not None]
        found = fakegpu.gpu_garbage()
    finally:
        gc.enable()
    assert found == []
    assert alive == [], [type(x).__name__ for x in alive]
    assert cuda.fault is None


# -- decodes that overlap ------------------------------------------------------------------
def _record_waits(monkeypatch) -> list[tuple[object, object]]:
    """Every ``stream.wait_event(event)``: (the waiting stream, the event's stream)."""
    waits: list[tuple[object, object]] = []
    wait = fakegpu.FakeStream.wait_event

    def recording(stream, event):
        waits.append((stream, event.stream))
        return wait(stream, event)

    monkeypatch.setattr(fakegpu.FakeStream, "wait_event", recording)
    return waits


def test_each_loading_thread_decodes_with_its_own_temp(store, monkeypatch):
    """Two loading threads, each with its own nvCOMP temp buffer within its
    share of the budget (a quarter of one call's need: the group is decoded in
    several calls): no loading stream waits for another's work, only for the
    feed stream (DALI's copy of the buffer it writes next). One shared temp
    made each thread's decode wait for the other's last one."""
    cuda = fakegpu.install(monkeypatch)
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l", "b"])
    want = _cpu_windows(group, name, layouts)
    api = cuda.api
    plan = _plan(layouts, BATCHES[0])
    size = layouts[0].chunk_nbytes
    zstd_chunks = int(np.sum(plan.chunk_var == 0))
    one_call = api.temp_bytes("Zstd", zstd_chunks, size, zstd_chunks * size)
    from zarrdali.gpu.backend import DECODE_STREAMS

    share = one_call // 4
    backend = _backend(group, name, decode_temp_budget=share * DECODE_STREAMS)
    assert backend.decode_temp_share == share
    waits = _record_waits(monkeypatch)
    feed = backend.batch_source(_load_for(backend, layouts), len(BATCHES), depth=2, batch_size=5)
    feed_stream = feed.stream
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k in range(len(BATCHES)):
                (window,), _ = feed.get(k)
                assert np.array(window).tobytes() == want[k].tobytes(), f"batch {k}"
                del window
    finally:
        feed.close()
    zstd = [c for c in api.calls if c[0] == "Zstd"]
    assert len(zstd) >= 4 * len(BATCHES)  # every batch's group split
    for _, n, _ in zstd:
        assert api.temp_bytes("Zstd", n, size, n * size) <= share
    states = backend._states
    assert len(states) >= 2
    temps = [s.temp for s in states]
    assert len({id(t) for t in temps}) == len(states)  # one per loading thread
    assert all(0 < t.nbytes <= share for t in temps)
    loading = [(a, b) for a, b in waits if feed_stream not in (a, b)]  # DALI's side: fine
    cross = [(a, b) for a, b in loading if b is not None and b is not a]
    assert not cross, f"{len(cross)} waits of a loading stream for another loading stream"
    backend.close()
    with pytest.raises(ValueError, match="decode_temp_budget"):
        _backend(group, name, decode_temp_budget=0)


def test_the_batch_check_is_read_where_the_batch_is_handed_on(store, monkeypatch):
    """The loading threads enqueue a batch and go on: the batch's check (crc32c
    and decode statuses) is waited for by the thread that hands the batch to
    DALI, batch by batch, never by a loading thread."""
    from zarrdali.gpu import decode as gpu_decode

    fakegpu.install(monkeypatch)
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l"])
    checked: list[str] = []
    raise_if_bad = gpu_decode.DecodeCheck.raise_if_bad

    def recording(check):
        checked.append(threading.current_thread().name)
        return raise_if_bad(check)

    monkeypatch.setattr(gpu_decode.DecodeCheck, "raise_if_bad", recording)
    backend = _backend(group, name)
    try:
        run_epoch(backend, layouts)
    finally:
        backend.close()
    assert checked == [threading.current_thread().name] * len(BATCHES)


@pytest.mark.corrupt_input
@pytest.mark.parametrize("damage", ["zstd-magic", "crc32c"])
def test_a_bad_chunk_raises_when_its_batch_is_handed_on(make_store, monkeypatch, damage):
    """A bad chunk in batch 1 only (a zstd frame with a broken magic number,
    which nvCOMP rejects; or a flipped byte its crc32c catches): ``get(0)``
    hands batch 0 over, ``get(1)`` raises the ChunkError naming the chunk, the
    feed closes cleanly; so does the next epoch's."""
    from storefactory import chunk_key
    from test_gpu_engine import break_zstd_magic, flip_a_payload_byte
    from zarrdali.errors import ChunkError

    crc = damage == "crc32c"
    store = make_store(VarSpec("z", shape=(NT, NY, NX), chunks=(2, 8, 8), checksum=crc))
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z"])
    plans = [_plan(layouts, b) for b in BATCHES[:2]]
    only_second = set(map(tuple, plans[1].chunk_coords.tolist())) - set(
        map(tuple, plans[0].chunk_coords.tolist())
    )
    t, _, y, x = sorted(only_second)[0]
    key = f"c/{t}/{y}/{x}"
    (break_zstd_magic if not crc else flip_a_payload_byte)(store, "z", key, sharded=False)
    cuda = fakegpu.install(monkeypatch)
    backend = _backend(group, name)
    try:
        for _ in range(2):  # two epochs
            feed = backend.batch_source(_load_for(backend, layouts), 2, depth=2, batch_size=5)
            try:
                (window,), _ = feed.get(0)
                del window
                with pytest.raises(ChunkError) as info:
                    feed.get(1)
                assert info.value.array == "z" and info.value.key.startswith(key)
                what = "crc32c checksum mismatch" if crc else "nvcompErrorCannotDecompress"
                assert what in str(info.value)
            finally:
                feed.close()
    finally:
        backend.close()
    assert cuda.fault is None
    assert chunk_key(store, "z", Path(store) / "z" / key) == key


@pytest.mark.corrupt_input
def test_a_batch_whose_deferred_check_fails_keeps_nothing_in_the_cache(make_store, monkeypatch):
    """A load inside ``deferring_checks`` returns without waiting for its check;
    the cache keeps the batch's payloads only once the check has passed: a
    chunk that failed its crc32c is read (and checked) again by the next batch,
    not served from the cache unchecked."""
    from test_gpu_engine import flip_a_payload_byte
    from zarrdali.errors import ChunkError
    from zarrdali.gpu.feed import deferring_checks

    store = make_store(VarSpec("z", shape=(NT, NY, NX), chunks=(2, 8, 8), checksum=True))
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z"])
    plan = _plan(layouts, BATCHES[0])
    t, _, y, x = plan.chunk_coords[0].tolist()
    flip_a_payload_byte(store, "z", f"c/{t}/{y}/{x}", sharded=False)
    cuda = fakegpu.install(monkeypatch)
    backend = _backend(group, name, cache="gpu")
    stream = cuda.cupy.cuda.Stream(non_blocking=True)
    try:
        for attempt in range(3):
            with deferring_checks() as checks:
                backend.load_batch(layouts, plan, stream=stream)  # returns: nothing raised
            assert len(checks) == 1, attempt
            stream.synchronize()
            with pytest.raises(ChunkError, match="crc32c checksum mismatch"):
                checks[0].raise_if_bad()
        stats = backend.cache_stats()
        assert stats["inserts"] == 0 and stats["hits"] == 0
    finally:
        backend.close()
    assert cuda.fault is None


# -- decode="auto" without libnvcomp -------------------------------------------------------
def test_decode_auto_falls_back_when_load_library_finds_no_libnvcomp(store, monkeypatch):
    """``nvidia.libnvcomp.load_library()`` returns None (it swallows the loader's
    OSError): the C API is unavailable, and ``decode="auto"`` uses the Python API."""
    libnvcomp = pytest.importorskip("nvidia.libnvcomp")
    from zarrdali.gpu import backend as gpu_backend
    from zarrdali.gpu import decode as gpu_decode

    fakegpu.install(monkeypatch)
    monkeypatch.setattr(libnvcomp, "load_library", lambda: None)
    monkeypatch.setattr(gpu_decode, "_api", None)
    monkeypatch.setattr(gpu_decode, "_api_error", None)
    monkeypatch.setattr(gpu_backend, "nvcomp_capi", gpu_decode.nvcomp_capi)
    monkeypatch.setattr(gpu_backend, "_capi_warned", False)
    monkeypatch.setitem(sys.modules, "nvidia.nvcomp", types.ModuleType("nvidia.nvcomp"))
    group, name = open_group(store)
    with pytest.warns(RuntimeWarning, match="C API is unavailable.*load_library"):
        backend = _backend(group, name)
    try:
        assert backend.decode_mode == "python" and backend.decode_temp_share > 0
        assert backend.input_align == {"Zstd": 8, "LZ4": 1, "Gzip": 8, "Deflate": 4}
    finally:
        backend.close()
    with pytest.raises(BackendUnavailableError, match="load_library"):
        _backend(group, name, decode="capi")


# -- the loader's device in every thread -------------------------------------------------
def test_every_thread_works_on_the_backends_device(store, monkeypatch):
    """torchrun on a node of two GPUs, rank 1: the backend, its prefetch threads
    (new threads start on device 0), its host pool and the caller all work on
    device 1; DALI is told device 1."""
    cuda = fakegpu.install(monkeypatch, n_devices=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l", "b"])
    want = _cpu_windows(group, name, layouts)
    backend = _backend(
        group, name, cache="gpu", cache_budget=1 << 20, cache_page_size=1 << 16, read="kvikio"
    )
    assert backend.device_id == backend.dali_device_id() == 1
    assert cuda.current_device() == 0  # the caller's own device is left alone
    run_epoch(backend, layouts, want=want)
    seen = []

    def loader_thread():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backend.load_batch(layouts, _plan(layouts, BATCHES[1]))
        seen.append(cuda.current_device())

    t = threading.Thread(target=loader_thread)
    t.start()
    t.join()
    assert seen == [0]  # restored after the call
    assert backend._pool.submit(cuda.current_device).result() == 1
    assert {d for d, _ in cuda.device_log} == {1}, sorted(set(cuda.device_log))
    assert set(cuda.streams_made) == {1} and set(cuda.events_made) == {1}
    assert cuda.fault is None
    backend.close()
    assert cuda.current_device() == 0


def test_local_rank_with_one_visible_gpu_is_device_0(monkeypatch):
    from zarrdali.gpu.feed import cuda_device_id

    cuda = fakegpu.FakeCuda(n_devices=1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # a launcher that sets CUDA_VISIBLE_DEVICES per rank
    assert cuda_device_id(cuda.cupy) == 0
    monkeypatch.delenv("LOCAL_RANK")
    two = fakegpu.FakeCuda(n_devices=2)
    two.set_device(1)  # torch.cuda.set_device(1) in this thread
    assert cuda_device_id(two.cupy) == 1


# -- stream coupling with the feed -----------------------------------------------------------
def test_the_wait_for_the_ring_buffer_comes_after_decode_before_gather(store, monkeypatch):
    cuda = fakegpu.install(monkeypatch)
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l"])
    backend = _backend(group, name)
    plan = _plan(layouts, BATCHES[0])
    out = cuda.cupy.empty(plan.out_shape, dtype=batch_dtype(layouts))
    stream = cuda.cupy.cuda.Stream(non_blocking=True)
    seen = []

    def before_write():
        seen.append(([c[0] for c in cuda.api.calls], list(cuda.launches)))

    backend.load_batch(layouts, plan, out=out, stream=stream, before_write=before_write)
    assert len(seen) == 1
    calls, launches = seen[0]
    assert sorted(calls) == ["LZ4", "Zstd"]  # the batch's decode is enqueued already
    assert "zarrdali_gather" not in launches  # the gather, which writes `out`, is not
    assert cuda.launches[-1] == "zarrdali_gather"
    backend.close()


# -- the batch's tables: one upload ---------------------------------------------------------
def test_a_batch_upload_packs_its_tables_into_one_copy(monkeypatch):
    """``BatchUpload``: the added tables in one pinned buffer (of the thread's
    ring of two, reused once the copy's event has passed) and one device
    buffer, one copy; each table's device view equals it; a table not added (or
    not contiguous) is uploaded alone, counted too."""
    from zarrdali.gpu.lifetimes import GuardedBuffers
    from zarrdali.gpu.upload import ALIGN, BatchUpload

    cuda = fakegpu.install(monkeypatch)
    cp = cuda.cupy
    pinned = GuardedBuffers(lambda n: cuda.cupyx.empty_pinned(n, dtype=np.uint8), n=2)
    counted: list[int] = []
    stream = cp.cuda.Stream(non_blocking=True)
    tables = [
        np.arange(15, dtype=np.int64).reshape(5, 3),
        np.arange(7, dtype=np.int32),
        np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2),
        np.empty((5, 0), dtype=np.int64),
    ]
    strided = np.arange(20, dtype=np.int64).reshape(4, 5)[:, 1]
    for batch in range(3):
        upload = BatchUpload(cp, pinned, counted.append)
        upload.add(*tables, None, strided)
        copies = len(cuda.copies)
        with stream:
            device = upload.send(stream)
        assert len(cuda.copies) == copies + 1 and cuda.copies[-1] == (1, upload.nbytes)
        assert device.nbytes == upload.nbytes == 160 + 6 * 4  # 120 bytes, 28 at 128, 24 at 160
        for table in tables:
            got = upload(table)
            assert got.dtype == table.dtype and got.shape == table.shape
            assert np.array_equal(np.asarray(got), table)
            if table.size:
                assert got.data.ptr % ALIGN == 0
        assert counted == [upload.nbytes] * (batch + 1)
        alone = upload(np.ascontiguousarray(strided))  # not added as it was: its own copy
        assert np.array_equal(np.asarray(alone), strided) and counted[-1] == strided.nbytes
        counted.pop()
    assert cuda.pinned == 2  # the ring's two pinned buffers, reused
