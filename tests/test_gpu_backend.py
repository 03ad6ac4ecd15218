"""The GPU backend.

Without a GPU: importing it needs nothing, asking for it says what is missing,
and its host-side planning is checked: payload bounds (LZ4 prefix, crc32c),
the staging layout (aligned, disjoint, payloads where their bytes land), the
decoded slots and fill bits. The device path is then emulated on the CPU from
:func:`~zarrdali.gpu.describe.describe_batch` alone (staging reads, the
pack and copy jobs, each decode group's payloads decoded as nvCOMP would) and
the gather tables are executed twice: by the numpy model of the kernel, and by
the kernel's own CUDA source compiled as host C++; both equal the CPU backend
bit for bit. The kernel sources also compile with nvcc, when it is installed.

With a GPU (``@pytest.mark.gpu``, skipped elsewhere): the GPU backend's batches
equal the CPU backend's bit for bit for every codec, plain and sharded stores,
float32 and int16, big-endian, edge tiles and missing chunks, with the C API
and the Python API decoders; the transfer counter shows no host↔device data
copy on the zstd/LZ4 path besides the pinned reader's one staging copy.
``tests/test_gpu_engine.py`` runs the engine's orchestration on a CPU
stand-in of the device and on the GPU.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numcodecs
import numpy as np
import pytest

from storefactory import COMPRESSORS, VarSpec, chunk_files, chunk_key, delete_chunks
from zarrdali.batch.fallback import ZarrPythonChunkSource
from zarrdali.batch.host import NumcodecsDecoder, PosixReader
from zarrdali.batch.locate import ChunkLocations, ChunkLocator
from zarrdali.batch.plan import natural_coords, plan_batch
from zarrdali.errors import BackendUnavailableError, ChunkError
from zarrdali.gpu.describe import (
    ALIGN,
    CTYPES,
    FALLBACK_INPUT_ALIGN,
    MISSING_SLOT,
    N_LEVEL_FIELDS,
    N_VAR_FIELDS,
    BatchDescription,
    GatherTables,
    aligned_offsets,
    describe_batch,
    fill_bits,
    gather_reference,
    payload_bounds,
    payload_trims,
    plan_staging,
)
from zarrdali.gpu.kernels import (
    PACK_SOURCE,
    gather_block,
    gather_grid_y,
    gather_source,
)
from zarrdali.store.codecs import ChunkCodec
from zarrdali.store.open import load_layouts, open_group

NT, NY, NX = 12, 21, 33
# (t0, y0, x0); windows of 3 frames 2 steps apart end inside NT (t0 <= 7).
SAMPLES = np.array(
    [[0, 0, 0], [3, 13, 25], [5, 7, 5], [6, 13, 0], [1, 0, 25], [7, 5, 17]], dtype=np.int64
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
        "import sys, zarrdali, zarrdali.gpu, zarrdali.gpu.describe\n"
        "import zarrdali.gpu.kernels\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx', 'kvikio')"
        " or m.startswith('nvidia.nvcomp')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_backend_says_what_is_missing(make_store):
    from zarrdali.gpu import missing_gpu_requirements
    from zarrdali.paths import make_backend

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


@pytest.mark.parametrize("crc", [False, True])
def test_payload_bounds(crc):
    compressors = ["zstd", "lz4", "gzip", "blosc", "none"]
    codecs = [ChunkCodec(compressor=c, byteorder="<", has_crc32c=crc) for c in compressors]
    chunk_var = np.array([0, 1, 2, 3, 4, 1], dtype=np.int64)
    nbytes = np.array([100, 100, 100, 100, 100, 7], dtype=np.int64)
    skip, length = payload_bounds(payload_trims(codecs), chunk_var, nbytes)
    tail = 4 if crc else 0
    assert skip.tolist() == [0, 4, 0, 0, 0, 4]
    assert (skip + length + tail).tolist() == nbytes.tolist()
    assert (length[-1] < 0) == crc  # 7 bytes cannot hold an LZ4 prefix and a crc32c


def test_lz4_payload_is_the_raw_block():
    data = np.arange(5000, dtype=np.float32)
    encoded = numcodecs.LZ4().encode(data)
    trims = payload_trims([ChunkCodec(compressor="lz4", byteorder="<")])
    (skip,), (length,) = payload_bounds(trims, np.zeros(1, np.int64), np.array([len(encoded)]))
    assert int.from_bytes(encoded[:4], "little") == data.nbytes  # the prefix nvCOMP must not see
    payload = bytes(encoded[skip : skip + length])
    assert np.frombuffer(_decode_payload("LZ4", payload, data.nbytes), np.float32).tolist() == (
        data.tolist()
    )


@pytest.mark.parametrize(
    ("compressor", "size", "message"),
    [("lz4", 3, "too short"), ("none", 10, "uncompressed chunk holds 6 bytes")],
)
def test_bad_chunk_sizes_name_array_and_key(make_store, compressor, size, message):
    store = make_store(_spec("ok"), _spec("bad", compressor=compressor, checksum=True))
    _, name, layouts, plan = _plan(store, ["ok", "bad"])
    path = chunk_files(store, "bad")[0]
    path.write_bytes(path.read_bytes()[:size])
    locations = ChunkLocator(name, layouts).locate(plan)
    with pytest.raises(ChunkError, match=message) as info:
        describe_batch(layouts, plan, locations, store_name=name)
    assert info.value.array == "bad"
    assert info.value.key.startswith(chunk_key(store, "bad", path))


def _random_chunks(rng, n_files=4):
    """Shard-like files: inner chunks back to back, with some gaps."""
    rows = []
    for f in range(n_files):
        offset = int(rng.integers(0, 50))
        for _ in range(int(rng.integers(1, 9))):
            nbytes = int(rng.integers(5, 300))
            skip = int(rng.choice([0, 4]))
            align = int(rng.choice([1, 1, 4, 8]))  # the decoder's input alignment
            rows.append((f, offset, nbytes, skip, nbytes - skip, align))
            offset += nbytes + int(rng.choice([0, 0, 17, 100_000]))
    order = rng.permutation(len(rows))  # chunk order is not file order
    return [np.array(col)[order] for col in zip(*rows, strict=True)]


@pytest.mark.parametrize("seed", range(5))
def test_staging_layout_is_aligned_and_disjoint(seed):
    rng = np.random.default_rng(seed)
    file, offset, nbytes, skip, length, align = _random_chunks(rng)
    s = plan_staging(file, offset, nbytes, skip, length, align, max_gap=64)
    spans = sorted(zip(s.read_dst.tolist(), (s.read_dst + s.read_nbytes).tolist(), strict=True))
    assert all(a % ALIGN == 0 for a, _ in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))
    assert spans[-1][1] <= s.raw_nbytes
    # Fill the staging buffer as the reads do, from fake file contents.
    files = [rng.integers(0, 256, 1 << 20, dtype=np.uint8) for _ in range(int(file.max()) + 1)]
    staging = np.zeros(s.total_nbytes, dtype=np.uint8)
    for f, start, n, dst in zip(s.read_file, s.read_start, s.read_nbytes, s.read_dst, strict=True):
        staging[dst : dst + n] = files[f][start : start + n]
    want = [
        files[f][o + k : o + k + n] for f, o, k, n in zip(file, offset, skip, length, strict=True)
    ]
    for k, payload in enumerate(want):  # each payload sits where its file bytes were read
        assert staging[s.payload_raw[k] : s.payload_raw[k] + length[k]].tobytes() == (
            payload.tobytes()
        )
    misaligned = s.payload_raw % align != 0
    assert s.needs_packing == bool(misaligned.any())
    # Only the payloads their decoder cannot read where they landed are packed.
    assert np.array_equal(s.payload_offset != s.payload_raw, misaligned)
    assert np.all(s.payload_offset % align == 0)
    if not s.needs_packing:
        return
    packed = np.flatnonzero(misaligned)
    jobs = zip(s.payload_raw[packed], s.payload_offset[packed], length[packed], strict=True)
    for raw, dst, n in jobs:
        staging[dst : dst + n] = staging[raw : raw + n]  # the pack jobs
    assert all(s.payload_offset[k] % ALIGN == 0 for k in packed)
    assert all(s.payload_offset[k] >= s.raw_nbytes for k in packed)
    ends = sorted((int(s.payload_offset[k]), int(length[k])) for k in packed)
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(ends))
    assert s.total_nbytes >= max(a + n for a, n in ends)
    for k in range(len(want)):
        got = staging[s.payload_offset[k] : s.payload_offset[k] + length[k]]
        assert got.tobytes() == want[k].tobytes()


def test_staging_packs_only_a_payload_its_decoder_cannot_read_in_place():
    # Two chunks back to back in one file: the second payload starts at byte 13.
    args = [np.array(a) for a in ([0, 0], [0, 13], [13, 20], [0, 0], [13, 20])]
    s = plan_staging(*args, np.array([4, 4]), max_gap=0)  # raw deflate: 4-byte input
    assert s.read_dst.tolist() == [0] and s.read_nbytes.tolist() == [33]
    assert s.payload_raw.tolist() == [0, 13] and s.needs_packing
    assert s.payload_offset.tolist() == [0, 40] and s.total_nbytes == 64
    # nvCOMP 5.3's zstd, LZ4 and gzip read their input at any offset: no packing.
    s = plan_staging(*args, np.array([1, 1]), max_gap=0)
    assert not s.needs_packing and s.payload_offset.tolist() == [0, 13]
    assert s.total_nbytes == 40


def test_decoded_slots_are_aligned():
    offsets, total = aligned_offsets(np.array([6, 8, 3, 16]))
    assert offsets.tolist() == [0, 8, 16, 24] and total == 40
    offsets, total = aligned_offsets(np.array([], dtype=np.int64))
    assert offsets.tolist() == [] and total == 0


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


# -- the device path, emulated on the CPU ------------------------------------------
def _decode_payload(algorithm: str, payload: bytes, nbytes: int) -> bytes:
    """What nvCOMP's RAW decoder makes of a payload (numcodecs and zlib)."""
    if algorithm == "Zstd":
        out = numcodecs.zstd.decompress(payload)
    elif algorithm == "LZ4":  # numcodecs wants its size prefix back
        out = numcodecs.lz4.decompress(nbytes.to_bytes(4, "little") + payload)
    elif algorithm == "Gzip":
        out = zlib.decompress(payload, wbits=31)
    else:
        raise AssertionError(f"no emulation of nvCOMP {algorithm}")
    assert len(out) == nbytes
    return bytes(out)


def _emulate_device_decode(
    locations: ChunkLocations, desc: BatchDescription, input_align=None
) -> np.ndarray:
    """The decoded buffer's device region as the GPU backend fills it, from the
    description alone: reads into staging, pack jobs, copy jobs, decode groups
    (each payload where its decoder's input alignment allows)."""
    input_align = FALLBACK_INPUT_ALIGN if input_align is None else input_align
    s = desc.staging
    staging = np.full(s.total_nbytes, 0xEE, dtype=np.uint8)  # poison: a wrong offset shows
    for f, start, n, dst in zip(s.read_file, s.read_start, s.read_nbytes, s.read_dst, strict=True):
        with open(locations.paths[f], "rb") as fh:
            fh.seek(start)
            staging[dst : dst + n] = np.frombuffer(fh.read(n), dtype=np.uint8)
    decoded = np.full(max(desc.decoded_nbytes, 8), 0xEE, dtype=np.uint8)
    assert np.all(s.read_dst % ALIGN == 0)
    for src, dst, n in desc.pack_jobs.tolist():
        staging[dst : dst + n] = staging[src : src + n]
    for src, dst, n in desc.copy_jobs.tolist():
        decoded[dst : dst + n] = staging[src : src + n]
    for group in desc.decode_groups:
        ins = zip(group.in_offset.tolist(), group.in_nbytes.tolist(), strict=True)
        outs = zip(group.out_offset.tolist(), group.out_nbytes.tolist(), strict=True)
        for (a, n), (b, m) in zip(ins, outs, strict=True):
            assert a % input_align[group.algorithm] == 0 and b % ALIGN == 0
            raw = _decode_payload(group.algorithm, staging[a : a + n].tobytes(), m)
            decoded[b : b + m] = np.frombuffer(raw, dtype=np.uint8)
    return decoded


def _fill_host_region(group, name, layouts, plan, locations, desc, decoded) -> None:
    """The host region as the GPU backend fills it: numcodecs' chunks and zarr-python's."""
    host_only = np.zeros_like(locations.fast)
    host_only[desc.host_chunks] = True
    host_locations = ChunkLocations(
        locations.file,
        locations.offset,
        locations.nbytes,
        locations.missing,
        host_only,
        locations.paths,
        locations.keys,
        locations.file_var,
    )
    encoded = PosixReader(name).read_chunks(layouts, host_locations)
    decoder = NumcodecsDecoder(name)
    fallback = ZarrPythonChunkSource(group, name)
    for i in [*desc.host_chunks.tolist(), *desc.fallback_chunks.tolist()]:
        layout = layouts[plan.chunk_var[i]]
        slot = int(desc.slots[i])
        assert slot >= desc.device_nbytes and slot % ALIGN == 0
        raw = decoded[slot : slot + layout.chunk_nbytes]
        coords = plan.chunk_coords[i]
        if encoded[i] is None:  # zarr-python's: native byte order
            assert not layout.fast_path
            chunk = fallback.read_decoded(layout, natural_coords(layout, coords))
            raw.view(layout.dtype).reshape(layout.chunk_shape)[...] = chunk
        else:
            out = raw.view(layout.codec.stored_dtype(layout.dtype)).reshape(layout.chunk_shape)
            decoder.decode(layout, coords, memoryview(encoded[i]), out=out)


def _described_batch(group, name, layouts, plan) -> tuple[np.ndarray, GatherTables]:
    """The decoded buffer and gather tables the GPU backend would build for ``plan``."""
    locations = ChunkLocator(name, layouts).locate(plan)
    desc = describe_batch(layouts, plan, locations, store_name=name)
    decoded = _emulate_device_decode(locations, desc)
    _fill_host_region(group, name, layouts, plan, locations, desc, decoded)
    missing = np.flatnonzero(locations.missing)
    assert np.all(desc.slots[missing] == MISSING_SLOT)
    assert np.all(desc.slots[locations.present | ~locations.fast] >= 0)
    return decoded, desc.gather


def _cpu_batch(group, name, layouts, plan) -> np.ndarray:
    from zarrdali.cpu.backend import CpuBackend

    backend = CpuBackend(group, name, 1)
    try:
        return backend.load_batch(layouts, plan)
    finally:
        backend.close()


def _assert_bitwise(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


# -- the kernel's own source, run on the host ---------------------------------------
_HOST_SHIM = r"""
// Just enough of CUDA to run a kernel without barriers on the host, one thread
// after another.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
struct zd_dim3 { unsigned int x, y, z; };
static zd_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
static inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    unsigned char b[8];
    std::memcpy(b, &x, 4);
    std::memcpy(b + 4, &y, 4);
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned int)b[(s >> (4 * i)) & 7] << (8 * i);
    return r;
}
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline double __longlong_as_double(long long u) {
    double d; std::memcpy(&d, &u, 8); return d;
}
// Rounded as their own operations (the host compiler contracts nothing here:
// x86-64's baseline has no fused multiply-add).
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline float __double2float_rn(double d) { return (float)d; }
"""

_HOST_LOAD = r"""
template <typename T> static std::vector<T> load(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (!f) { std::perror(path); std::exit(2); }
    std::fseek(f, 0, SEEK_END);
    long n = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    std::vector<T> v(n / sizeof(T) + 1);
    if (n && std::fread(v.data(), 1, n, f) != (size_t)n) std::exit(3);
    std::fclose(f);
    return v;
}

"""

_HOST_MAIN = (
    _HOST_LOAD
    + r"""
// argv: directory, n_tiles, n_l, n_y, n_x, h, w, out_size, grid_y, block x, block y
int main(int argc, char** argv) {
    if (argc != 12) return 1;
    std::string dir = argv[1];
    int n_tiles = std::atoi(argv[2]), n_l = std::atoi(argv[3]), n_y = std::atoi(argv[4]);
    int n_x = std::atoi(argv[5]), h = std::atoi(argv[6]), w = std::atoi(argv[7]);
    long out_size = std::atol(argv[8]);
    unsigned int gy = std::atoi(argv[9]), tbx = std::atoi(argv[10]), tby = std::atoi(argv[11]);
    auto decoded = load<unsigned char>((dir + "/decoded").c_str());
    auto tiles = load<long long>((dir + "/tiles").c_str());
    auto tile_chunks = load<int>((dir + "/tile_chunks").c_str());
    auto slots = load<long long>((dir + "/chunk_slots").c_str());
    auto variables = load<long long>((dir + "/variables").c_str());
    auto levels = load<long long>((dir + "/levels").c_str());
    std::vector<out_t> out(out_size);
    gridDim = {(unsigned int)n_tiles, gy, 1};
    blockDim = {tbx, tby, 1};
    for (unsigned int bx = 0; bx < gridDim.x; ++bx)
        for (unsigned int by = 0; by < gridDim.y; ++by)
            for (unsigned int ty = 0; ty < blockDim.y; ++ty)
            for (unsigned int tx = 0; tx < blockDim.x; ++tx) {
                blockIdx = {bx, by, 0};
                threadIdx = {tx, ty, 0};
                zarrdali_gather(decoded.data(), tiles.data(), tile_chunks.data(), slots.data(),
                                variables.data(), levels.data(), n_tiles, n_l, n_y, n_x, h, w,
                                out.data());
            }
    FILE* f = std::fopen((dir + "/out").c_str(), "wb");
    std::fwrite(out.data(), sizeof(out_t), out.size(), f);
    std::fclose(f);
    return 0;
}
"""
)


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    """``run(decoded, gather) -> batch``: the gather kernel's CUDA source compiled
    as host C++ and run block by block, thread by thread (None without g++)."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    root = tmp_path_factory.mktemp("host_kernel")
    binaries: dict[str, Path] = {}

    def run(decoded: np.ndarray, gather: GatherTables, launch=None) -> np.ndarray:
        """``launch``: ``(grid_y, block_x, block_y)`` (default: the backend's)."""
        key = np.dtype(gather.out_dtype).str
        if key not in binaries:
            source = root / f"gather{len(binaries)}.cpp"
            source.write_text(
                _HOST_SHIM + "#include <string>\n" + gather_source(gather.out_dtype) + _HOST_MAIN
            )
            binary = root / f"gather{len(binaries)}"
            subprocess.run(
                [compiler, "-O1", "-fno-strict-aliasing", "-o", str(binary), str(source)],
                check=True,
            )
            binaries[key] = binary
        work = root / "run"
        work.mkdir(exist_ok=True)
        decoded.tofile(work / "decoded")
        for field_name, array in zip(
            ("tiles", "tile_chunks", "chunk_slots", "variables", "levels"),
            gather.arrays,
            strict=True,
        ):
            np.ascontiguousarray(array).tofile(work / field_name)
        _, n_l, n_y, n_x = gather.tile_chunks.shape
        h, w = gather.out_shape[-2:]
        size = int(np.prod(gather.out_shape))
        if launch is None:
            launch = (gather_grid_y(gather.max_tile_elements // w, w), *gather_block(w))
        args = [gather.n_tiles, n_l, n_y, n_x, h, w, size, *launch]
        subprocess.run([str(binaries[key]), str(work), *map(str, args)], check=True)
        out = np.fromfile(work / "out", dtype=gather.out_dtype)
        return out.reshape(gather.out_shape)

    return run


def _check_against_cpu(group, name, layouts, plan, host_kernel) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _cpu_batch(group, name, layouts, plan)
        decoded, gather = _described_batch(group, name, layouts, plan)
    _assert_bitwise(gather_reference(decoded, gather), want)
    if host_kernel is not None:
        _assert_bitwise(host_kernel(decoded, gather), want)


@pytest.mark.parametrize("case", list(CASES))
def test_gather_reproduces_cpu_backend(make_store, case, host_kernel):
    kw = CASES[case]
    store = make_store(_spec("a", **kw), _spec("b", **kw, seed=3, fill_value=7))
    _delete_some(store, "b")  # missing chunks (or shards): fill value
    _check_against_cpu(*_plan(store, ["a", "b"]), host_kernel)


@pytest.mark.parametrize("launch", [(1, 1, 1), (1, 4, 2), (2, 2, 64), (3, 32, 8)])
def test_gather_strides_over_rows_and_columns(make_store, host_kernel, launch):
    """Any launch shape covers every element once: fewer block rows than tile
    rows and fewer threads than columns stride, more idle (levels: 3 x 8 rows)."""
    if host_kernel is None:
        pytest.skip("needs g++")
    store = make_store(
        _spec("lv", shape=(NT, 3, NY, NX), chunks=(2, 2, 8, 8), dtype="int16", endian="big"),
        _spec("f", seed=2),
    )
    group, name, layouts, plan = _plan(store, ["lv", "f"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _cpu_batch(group, name, layouts, plan)
        decoded, gather = _described_batch(group, name, layouts, plan)
    _assert_bitwise(host_kernel(decoded, gather, launch), want)
    assert gather_block(8) == (8, 32) and gather_block(128) == (32, 8)
    assert gather_block(1) == (1, 256) and gather_block(33) == (32, 8)


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
    # LZ4 inner chunks of a shard with crc32c: payloads misaligned where read (packing)
    [
        _spec("l4", compressor="lz4", shards=(4, 16, 16), checksum=True),
        _spec("bl", compressor="blosc", shape=(NT, 2, NY, NX), chunks=(2, 1, 8, 8)),
    ],
]
MIXED_STORE_IDS = ["bigendian-levels-crc", "cast", "fallback", "nan-missing", "lz4-crc+blosc"]


@pytest.mark.parametrize("specs", MIXED_STORES, ids=MIXED_STORE_IDS)
def test_gather_reproduces_cpu_backend_mixed(make_store, specs, host_kernel):
    store = make_store(*specs)
    _check_against_cpu(*_plan(store, [s.name for s in specs]), host_kernel)


def test_staging_of_a_sharded_store_packs_only_what_its_decoder_needs(make_store):
    """Sharded zstd inner chunks start at any byte: with the headers' bound
    (8 bytes) they are packed; with what nvCOMP 5.3.0.16's
    ``GetRequiredAlignments`` reports (input 1) they are decoded where read.
    LZ4 (input 1 either way) is never packed."""
    specs = [
        _spec("z", shards=(4, 16, 16)),
        _spec("l4", compressor="lz4", shards=(4, 16, 16), checksum=True, seed=3),
        _spec("bl", compressor="blosc", seed=4),
    ]
    store = make_store(*specs)
    _, name, layouts, plan = _plan(store, ["z", "l4", "bl"])
    locations = ChunkLocator(name, layouts).locate(plan)
    bound = describe_batch(layouts, plan, locations, store_name=name)
    assert bound.staging.needs_packing and len(bound.pack_jobs)
    zstd = next(g for g in bound.decode_groups if g.algorithm == "Zstd")
    lz4 = next(g for g in bound.decode_groups if g.algorithm == "LZ4")
    assert np.any(zstd.in_offset >= bound.staging.raw_nbytes)  # misaligned ones packed
    assert np.all(zstd.in_offset % 8 == 0)
    assert not np.any(lz4.in_offset >= bound.staging.raw_nbytes)  # no LZ4 payload packed
    assert len(bound.host_chunks) and bound.host_nbytes
    assert bound.staging.n_reads < len(bound.device_chunks)  # inner chunks coalesced
    library = {"Zstd": 1, "LZ4": 1, "Gzip": 1, "Deflate": 4}
    desc = describe_batch(layouts, plan, locations, store_name=name, input_align=library)
    assert not desc.staging.needs_packing and not len(desc.pack_jobs)
    assert desc.staging.total_nbytes == desc.staging.raw_nbytes < bound.staging.total_nbytes
    got = _emulate_device_decode(locations, desc, library)
    want = _emulate_device_decode(locations, bound)
    assert got[: desc.device_nbytes].tobytes() == want[: bound.device_nbytes].tobytes()


def test_gather_tables_grow_with_tiles_not_copies(make_store):
    store = make_store(_spec("a"), _spec("b", shape=(NT, 3, NY, NX), chunks=(2, 2, 8, 8)))
    _, name, layouts, plan = _plan(store, ["a", "b"])
    gather = describe_batch(
        layouts, plan, ChunkLocator(name, layouts).locate(plan), store_name=name
    ).gather
    n_tiles = 2 * len(SAMPLES) * 3
    assert gather.tiles.shape == (n_tiles, 5)
    assert gather.tile_chunks.shape == (n_tiles, 2, 2, 2)  # levels, y, x chunks per tile
    assert gather.chunk_slots.shape == (plan.n_chunks,)
    assert gather.variables.shape == (2, N_VAR_FIELDS)
    assert gather.levels.shape == (1 + 3, N_LEVEL_FIELDS)  # a row per channel
    assert plan.n_pieces > n_tiles  # what the old descriptors had one row each for


def test_gather_reference_refuses_a_split_plan(make_store):
    store = make_store(_spec("a"))
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["a"])
    plan = plan_batch(layouts, SAMPLES, n_frames=3, frame_step=1, tile_hw=(8, 8), frame_split=1)
    with pytest.raises(ValueError, match="whole window"):
        describe_batch(layouts, plan, ChunkLocator(name, layouts).locate(plan), store_name=name)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("out", ["f4", "f8", "i2", "u1"])
def test_kernel_sources_compile_with_nvcc(tmp_path, out):
    source = gather_source(np.dtype(out))
    assert "#include" not in source and "#include" not in PACK_SOURCE  # NVRTC: no headers
    assert not re.search(r"\{[A-Z_0-9]+\}", source), "a column placeholder is left"
    assert CTYPES[f"{np.dtype(out).kind}{np.dtype(out).itemsize}"] in source
    for name, text in (("gather", source), ("pack", PACK_SOURCE)):
        path = tmp_path / f"{name}.cu"
        path.write_text(text)
        subprocess.run(
            ["nvcc", "-c", "-arch=sm_90", "-Werror", "all-warnings", "-o", os.devnull, str(path)],
            check=True,
        )


# -- with a GPU -------------------------------------------------------------------
def _gpu_batch(group, name, layouts, plan, **kw):
    from zarrdali.gpu import GpuBackend

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
    # the pinned reader's one staging copy per batch, and Blosc's one decoded copy
    staged = int(backend.read_mode == "pinned" and kw["compressor"] != "blosc")
    assert counts["host_to_device"] == staged + int(kw["compressor"] == "blosc"), counts
    assert backend.io_mode in ("gds", "posix")


DECODES = {
    "capi": dict(decode="capi"),
    "python": dict(decode="python"),
    "python-unconfigured": dict(decode="python", preconfigure=False),
}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "specs",
    [
        *MIXED_STORES,
        [_spec("z", compressor="zstd"), _spec("l", compressor="lz4", shards=(4, 16, 16))],
    ],
    ids=[*MIXED_STORE_IDS, "zstd+lz4"],
)
@pytest.mark.parametrize("decode", list(DECODES))
def test_gpu_matches_cpu_mixed(make_store, specs, decode):
    store = make_store(*specs)
    group, name, layouts, plan = _plan(store, [s.name for s in specs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _cpu_batch(group, name, layouts, plan)
        got, _ = _gpu_batch(group, name, layouts, plan, **DECODES[decode])
    _assert_bitwise(got, want)


@pytest.mark.gpu
def test_gpu_blosc_warns_once_and_names_prepare(make_store):
    from zarrdali.gpu import GpuBackend

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
