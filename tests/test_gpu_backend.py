"""The GPU backend.

Without a GPU: importing it needs nothing, asking for it says what is missing,
and its host-side planning (staging layout, LZ4/crc32c payload bounds, gather
descriptors) is checked; the descriptors are executed by a numpy model of the
gather kernel and compared with the CPU assembler, bit for bit.

With a GPU (``@pytest.mark.gpu``, skipped elsewhere): the GPU backend's batches
equal the CPU backend's bit for bit for every codec, plain and sharded stores,
float32 and int16, big-endian, edge tiles and missing chunks; the transfer
counter shows no host↔device data copy on the zstd/LZ4 path.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings

import numcodecs
import numpy as np
import pytest

from storefactory import COMPRESSORS, VarSpec, chunk_files, chunk_key, delete_chunks
from zarrdali.backends.base import batch_dtype
from zarrdali.backends.gpu_plan import (
    ALIGN,
    EncodedChunk,
    build_descriptors,
    chunk_sources,
    decoded_slots,
    fill_bits,
    gather_reference,
    payload_bounds,
    plan_staging,
)
from zarrdali.chunkplan import plan_batch
from zarrdali.codecs import ChunkCodec
from zarrdali.errors import BackendUnavailableError
from zarrdali.store import load_layouts, open_group

NT, NY, NX = 12, 21, 33
SAMPLES = np.array(
    [[0, 0, 0], [3, 13, 25], [5, 7, 5], [8, 13, 0], [1, 0, 25], [9, 5, 17]], dtype=np.int64
)


# -- stores ---------------------------------------------------------------------
def _spec(name: str, **kw) -> VarSpec:
    kw.setdefault("shape", (NT, NY, NX))
    kw.setdefault("chunks", (2, 8, 8))
    return VarSpec(name, **kw)


CASES = {
    f"{c}-{dt}-{'sharded' if sh else 'plain'}": dict(
        compressor=c, dtype=dt, shards=(4, 16, 16) if sh else None
    )
    for c in COMPRESSORS
    for dt in ("float32", "int16")
    for sh in (False, True)
}


def _plan(store, names, n_frames=3, frame_step=2):
    group, name = open_group(store)
    layouts = load_layouts(group, name, names)
    plan = plan_batch(layouts, SAMPLES, n_frames=n_frames, frame_step=frame_step, tile_hw=(8, 8))
    return group, name, layouts, plan


def _delete_some(store, array: str, n: int = 2) -> None:
    files = chunk_files(store, array)
    delete_chunks(store, array, [chunk_key(store, array, f) for f in files[1 : 1 + n]])


# -- no GPU needed ----------------------------------------------------------------
def test_import_touches_no_gpu_library():
    code = (
        "import sys, zarrdali, zarrdali.backends.gpu, zarrdali.backends.gpu_plan\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx', 'kvikio')"
        " or m.startswith('nvidia.nvcomp')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_backend_says_what_is_missing(make_store):
    from zarrdali.backends import make_backend
    from zarrdali.backends.gpu import missing_gpu_requirements

    missing = missing_gpu_requirements()
    if not missing:
        pytest.skip("this machine has everything the GPU path needs")
    store = make_store(_spec("x"))
    group, name = open_group(store)
    with pytest.raises(BackendUnavailableError) as info:
        make_backend("cuda", group, name)
    message = str(info.value)
    for item in missing:
        assert item in message
    assert "pip install" in message and "device='cpu'" in message


@pytest.mark.parametrize("compressor", ["zstd", "lz4", "gzip", "blosc", "none"])
@pytest.mark.parametrize("crc", [False, True])
def test_payload_bounds(compressor, crc):
    codec = ChunkCodec(compressor=compressor, byteorder="<", has_crc32c=crc)
    skip, length = payload_bounds(codec, 100)
    assert skip == (4 if compressor == "lz4" else 0)
    assert skip + length + (4 if crc else 0) == 100


def test_lz4_payload_is_the_raw_block():
    data = np.arange(5000, dtype=np.float32)
    encoded = numcodecs.LZ4().encode(data)
    codec = ChunkCodec(compressor="lz4", byteorder="<")
    skip, length = payload_bounds(codec, len(encoded))
    assert int.from_bytes(encoded[:4], "little") == data.nbytes  # the prefix nvCOMP must not see
    # a raw LZ4 block: numcodecs decodes it again once the prefix is put back
    payload = bytes(encoded[skip : skip + length])
    again = numcodecs.lz4.decompress(data.nbytes.to_bytes(4, "little") + payload)
    assert np.frombuffer(again, np.float32).tolist() == data.tolist()


def test_staging_layout_is_aligned_and_disjoint():
    rng = np.random.default_rng(0)
    chunks, pos = [], 0
    for f in range(4):  # shard-like files: inner chunks back to back, some gaps
        offset = int(rng.integers(0, 50))
        for _ in range(int(rng.integers(1, 9))):
            nbytes = int(rng.integers(5, 300))
            skip = int(rng.choice([0, 4]))
            chunks.append(EncodedChunk(pos, f"file{f}", offset, nbytes, skip, nbytes - skip))
            pos += 1
            offset += nbytes + int(rng.choice([0, 0, 17, 100_000]))
    plan = plan_staging(chunks, max_gap=64)
    spans = sorted((r.dst, r.dst + r.nbytes) for r in plan.reads)
    assert all(a % ALIGN == 0 for a, _ in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))
    assert spans[-1][1] <= plan.raw_nbytes
    for c in chunks:  # each payload sits where its file bytes were read
        (read,) = [
            r
            for r in plan.reads
            if r.path == c.path and r.file_offset <= c.offset < r.file_offset + r.nbytes
        ]
        assert plan.payload_raw[c.position] == read.dst + c.offset - read.file_offset + c.skip
        assert c.offset + c.nbytes <= read.file_offset + read.nbytes
    assert plan.needs_packing  # random sizes: some payloads are misaligned
    offsets = [plan.payload_offset(c.position) for c in chunks]
    assert all(o % ALIGN == 0 and o >= plan.raw_nbytes for o in offsets)
    ends = sorted((plan.payload_offset(c.position), c.length) for c in chunks)
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(ends))
    assert plan.total_nbytes >= max(a + n for a, n in ends)


def test_decoded_slots_are_aligned():
    offsets, total = decoded_slots([6, 8, 3, 16])
    assert offsets == [0, 8, 16, 24] and total == 40


@pytest.mark.parametrize(
    ("value", "src", "out"),
    [(0, "f4", "f4"), (np.nan, "f4", "f4"), (-7, "i2", "i2"), (-7, "i2", "f4"), (3.5, "f8", "f8")],
)
def test_fill_bits(value, src, out):
    bits = fill_bits(value, np.dtype(src), np.dtype(out))
    raw = bits.to_bytes(8, "little", signed=True)[: np.dtype(out).itemsize]
    got = np.frombuffer(raw, dtype=np.dtype(out).newbyteorder("<"))[0]
    want = np.array(value, dtype=src).astype(out)
    assert got.tobytes() == want.astype(np.dtype(out).newbyteorder("<")).tobytes()


def _reference_batch(group, name, layouts, plan) -> np.ndarray:
    """What the GPU backend computes, with the device steps replaced by host ones:
    chunks decoded by the CPU decoder into aligned slots of one buffer (stored
    byte order), zarr-python's for arrays off the fast path, then the gather
    descriptors executed by the numpy model of the kernel."""
    from concurrent.futures import ThreadPoolExecutor

    from zarrdali.backends.cpu import NumcodecsDecoder, PosixChunkReader
    from zarrdali.backends.fallback import ZarrPythonChunkSource

    out_dtype = batch_dtype(layouts)
    native = {i for i, c in enumerate(plan.chunks) if not layouts[c.var].fast_path}
    shapes, dtypes, swap, fills = chunk_sources(layouts, plan, native, out_dtype)
    slots, total = decoded_slots([layouts[c.var].chunk_nbytes for c in plan.chunks])
    buffer = np.zeros(total, dtype=np.uint8)
    missing = [False] * len(plan.chunks)
    with ThreadPoolExecutor(1) as pool:
        reader = PosixChunkReader(pool, name)
        fast = [i for i in range(len(plan.chunks)) if i not in native]
        encoded = reader.read(layouts, [plan.chunks[i] for i in fast])
    decoder = NumcodecsDecoder(name)
    fallback = ZarrPythonChunkSource(group, name)
    for i, data in zip(fast, encoded, strict=True):
        if data is None:
            missing[i] = True  # the kernel writes the fill value
            continue
        layout = layouts[plan.chunks[i].var]
        stored = layout.codec.stored_dtype(layout.dtype)
        view = buffer[slots[i] : slots[i] + layout.chunk_nbytes].view(stored)
        decoder.decode(layout, plan.chunks[i], memoryview(data), out=view.reshape(shapes[i]))
    for i in native:
        layout = layouts[plan.chunks[i].var]
        view = buffer[slots[i] : slots[i] + layout.chunk_nbytes].view(layout.dtype)
        view.reshape(shapes[i])[...] = fallback.read_decoded(layout, plan.chunks[i])
    desc = build_descriptors(plan, shapes, dtypes, swap, missing, slots, fills)
    return gather_reference(buffer, desc, plan.out_shape, out_dtype)


def _cpu_batch(group, name, layouts, plan) -> np.ndarray:
    from zarrdali.backends.cpu import CpuBackend

    backend = CpuBackend(group, name, 1)
    try:
        return backend.load_batch(layouts, plan)
    finally:
        backend.close()


def _assert_bitwise(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("case", list(CASES))
def test_descriptors_reproduce_cpu_assembler(make_store, case):
    kw = CASES[case]
    store = make_store(_spec("a", **kw), _spec("b", **kw, seed=3, fill_value=7))
    _delete_some(store, "b")  # missing chunks (or shards): fill value
    group, name, layouts, plan = _plan(store, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_bitwise(
            _reference_batch(group, name, layouts, plan), _cpu_batch(group, name, layouts, plan)
        )


# Stores mixing what the backends must agree on.
MIXED_STORES = [
    # big-endian, with crc32c, a level axis, cast of int16 and float32 to float32/64
    [
        _spec("be", endian="big", checksum=True),
        _spec("lv", shape=(NT, 3, NY, NX), chunks=(2, 2, 8, 8), dtype="int16", endian="big"),
    ],
    [_spec("f8", dtype="float64", fill_value=np.nan), _spec("i2", dtype="int16", seed=2)],
    # an array off the fast path (transpose): zarr-python decodes it, native order
    [_spec("tr", unsupported="transpose"), _spec("ok", shards=(4, 16, 16), endian="big")],
    [_spec("nan", nan_box=(0, 6, 2, 12, 3, 30), written_time=(0, 8), fill_value=np.nan)],
]
MIXED_STORE_IDS = ["bigendian-levels-crc", "cast", "fallback", "nan-missing"]


@pytest.mark.parametrize("specs", MIXED_STORES, ids=MIXED_STORE_IDS)
def test_descriptors_reproduce_cpu_assembler_mixed(make_store, specs):
    store = make_store(*specs)
    names = [s.name for s in specs]
    group, name, layouts, plan = _plan(store, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_bitwise(
            _reference_batch(group, name, layouts, plan), _cpu_batch(group, name, layouts, plan)
        )


# -- with a GPU -------------------------------------------------------------------
def _gpu_batch(group, name, layouts, plan, **kw):
    from zarrdali.backends.gpu import GpuBackend

    backend = GpuBackend(group, name, **kw)
    try:
        got = backend.load_batch(layouts, plan)
        return got.get(), backend
    finally:
        backend.close()


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_matches_cpu(make_store, case):
    kw = CASES[case]
    store = make_store(_spec("a", **kw), _spec("b", **kw, seed=3, fill_value=7))
    _delete_some(store, "b")
    group, name, layouts, plan = _plan(store, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _cpu_batch(group, name, layouts, plan)
        got, backend = _gpu_batch(group, name, layouts, plan)
    _assert_bitwise(got, want)
    counts = backend.transfers.snapshot()
    assert counts["device_to_host"] == 0
    if kw["compressor"] in ("zstd", "lz4", "gzip", "none"):
        assert counts["host_to_device"] == 0, counts  # nothing but the read
    else:  # blosc: decoded on the CPU, one copy per batch
        assert counts["host_to_device"] == 1, counts
    assert backend.io_mode in ("gds", "posix")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "specs",
    [
        *MIXED_STORES,
        [_spec("z", compressor="zstd"), _spec("l", compressor="lz4", shards=(4, 16, 16))],
    ],
    ids=[*MIXED_STORE_IDS, "zstd+lz4"],
)
@pytest.mark.parametrize("preconfigure", [True, False])
def test_gpu_matches_cpu_mixed(make_store, specs, preconfigure):
    store = make_store(*specs)
    group, name, layouts, plan = _plan(store, [s.name for s in specs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _cpu_batch(group, name, layouts, plan)
        got, _ = _gpu_batch(group, name, layouts, plan, preconfigure=preconfigure)
    _assert_bitwise(got, want)


@pytest.mark.gpu
def test_gpu_blosc_warns_once_and_names_prepare(make_store):
    from zarrdali.backends.gpu import GpuBackend

    store = make_store(_spec("bl", compressor="blosc"))
    group, name, layouts, plan = _plan(store, ["bl"])
    backend = GpuBackend(group, name)
    try:
        with pytest.warns(UserWarning, match=r"blosc.*zarrdali prepare"):
            backend.load_batch(layouts, plan)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            backend.load_batch(layouts, plan)  # no second warning
    finally:
        backend.close()
