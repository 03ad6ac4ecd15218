"""The CPU backend's fast lanes: memory-mapped files and zstd with reused contexts.

Unit level: :class:`ZstdContexts` decodes as numcodecs does and refuses bad
frames; :class:`MappedFiles` maps what it leases, never unmaps a leased file
and falls back to ``pread`` for files it cannot map. Backend level: every
combination of the lanes (maps or ``pread``, contexts or numcodecs, one thread
or several) gives batches equal to zarr-python's, and the fast lanes really run.
"""

from __future__ import annotations

import ctypes
import mmap
import pickle
import threading
from pathlib import Path

import crc32c
import numcodecs.zstd
import numpy as np
import pytest

import zarrdali
from storefactory import VarSpec, open_arrays
from zarrdali.batch.zstdctx import ZstdContexts, ZstdFrameError
from zarrdali.cpu.reader import EpochReader
from zarrdali.errors import ChunkError
from zarrdali.io.mapped import MappedFiles

CONTEXTS = ZstdContexts.create()
needs_contexts = pytest.mark.skipif(
    CONTEXTS is None, reason="this numcodecs build does not export libzstd's API"
)
RAW = np.random.default_rng(3).normal(size=(64, 64)).astype("<f4")


# -- zstd contexts -----------------------------------------------------------
def _decode(contexts: ZstdContexts, frame: bytes, capacity: int) -> tuple[int, np.ndarray]:
    out = np.full(capacity, 0xAB, dtype=np.uint8)
    src = np.frombuffer(frame, dtype=np.uint8)
    got = contexts.decompress(
        contexts.context(), out.ctypes.data, capacity, src.ctypes.data, len(frame)
    )
    return got, out


@needs_contexts
def test_contexts_decode_as_numcodecs_does():
    contexts = ZstdContexts.create()
    try:
        for level in (1, 3, 19):
            frame = numcodecs.zstd.compress(RAW.tobytes(), level)
            got, out = _decode(contexts, frame, RAW.nbytes)
            assert got == RAW.nbytes
            assert out.tobytes() == bytes(numcodecs.zstd.decompress(frame))
        # A frame shorter than the capacity says so by its size (the loader checks it).
        got, out = _decode(contexts, numcodecs.zstd.compress(RAW[:10].tobytes()), RAW.nbytes)
        assert got == RAW[:10].nbytes
    finally:
        contexts.close()


@needs_contexts
@pytest.mark.parametrize("damage", ["flip", "truncate", "too_big"])
def test_contexts_refuse_bad_frames(damage):
    contexts = ZstdContexts.create()
    frame = bytearray(numcodecs.zstd.compress(RAW.tobytes()))
    capacity = RAW.nbytes
    if damage == "flip":
        frame[0] ^= 0xFF  # the magic number
    elif damage == "truncate":
        frame = frame[: len(frame) // 2]
    else:
        capacity -= 1  # the frame decodes to more than the buffer holds
    try:
        with pytest.raises(ZstdFrameError):
            _decode(contexts, bytes(frame), capacity)
    finally:
        contexts.close()


@needs_contexts
def test_one_context_per_thread_all_freed_by_close():
    contexts = ZstdContexts.create()
    seen: list[int] = []

    def run() -> None:
        seen.append(contexts.context())
        assert contexts.context() == seen[-1]  # the thread keeps its own

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 3
    contexts.close()
    contexts.close()  # idempotent
    with pytest.raises(RuntimeError, match="freed"):
        contexts.context()


# -- memory maps -------------------------------------------------------------
def _files(tmp_path, sizes):
    paths = []
    for k, n in enumerate(sizes):
        path = tmp_path / f"f{k}"
        path.write_bytes(bytes((k + i) % 256 for i in range(n)))
        paths.append(str(path))
    return paths


def test_leases_map_files_and_keep_them_until_released(tmp_path):
    paths = _files(tmp_path, [1000, 3000, 5000])
    maps = MappedFiles(max_maps=1)
    lease = maps.lease(paths)
    assert len(maps) == 3  # all held: none unmapped while leased
    assert lease.mapped.all() and list(lease.size) == [1000, 3000, 5000]
    for k, path in enumerate(paths):
        data = Path(path).read_bytes()
        assert ctypes.string_at(int(lease.base[k]), len(data)) == data
        assert bytes(lease.view(k)) == data
    lease.release()
    lease.release()  # idempotent
    assert len(maps) == 1  # the least recently used went once released
    again = maps.lease(paths[:1])
    assert bytes(again.view(0)) == Path(paths[0]).read_bytes()
    again.release()
    maps.close()
    with pytest.raises(RuntimeError, match="closed"):
        maps.lease(paths)


def test_empty_unmappable_and_missing_files(tmp_path, monkeypatch):
    empty, data = _files(tmp_path, [0, 100])
    maps = MappedFiles()
    lease = maps.lease([empty])
    assert lease.mapped[0] and lease.size[0] == 0 and lease.base[0] == 0
    lease.release()

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")  # a file system without mmap

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    lease = maps.lease([data])
    assert not lease.mapped[0] and lease.size[0] == 100  # read with pread instead
    lease.release()
    with pytest.raises(FileNotFoundError):
        maps.lease([data, str(tmp_path / "gone")])
    held = maps.lease([data])  # the failed lease left nothing pinned
    held.release()
    maps.max_maps = 0
    maps.lease([]).release()  # evicts every unpinned map
    assert len(maps) == 0
    maps.close()


def test_concurrent_leases_never_see_a_file_unmapped(tmp_path):
    """Threads lease overlapping sets with room for fewer maps than they hold:
    every leased address keeps its file's bytes until the lease is released."""
    paths = _files(tmp_path, [4096 + 512 * k for k in range(12)])
    contents = [Path(p).read_bytes() for p in paths]
    maps = MappedFiles(max_maps=3)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            pick = rng.choice(len(paths), size=4, replace=False).tolist()
            lease = maps.lease([paths[k] for k in pick])
            try:
                for j, k in enumerate(pick):
                    if ctypes.string_at(int(lease.base[j]), len(contents[k])) != contents[k]:
                        errors.append(f"file {k} changed under its lease")
            finally:
                lease.release()

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(maps) <= 3  # all released: evicted down to the bound
    maps.close()


# -- the backend -------------------------------------------------------------
NT, NY, NX = 12, 21, 33  # 8 x 8 tiles: aligned ones decode in place, edge ones do not


def _store(make_store, endian):
    sharded = {"shape": (NT, NY, NX), "chunks": (1, 8, 8), "shards": (4, 16, 16)}
    return make_store(
        VarSpec("z", endian=endian, **sharded),  # zstd: contexts, in place
        VarSpec("g", compressor="gzip", **sharded),  # another codec on a view of the map
        VarSpec("c", checksum=True, **sharded),  # zstd + crc32c: numcodecs on the view
        VarSpec("p", shape=(NT, NY, NX), chunks=(2, 8, 8)),  # a file per chunk
    )


def _expected(arrays, variables, samples, n_frames, hw):
    h, w = hw
    out = []
    for t0, y0, x0 in samples.tolist():
        frames = [arrays[v][t0 : t0 + n_frames, None, y0 : y0 + h, x0 : x0 + w] for v in variables]
        out.append(np.concatenate(frames, axis=1))
    return np.stack(out)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("contexts", [True, False])
@pytest.mark.parametrize("memory_map", [True, False])
@pytest.mark.parametrize("endian", ["little", "big"])
def test_every_read_path_equals_the_oracle(make_store, endian, memory_map, contexts, threads):
    store = _store(make_store, endian)
    variables = ["z", "g", "c", "p"]
    arrays = open_arrays(store, variables)
    ld = zarrdali.ZarrLoader(
        store,
        variables,
        tile=(8, 8),
        batch_size=5,
        workers=0,
        num_threads=threads,
        memory_map=memory_map,
    )
    backend = ld.backend
    assert (backend.maps is not None) == memory_map
    if not contexts and backend.zstd is not None:
        backend.zstd.close()
        backend.zstd = None
    works = []
    describe = backend.describe
    backend.describe = lambda *a, **kw: works.append(describe(*a, **kw)) or works[-1]
    try:
        plan = ld.epoch_plan(0)
        for k in range(len(plan)):
            samples = plan.batch(k)
            got = ld.load_batch(samples)
            want = _expected(arrays, variables, samples, ld.spec.n_frames, (8, 8))
            np.testing.assert_array_equal(got, want)
    finally:
        ld.close()
    mapped = sum(len(w.mapped) for w in works)
    by_context = sum(sum(w.by_context) for w in works)
    in_place = sum(sum(d and c for d, c in zip(w.direct, w.by_context, strict=True)) for w in works)
    if memory_map:
        assert mapped == sum(int(w.locations.present.sum()) for w in works)
    else:
        assert mapped == 0
    if backend.zstd is not None:  # on a map's pages or on a pread buffer
        assert by_context  # the fast lane ran
        # into the batch where the stored order is the batch's, else through scratch
        assert 0 < in_place < by_context if endian == "little" else in_place == 0
    else:
        assert by_context == 0


def test_a_chunk_past_the_end_of_its_shard_is_named(make_store):
    store = _store(make_store, "little")
    ld = zarrdali.ZarrLoader(store, ["z"], tile=(8, 8), batch_size=64, workers=0, memory_map=True)
    try:
        samples = ld.epoch_plan(0).batch(0)
        ld.load_batch(samples)  # shard indexes now cached, files mapped
        ld.backend.maps.close()  # unmapped before the file shrinks: no fault
        ld.backend.maps = MappedFiles()
        shard = store / "z" / "c" / "0" / "0" / "0"
        raw = shard.read_bytes()
        shard.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(ChunkError, match=r"truncated.*'z'.*c/0/0/0") as info:
            ld.load_batch(samples)
        assert info.value.array == "z"
    finally:
        ld.close()


def _replace_inner_chunk(shard: Path, position: int, frame: bytes) -> None:
    """Point inner chunk ``position`` of a shard (default index layout) at ``frame``,
    appended after the data; the index's crc32c is recomputed."""
    raw = shard.read_bytes()
    n_inner = 16  # shards (4, 16, 16) of (1, 8, 8) chunks
    start = len(raw) - (n_inner * 16 + 4)
    index = np.frombuffer(raw[start:-4], dtype="<u8").reshape(n_inner, 2).copy()
    index[position] = (start, len(frame))
    table = index.tobytes()
    shard.write_bytes(raw[:start] + frame + table + crc32c.crc32c(table).to_bytes(4, "little"))


@pytest.mark.parametrize("contexts", [True, False])
def test_a_frame_of_the_wrong_size_is_named(make_store, contexts):
    """A valid zstd frame that decodes to half a chunk is an error, not half a batch."""
    store = _store(make_store, "little")
    shard = store / "z" / "c" / "0" / "0" / "0"
    _replace_inner_chunk(shard, 0, numcodecs.zstd.compress(RAW.tobytes()[:128]))
    ld = zarrdali.ZarrLoader(store, ["z"], tile=(8, 8), batch_size=64, workers=0)
    if not contexts and ld.backend.zstd is not None:
        ld.backend.zstd.close()
        ld.backend.zstd = None
    try:
        with pytest.raises(ChunkError, match=r"decodes to 128 bytes.*256") as info:
            for k in range(len(ld.epoch_plan(0))):
                ld.load_batch(ld.epoch_plan(0).batch(k))
        assert info.value.array == "z" and info.value.key.startswith("c/0/0/0")
    finally:
        ld.close()


def test_memory_map_false_reaches_the_worker_processes(make_store):
    """The option travels with the epoch reader DALI pickles into its workers."""
    store = _store(make_store, "little")
    arrays = open_arrays(store, ["z"])
    with zarrdali.ZarrLoader(
        store, ["z"], tile=(8, 8), batch_size=8, workers=0, memory_map=False
    ) as ld:
        assert ld.backend.maps is None
        reader = EpochReader(
            ld.store_ref,
            ld.variables,
            ld.spec,
            ld.candidates,
            ld.sampler,
            0,
            0,
            memory_map=ld.memory_map,
            backend_type=type(ld.backend),
        )
        reader = pickle.loads(pickle.dumps(reader))  # as DALI hands it to a worker
        frames, samples = reader(0)  # (input,) or (input, target)
        backend = reader._state[1]  # (layouts, backend)
        try:
            assert backend.maps is None
            window = np.concatenate(frames, axis=1)
            want = _expected(arrays, ["z"], samples, ld.spec.n_frames, (8, 8))
            np.testing.assert_array_equal(window, want)
        finally:
            backend.close()
