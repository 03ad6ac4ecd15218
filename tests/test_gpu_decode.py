"""The decode stage's C API binding and arithmetic, checked without a GPU.

* The ctypes prototypes of :mod:`zarrdali.gpu.decode` against the
  nvCOMP 5.3 headers of the ``nvidia-libnvcomp`` wheel: the header text parsed
  (every parameter's kind), and a C++ program compiled with g++ against the
  headers (function types, ``sizeof``/``offsetof`` of the opts structs, the
  status enum, the default opts being all zeros).
* The temp-size and alignment queries through the real ``libnvcomp.so.5``
  (they run without a device).
* The decode table, the device pointer arithmetic (numpy, as CuPy runs it),
  the per-batch status check and the error naming the bad chunk.
* :class:`BatchedDecoder` on the CPU stand-in of ``fakegpu``: its arrays grow
  and the replaced ones are handed to ``retire``.

Not checked here: a decompression on a device (``tests/test_gpu_engine.py``
with ``-m gpu``).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fakegpu
from storefactory import VarSpec
from zarrdali.batch.locate import ChunkLocator
from zarrdali.batch.plan import plan_batch
from zarrdali.errors import ChunkError
from zarrdali.gpu import decode as d
from zarrdali.gpu.describe import ALIGN, FALLBACK_INPUT_ALIGN, describe_batch
from zarrdali.store.open import load_layouts, open_group


def _include_dir() -> Path | None:
    try:
        from nvidia import libnvcomp
    except ImportError:
        return None
    path = Path(libnvcomp.__file__).parent / "include"
    return path if (path / "nvcomp" / "zstd.h").exists() else None


INCLUDE = _include_dir()


def api_version() -> str | None:
    try:
        from nvidia import libnvcomp
    except ImportError:
        return None
    return libnvcomp.__version__


needs_headers = pytest.mark.skipif(INCLUDE is None, reason="nvidia-libnvcomp is not installed")
HEADERS = {"Zstd": "zstd.h", "LZ4": "lz4.h", "Gzip": "gzip.h", "Deflate": "deflate.h"}
HOST_OUT = {"temp_bytes", "alignment_requirements"}  # host pointers: ctypes POINTER(...)


def _header_params(text: str, function: str) -> list[tuple[str, str]]:
    """``(type, name)`` of each parameter of ``function`` in a header."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    match = re.search(rf"nvcompStatus_t\s+{function}\s*\((.*?)\)\s*;", text, flags=re.S)
    assert match, f"{function} not in the header"
    params = []
    for raw in match.group(1).split(","):
        decl = " ".join(raw.split())
        name = re.findall(r"[A-Za-z_]\w*", decl)[-1]
        params.append((decl[: decl.rindex(name)].strip(), name))
    return params


def _kind_of_header(ctype: str, name: str) -> str:
    if "*" in ctype and name in HOST_OUT:
        return ctype.replace("const", "").replace(" ", "")  # e.g. "size_t*"
    if "*" in ctype or ctype == "cudaStream_t":
        return "ptr"
    return ctype.replace("const", "").strip()  # size_t, or the opts struct's typedef


def _kind_of_ctypes(t) -> str:
    if t is ctypes.c_void_p:
        return "ptr"
    if t is ctypes.c_size_t:
        return "size_t"
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return _STRUCT_NAMES[t]
    if getattr(t, "_type_", None) is ctypes.c_size_t:
        return "size_t*"
    if getattr(t, "_type_", None) is d.AlignmentRequirements:
        return "nvcompAlignmentRequirements_t*"
    raise AssertionError(t)


_STRUCT_NAMES = {
    d.ZstdDecompressOpts: "nvcompBatchedZstdDecompressOpts_t",
    d.LZ4DecompressOpts: "nvcompBatchedLZ4DecompressOpts_t",
    d.GzipDecompressOpts: "nvcompBatchedGzipDecompressOpts_t",
    d.DeflateDecompressOpts: "nvcompBatchedDeflateDecompressOpts_t",
    d.AlignmentRequirements: "nvcompAlignmentRequirements_t",
}


@needs_headers
@pytest.mark.parametrize("algorithm", list(d.DECOMPRESS_OPTS))
def test_prototypes_match_the_headers(algorithm):
    text = (INCLUDE / "nvcomp" / HEADERS[algorithm]).read_text()
    for function, argtypes in d.prototypes(algorithm).items():
        params = _header_params(text, function)
        want = [_kind_of_header(t, n) for t, n in params]
        got = [_kind_of_ctypes(t) for t in argtypes]
        assert got == want, (function, params)


@needs_headers
@pytest.mark.parametrize("algorithm", list(d.DECOMPRESS_OPTS))
def test_opts_fields_match_the_headers(algorithm):
    text = (INCLUDE / "nvcomp" / HEADERS[algorithm]).read_text()
    struct = d.DECOMPRESS_OPTS[algorithm]
    name = _STRUCT_NAMES[struct]
    body = re.search(r"typedef struct\s*\{([^{}]*)\}\s*" + name + ";", text)
    assert body, name
    code = re.sub(r"/\*.*?\*/", " ", body.group(1), flags=re.S)
    fields = re.findall(r"(\w+)\s+(\w+)(\[\d+\])?\s*;", code)
    assert [f[1] for f in fields] == [f[0] for f in struct._fields_]
    assert ctypes.sizeof(struct) == 64


def test_status_names_match_the_header():
    if INCLUDE is None:
        pytest.skip("nvidia-libnvcomp is not installed")
    text = (INCLUDE / "nvcomp" / "shared_types.h").read_text()
    body = re.search(r"typedef enum nvcompStatus_t\s*\{(.*?)\}", text, flags=re.S).group(1)
    values = {int(v): k for k, v in re.findall(r"(nvcomp\w+)\s*=\s*(\d+)", body)}
    assert values == d.STATUS_NAMES


def _cuda_include() -> Path | None:
    for root in (Path("/usr/local/cuda/include"),):
        if (root / "cuda_runtime.h").exists():
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(nvcc).resolve().parent.parent / "include"
        if (root / "cuda_runtime.h").exists():
            return root
    return None


# The C prototypes the binding was written from (decode.py's docstring), as the
# compiler must see them in the headers.
C_FUNCTION_TYPES = {
    "GetTempSizeAsync": "nvcompStatus_t (*)(size_t, size_t, {opts}, size_t*, size_t)",
    "GetRequiredAlignments": "nvcompStatus_t (*)({opts}, nvcompAlignmentRequirements_t*)",
    "Async": (
        "nvcompStatus_t (*)(const void* const*, const size_t*, const size_t*, size_t*, size_t, "
        "void*, size_t, void* const*, {opts}, nvcompStatus_t*, cudaStream_t)"
    ),
}


@needs_headers
def test_binding_compiles_against_the_headers(tmp_path):
    """g++ checks the function types, and prints the opts layouts and enum values."""
    cuda = _cuda_include()
    if shutil.which("g++") is None or cuda is None:
        pytest.skip("needs g++ and the CUDA runtime headers")
    lines = [
        "#include <cstdio>",
        "#include <cstddef>",
        "#include <cstring>",
        "#include <type_traits>",
        *(f'#include "nvcomp/{h}"' for h in HEADERS.values()),
        "int main() {",
    ]
    for algorithm, struct in d.DECOMPRESS_OPTS.items():
        opts = _STRUCT_NAMES[struct]
        for suffix, ftype in C_FUNCTION_TYPES.items():
            fn = f"nvcompBatched{algorithm}Decompress{suffix}"
            lines.append(
                f"static_assert(std::is_same<decltype(&{fn}), "
                f'{ftype.format(opts=opts)}>::value, "{fn}");'
            )
        lines.append(f'std::printf("{opts} %zu\\n", sizeof({opts}));')
        for field, *_ in struct._fields_:
            lines.append(f'std::printf("{opts}.{field} %zu\\n", offsetof({opts}, {field}));')
        default = f"nvcompBatched{algorithm}DecompressDefaultOpts"
        lines.append(f"{{ {opts} zero; std::memset(&zero, 0, sizeof zero);")
        lines.append(
            f'std::printf("{default} %d\\n", std::memcmp(&zero, &{default}, sizeof zero)); }}'
        )
    for field, *_ in d.AlignmentRequirements._fields_:
        lines.append(
            f'std::printf("nvcompAlignmentRequirements_t.{field} %zu\\n", '
            f"offsetof(nvcompAlignmentRequirements_t, {field}));"
        )
    lines.append('std::printf("nvcompStatus_t %zu\\n", sizeof(nvcompStatus_t));')
    for name in d.STATUS_NAMES.values():
        lines.append(f'std::printf("{name} %d\\n", (int){name});')
    lines += ["return 0;", "}"]
    source = tmp_path / "binding.cpp"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp_path / "binding"
    subprocess.run(
        ["g++", "-std=c++17", f"-I{INCLUDE}", f"-I{cuda}", "-o", str(binary), str(source)],
        check=True,
    )
    printed = subprocess.check_output([str(binary)]).decode().splitlines()
    out = dict(line.rsplit(" ", 1) for line in printed if line)
    for struct, name in _STRUCT_NAMES.items():
        assert int(out.get(name, ctypes.sizeof(struct))) == ctypes.sizeof(struct), name
        for field, *_ in struct._fields_:
            assert int(out[f"{name}.{field}"]) == getattr(struct, field).offset, (name, field)
    for algorithm in d.DECOMPRESS_OPTS:
        assert out[f"nvcompBatched{algorithm}DecompressDefaultOpts"] == "0"  # zeros = default
    assert int(out["nvcompStatus_t"]) == ctypes.sizeof(ctypes.c_int32)
    for value, name in d.STATUS_NAMES.items():
        assert int(out[name]) == value


@needs_headers
def test_temp_size_and_alignments_from_the_library():
    """The host-side queries run through the real libnvcomp.so.5 without a device."""
    api = d.NvcompCApi()
    n, chunk = 256, 64 * 1024
    zstd = api.temp_bytes("Zstd", n, chunk, n * chunk)
    assert 2 * n * chunk < zstd < 5 * n * chunk  # about 3x the decompressed bytes
    assert api.temp_bytes("LZ4", n, chunk, n * chunk) == 0
    for algorithm, (inp, out, temp) in api.alignments.items():
        assert ALIGN % out == 0, algorithm  # our 8-byte decoded slots suffice
        assert FALLBACK_INPUT_ALIGN[algorithm] % inp == 0, algorithm  # the fallback bounds it
        assert 256 % temp == 0, algorithm  # CuPy's allocations are 256-byte aligned
    # nvCOMP 5.3.0.16 (the version DALI 2.4 pins): shard inner chunks need no packing
    # for zstd, LZ4 or gzip (what plan.py's packing is sized by).
    if api_version() == "5.3.0.16":
        assert {a: v[0] for a, v in api.alignments.items()} == {
            "Zstd": 1,
            "LZ4": 1,
            "Gzip": 1,
            "Deflate": 4,
        }
    # The binding has its own function objects: the shared CDLL is left alone.
    assert api.lib["nvcompBatchedZstdDecompressAsync"].argtypes is None


# -- the table, the pointers, the check --------------------------------------------------
def _described(make_store, cached_every=0):
    specs = [
        VarSpec("z", shape=(12, 21, 33), chunks=(2, 8, 8)),
        VarSpec("l", shape=(12, 21, 33), chunks=(2, 8, 8), compressor="lz4", shards=(4, 16, 16)),
    ]
    store = make_store(*specs)
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l"])
    samples = np.array([[0, 0, 0], [3, 13, 25], [5, 7, 5]], dtype=np.int64)
    plan = plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    locations = ChunkLocator(name, layouts).locate(plan)
    cached = None
    if cached_every:
        cached = np.full(plan.n_chunks, -1, dtype=np.int64)
        cached[::cached_every] = np.arange(len(cached[::cached_every])) * 4096
    desc = describe_batch(layouts, plan, locations, store_name=name, cached=cached)
    return layouts, plan, desc, cached


@pytest.mark.parametrize("cached_every", [0, 3])
def test_decode_table_concatenates_the_groups(make_store, cached_every):
    _, _, desc, cached = _described(make_store, cached_every)
    groups = desc.decode_groups
    table, bounds = d.decode_table(groups)
    assert [g.algorithm for g in groups] == ["LZ4", "Zstd"]
    assert table.shape == (d.N_ROWS, bounds[-1]) and table.dtype == np.int64
    for g, group in enumerate(groups):
        cols = table[:, bounds[g] : bounds[g + 1]]
        assert cols[d.ROW_SOURCE].tolist() == group.in_source.tolist()
        assert cols[d.ROW_IN_OFFSET].tolist() == group.in_offset.tolist()
        assert cols[d.ROW_IN_NBYTES].tolist() == group.in_nbytes.tolist()
        assert cols[d.ROW_OUT_OFFSET].tolist() == group.out_offset.tolist()
        assert cols[d.ROW_OUT_NBYTES].tolist() == group.out_nbytes.tolist()
        hit = group.in_source == d.IN_CACHE
        if cached is None:
            assert not hit.any()
        else:  # cached payloads are decoded from the arena offset the cache gave
            assert hit.any()
            assert group.in_offset[hit].tolist() == cached[group.chunks[hit]].tolist()
    for g, group in enumerate(groups):  # where the decoder can read them (the default bounds)
        cols = table[:, bounds[g] : bounds[g + 1]]
        assert np.all(cols[d.ROW_IN_OFFSET] % FALLBACK_INPUT_ALIGN[group.algorithm] == 0)
    assert np.all(table[d.ROW_OUT_OFFSET] % ALIGN == 0)
    staged = table[d.ROW_SOURCE] == d.IN_STAGING
    assert np.all(table[d.ROW_IN_OFFSET][staged] < desc.staging.total_nbytes)


@pytest.mark.parametrize(
    "bases", [(0x7F00_0000_0000, 0x7E00_0000_0000), (0x1000, 0xFFFF_FFFF_0000_0000)]
)
def test_device_pointers(make_store, bases):
    _, _, desc, _ = _described(make_store, 2)
    table, _ = d.decode_table(desc.decode_groups)
    out_base = 0x7D00_0000_0100
    ptrs = d.device_pointers(np, table, bases, out_base)
    assert ptrs.dtype == np.uint64 and ptrs.shape == (2, table.shape[1])
    src = table[d.ROW_SOURCE]
    want_in = [
        bases[s] + o for s, o in zip(src.tolist(), table[d.ROW_IN_OFFSET].tolist(), strict=True)
    ]
    assert ptrs[0].tolist() == want_in  # including a cache base below the staging base
    assert ptrs[1].tolist() == [out_base + o for o in table[d.ROW_OUT_OFFSET].tolist()]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 0, 0, 12, 15]), st.integers(0, 3)), max_size=40))
def test_first_bad(rows):
    n = len(rows)
    statuses = np.array([r[0] for r in rows], dtype=np.int32)
    expected = np.full(n, 2, dtype=np.uint64)
    actual = np.array([r[1] for r in rows], dtype=np.uint64)
    got = d.first_bad(np, statuses, actual, expected)
    bad = [i for i, (s, a) in enumerate(rows) if s != 0 or a != 2]
    assert got.dtype == np.int64
    assert got.tolist() == [bad[0] if bad else n, len(bad)]


def test_bad_chunk_error_names_array_and_key(make_store):
    layouts, plan, desc, _ = _described(make_store)
    groups = desc.decode_groups
    _, bounds = d.decode_table(groups)
    index = int(bounds[1]) + 2  # third chunk of the second group (Zstd)
    err = d.bad_chunk_error("s", layouts, plan, groups, bounds, index, 3, 12, 0)
    row = int(groups[1].chunks[2])
    layout = layouts[int(plan.chunk_var[row])]
    assert isinstance(err, ChunkError) and err.array == "z" == layout.name
    assert err.key == layout.describe_chunk(plan.chunk_coords_of(layouts, row))
    assert "nvcompErrorCannotDecompress" in str(err) and "3 bad chunk(s)" in str(err)
    err = d.bad_chunk_error("s", layouts, plan, groups, bounds, index, 3, 0, 17)
    assert f"decoded 17 bytes, the chunk has {int(groups[1].out_nbytes[2])}" in str(err)
    err = d.bad_chunk_error("s", layouts, plan, groups, bounds, 0, 5, 10, 0, refused=True)
    assert err.array == "l" and "refused" in str(err) and "nvcompErrorInvalidValue" in str(err)


# -- the decoder's arrays ---------------------------------------------------------------
@needs_headers
def test_batched_decoder_grows_and_retires(make_store, monkeypatch):
    cuda = fakegpu.install(monkeypatch)
    cuda.api.cuda = None  # the status plumbing alone: corrupt input is not a device fault here
    cp = cuda.cupy
    retired: list[list] = []
    temp = d.DecodeTemp(cp)
    decoder = d.BatchedDecoder(
        cp, cuda.api, retired.append, temp, empty_pinned=cuda.cupyx.empty_pinned
    )
    layouts, plan, desc, _ = _described(make_store)
    groups = desc.decode_groups
    table, bounds = d.decode_table(groups)
    stream = cp.cuda.Stream()
    # Payloads nowhere valid: every chunk fails, which the check reports.
    staging = cp.zeros(max(desc.staging.total_nbytes, 8), dtype=cp.uint8)
    decoded = cp.empty(desc.decoded_nbytes, dtype=cp.uint8)

    def explain(*args, **kw):
        return d.bad_chunk_error("s", layouts, plan, groups, bounds, *args, **kw)

    with stream:
        bases = (staging.data.ptr, 0)
        check, _ = decoder.decode(
            groups, cp.asarray(table), bounds, bases, decoded.data.ptr, stream, explain
        )
    assert [c[:2] for c in cuda.api.calls] == [(g.algorithm, len(g.chunks)) for g in groups]
    zstd_temp = next(c[2] for c in cuda.api.calls if c[0] == "Zstd")
    assert zstd_temp >= cuda.api.temp_bytes("Zstd", len(groups[1].chunks), 1, 1)
    with pytest.raises(ChunkError, match="bad chunk"):
        check.raise_if_bad()
    assert not retired
    first = decoder._statuses
    bigger = np.concatenate([table] * 300, axis=1)  # more chunks than the arrays hold
    big_bounds = np.array([0, bigger.shape[1]])
    with stream:
        bases = (staging.data.ptr, 0)
        decoder.decode(
            groups[1:], cp.asarray(bigger), big_bounds, bases, decoded.data.ptr, stream, explain
        )
    assert retired and any(b is first for b in retired[0])
    decoder.close()
    assert decoder._statuses is None and temp.nbytes > 0
    temp.close()
    assert temp.nbytes == 0


# -- crc32c on the device: nvCOMP's batched CRC32 ---------------------------------------
CRC32_KINDS = {
    "nvcompBatchedCRC32Async": [
        "ptr", "ptr", "size_t", "ptr", "nvcompBatchedCRC32Opts_t", "nvcompCRC32SegmentKind_t",
        "ptr", "ptr",
    ],
    "nvcompBatchedCRC32GetHeuristicConf": [
        "ptr", "size_t", "nvcompCRC32KernelConf_t*", "size_t", "ptr",
    ],
}  # fmt: skip
_CRC_CTYPES = {
    ctypes.c_void_p: "ptr",
    ctypes.c_size_t: "size_t",
    d.BatchedCRC32Opts: "nvcompBatchedCRC32Opts_t",
    ctypes.c_int: "nvcompCRC32SegmentKind_t",  # an enum: a C int
}


@needs_headers
def test_crc32_prototypes_match_the_header():
    text = (INCLUDE / "nvcomp" / "crc32.h").read_text()
    for function, argtypes in d.CRC32_PROTOTYPES.items():
        params = _header_params(text, function)
        kinds = []
        for ctype, name in params:
            if ctype.replace("const", "").strip() in (
                "nvcompBatchedCRC32Opts_t",
                "nvcompCRC32SegmentKind_t",
                "size_t",
            ):
                kinds.append(ctype.replace("const", "").strip())
            elif name == "kernel_conf":  # a host pointer the function writes
                kinds.append("nvcompCRC32KernelConf_t*")
            else:
                assert "*" in ctype or ctype == "cudaStream_t", (function, ctype)
                kinds.append("ptr")
        assert kinds == CRC32_KINDS[function], (function, params)
        got = [
            "nvcompCRC32KernelConf_t*"
            if getattr(t, "_type_", None) is d.CRC32KernelConf
            else _CRC_CTYPES[t]
            for t in argtypes
        ]
        assert got == kinds, function


@needs_headers
def test_crc32_binding_compiles_against_the_header(tmp_path):
    """g++: the function types, the three structs' sizes and offsets, the
    CRC32-C preset's fields and the enum values the binding passes."""
    cuda = _cuda_include()
    if shutil.which("g++") is None or cuda is None:
        pytest.skip("needs g++ and the CUDA runtime headers")
    lines = [
        "#include <cstdio>",
        "#include <cstddef>",
        "#include <type_traits>",
        '#include "nvcomp/crc32.h"',
        "int main() {",
        "static_assert(std::is_same<decltype(&nvcompBatchedCRC32Async), nvcompStatus_t (*)("
        "const void* const*, const size_t*, size_t, uint32_t*, nvcompBatchedCRC32Opts_t, "
        'nvcompCRC32SegmentKind_t, nvcompStatus_t*, cudaStream_t)>::value, "Async");',
        "static_assert(std::is_same<decltype(&nvcompBatchedCRC32GetHeuristicConf), "
        "nvcompStatus_t (*)(const size_t*, size_t, nvcompCRC32KernelConf_t*, size_t, "
        'cudaStream_t)>::value, "GetHeuristicConf");',
        'std::printf("segment_kind %zu\\n", sizeof(nvcompCRC32SegmentKind_t));',
        'std::printf("nvcompCRC32OnlySegment %d\\n", (int)nvcompCRC32OnlySegment);',
        'std::printf("c.poly %u\\n", nvcompCRC32_C.poly);',
        'std::printf("c.init %u\\n", nvcompCRC32_C.init);',
        'std::printf("c.ref_in %d\\n", (int)nvcompCRC32_C.ref_in);',
        'std::printf("c.ref_out %d\\n", (int)nvcompCRC32_C.ref_out);',
        'std::printf("c.xorout %u\\n", nvcompCRC32_C.xorout);',
    ]
    structs = {
        d.CRC32Spec: "nvcompCRC32Spec_t",
        d.CRC32KernelConf: "nvcompCRC32KernelConf_t",
        d.BatchedCRC32Opts: "nvcompBatchedCRC32Opts_t",
    }
    for struct, name in structs.items():
        lines.append(f'std::printf("{name} %zu\\n", sizeof({name}));')
        for field, *_ in struct._fields_:
            lines.append(f'std::printf("{name}.{field} %zu\\n", offsetof({name}, {field}));')
    lines += ["return 0;", "}"]
    source = tmp_path / "crc.cpp"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp_path / "crc"
    subprocess.run(
        ["g++", "-std=c++17", f"-I{INCLUDE}", f"-I{cuda}", "-o", str(binary), str(source)],
        check=True,
    )
    out = dict(
        line.rsplit(" ", 1)
        for line in subprocess.check_output([str(binary)]).decode().split("\n")
        if line
    )
    for struct, name in structs.items():
        assert int(out[name]) == ctypes.sizeof(struct), name
        for field, *_ in struct._fields_:
            assert int(out[f"{name}.{field}"]) == getattr(struct, field).offset, (name, field)
    assert ctypes.sizeof(d.BatchedCRC32Opts) == 128
    assert int(out["segment_kind"]) == ctypes.sizeof(ctypes.c_int)
    assert int(out["nvcompCRC32OnlySegment"]) == d.CRC32_ONLY_SEGMENT
    assert {k: int(out[f"c.{k}"]) for k in d.CRC32_C} == {k: int(v) for k, v in d.CRC32_C.items()}


@needs_headers
def test_crc32_calls_reach_the_library_without_a_device():
    """Through the real libnvcomp.so.5: both functions are bound and, without a
    device, answer nvcompErrorCudaError (the 128-byte opts passed by value)."""
    import numpy as np

    api = d.NvcompCApi()
    with pytest.raises(RuntimeError, match="nvcompErrorCudaError"):
        api.crc32_conf(4, 1 << 16)
    data = np.frombuffer(b"123456789", np.uint8)
    ptrs, sizes = np.array([data.ctypes.data], np.uint64), np.array([9], np.uint64)
    out, statuses = np.zeros(1, np.uint32), np.full(1, -1, np.int32)
    conf = d.CRC32KernelConf(kernel_kind=0, bytes_per_read=4, blocks_per_msg=1)
    status = api._call(
        "nvcompBatchedCRC32Async", ptrs.ctypes.data, sizes.ctypes.data, 1, out.ctypes.data,
        d.crc32c_opts(conf), d.CRC32_ONLY_SEGMENT, statuses.ctypes.data, None,
    )  # fmt: skip
    assert d.status_name(status) == "nvcompErrorCudaError"


@needs_headers
def test_the_stand_ins_twin_computes_crc32c_as_the_cpu_path():
    """The CPU stand-in's CRC32 (``fakegpu``) through the binding's own opts:
    CRC32-C checksums as the ``crc32c`` package (the CPU path's) computes them;
    the check value of "123456789" is 0xE3069283."""
    import crc32c

    api = fakegpu.FakeCApi()
    chunks = [b"123456789", b"", bytes(range(256)) * 5]
    bufs = [np.frombuffer(c or b"\0", np.uint8) for c in chunks]
    ptrs = np.array([b.ctypes.data for b in bufs], np.uint64)
    sizes = np.array([len(c) for c in chunks], np.uint64)
    out, statuses = np.zeros(3, np.uint32), np.full(3, -1, np.int32)
    status = api.crc32(
        ptrs.ctypes.data, sizes.ctypes.data, 3, out.ctypes.data, statuses.ctypes.data, 0, 1280
    )
    assert status == 0 and statuses.tolist() == [0, 0, 0]
    assert out.tolist() == [crc32c.crc32c(c) for c in chunks]
    assert out[0] == 0xE3069283


def test_stand_ins_decode_to_one_byte():
    """What the decoder reads in place of a chunk that fails its crc32c: a valid
    stream of its algorithm, decoding to one byte (so the size check flags it
    too), laid out aligned for every decoder's input alignment."""
    import zlib

    import numcodecs

    assert numcodecs.zstd.decompress(d.STAND_INS["Zstd"]) == b"\0"
    assert numcodecs.lz4.decompress((1).to_bytes(4, "little") + d.STAND_INS["LZ4"]) == b"\0"
    assert zlib.decompress(d.STAND_INS["Gzip"], wbits=31) == b"\0"
    assert zlib.decompress(d.STAND_INS["Deflate"], wbits=-15) == b"\0"
    blob, where = d.stand_in_layout()
    assert set(where) == set(d.DECOMPRESS_OPTS)
    for algorithm, (offset, n) in where.items():
        assert blob[offset : offset + n] == d.STAND_INS[algorithm]
        assert offset % max(FALLBACK_INPUT_ALIGN.values()) == 0


def test_crc_table_maps_checked_chunks_to_their_decode_columns(make_store):
    """The crc32c jobs of a batch: each checked chunk's staged bytes, its decode
    column (-1 for an uncompressed one) and its algorithm's stand-in."""
    specs = [
        VarSpec("z", shape=(12, 21, 33), chunks=(2, 8, 8), checksum=True),
        VarSpec("l", shape=(12, 21, 33), chunks=(2, 8, 8), compressor="lz4", checksum=True),
        VarSpec("n", shape=(12, 21, 33), chunks=(2, 8, 8), compressor="none", checksum=True),
        VarSpec("g", shape=(12, 21, 33), chunks=(2, 8, 8), compressor="gzip"),  # no crc32c
    ]
    store = make_store(*specs)
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["z", "l", "n", "g"])
    samples = np.array([[0, 0, 0], [3, 13, 25]], dtype=np.int64)
    plan = plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    locations = ChunkLocator(name, layouts).locate(plan)
    desc = describe_batch(layouts, plan, locations, store_name=name)
    groups = desc.decode_groups
    _, bounds = d.decode_table(groups)
    table = d.crc_table(desc.crc_jobs, groups, bounds)
    checked = np.isin(plan.chunk_var[desc.crc_chunks], [0, 1, 2])
    assert checked.all() and len(desc.crc_chunks) == int(np.isin(plan.chunk_var, [0, 1, 2]).sum())
    _, where = d.stand_in_layout()
    for k, row in enumerate(desc.crc_chunks.tolist()):
        var = int(plan.chunk_var[row])
        assert table[d.CRC_NBYTES, k] == locations.nbytes[row] - 4
        column = int(table[d.CRC_COLUMN, k])
        if var == 2:  # uncompressed: checked, decoded by no one
            assert column == -1
            continue
        g = int(np.searchsorted(bounds, column, side="right")) - 1
        assert groups[g].chunks[column - bounds[g]] == row
        algorithm = groups[g].algorithm
        assert tuple(table[d.CRC_STAND_IN : d.CRC_STAND_IN_NBYTES + 1, k]) == where[algorithm]
    # cached payloads (read by an earlier batch, checked then) are not checked again
    compressed = desc.crc_chunks[plan.chunk_var[desc.crc_chunks] < 2]
    cached = np.full(plan.n_chunks, -1, dtype=np.int64)
    cached[compressed[::2]] = np.arange(len(compressed[::2])) * 4096
    again = describe_batch(layouts, plan, locations, store_name=name, cached=cached)
    assert not np.isin(again.crc_chunks, compressed[::2]).any()
    assert np.isin(desc.crc_chunks, np.concatenate([again.crc_chunks, compressed[::2]])).all()
    again_groups = again.decode_groups
    for group in again_groups:  # a cached payload: no crc32c row
        hit = group.in_source == d.IN_CACHE
        assert (group.crc_row[hit] == -1).all()
        checked = plan.chunk_var[group.chunks[~hit]] < 2  # "g" carries no crc32c
        assert ((group.crc_row[~hit] >= 0) == checked).all()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0, 0, 12]), st.integers(1, 3)), max_size=20),
    st.lists(st.sampled_from([0, 0, 1]), max_size=20),
)
def test_batch_check(rows, crc):
    n = len(rows)
    statuses = np.array([r[0] for r in rows], dtype=np.int32)
    actual = np.array([r[1] for r in rows], dtype=np.uint64)
    expected = np.full(n, 2, dtype=np.uint64)
    crc_bad = np.array(crc, dtype=np.int32)
    got = d.batch_check(np, statuses, actual, expected, crc_bad).tolist()
    bad = [i for i, (s, a) in enumerate(rows) if s != 0 or a != 2]
    assert got[d.CHECK_FIRST : d.CHECK_COUNT + 1] == ([bad[0], len(bad)] if bad else [n, 0])
    if bad:
        assert got[d.CHECK_STATUS] == rows[bad[0]][0] and got[d.CHECK_ACTUAL] == rows[bad[0]][1]
    failed = [i for i, c in enumerate(crc) if c]
    want = [failed[0], len(failed)] if failed else [len(crc) if crc else 0, 0]
    assert got[d.CHECK_CRC_FIRST : d.CHECK_CRC_COUNT + 1] == want
