"""Host-side planning for the GPU backend. Pure numpy: no GPU, no I/O.

Everything the device work of one batch needs is computed here on the host, as
plain integers the CUDA kernels and nvCOMP consume:

* where each chunk's encoded bytes land in the batch's device staging buffer
  (coalesced reads, each read at an 8-byte-aligned offset) and where its
  *payload* (the bytes the decompressor sees: numcodecs' LZ4 size prefix and a
  trailing crc32c stripped) is then packed, each payload 8-byte aligned;
* where each decoded chunk lives in the batch's decoded buffer (8-byte aligned
  slots);
* one int64 descriptor row per :class:`~zarrdali.chunkplan.TileCopy`, which the
  gather kernel in :mod:`zarrdali.backends.gpu` executes.

:func:`gather_reference` executes the descriptors with numpy exactly as the
kernel does; the CPU test suite checks it against the CPU assembler, which
validates the encoding the kernel consumes on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..batchplan import BatchPlan as BatchReadPlan
from ..codecs import ChunkCodec
from .ranges import coalesce

ALIGN = 8  # nvCOMP zstd needs 8-byte-aligned input and output buffers

# nvCOMP algorithm names (``nvidia.nvcomp.Codec(algorithm=...)``) for the
# compressors it decodes. "none" needs no decoder (a device-to-device copy);
# "deflate" is listed for raw-deflate chains, which codecs.py does not parse yet.
NVCOMP_ALGORITHMS = {"zstd": "Zstd", "lz4": "LZ4", "gzip": "Gzip", "deflate": "Deflate"}
DEVICE_DECODABLE = frozenset({"none", *NVCOMP_ALGORITHMS})

# -- descriptor layout (one int64 row per copy) -------------------------------
D_SLOT = 0  # byte offset of the source chunk in the decoded buffer
D_SRC0 = 1  # first source element, in elements from the slot start
D_SRC_STRIDES = slice(2, 5)  # source strides (level, y, x), elements
D_DST0 = 5  # first destination element in the flat [B, T, C, H, W] output
D_DST_STRIDES = slice(6, 9)  # destination strides (channel/level, y, x), elements
D_EXTENT = slice(9, 12)  # extents (level, y, x)
D_CODE = 12  # source dtype code (DTYPE_CODES)
D_FLAGS = 13  # FLAG_SWAP | FLAG_MISSING
D_FILL = 14  # fill value bit pattern in the output dtype (little-endian, zero-padded)
D_ITEMSIZE = 15  # source itemsize in bytes
N_FIELDS = 16

FLAG_SWAP = 1  # the source bytes are big-endian: swap them while loading
FLAG_MISSING = 2  # the chunk does not exist: write the fill value

# Source dtypes the gather kernel loads (keyed by kind + itemsize).
DTYPE_CODES = {
    "i1": 0,
    "u1": 1,
    "i2": 2,
    "u2": 3,
    "i4": 4,
    "u4": 5,
    "i8": 6,
    "u8": 7,
    "f4": 8,
    "f8": 9,
    "b1": 1,  # bool loads as uint8 (0/1)
}
# C type of each output dtype in the kernel source.
CTYPES = {
    "i1": "signed char",
    "u1": "unsigned char",
    "b1": "unsigned char",
    "i2": "short",
    "u2": "unsigned short",
    "i4": "int",
    "u4": "unsigned int",
    "i8": "long long",
    "u8": "unsigned long long",
    "f4": "float",
    "f8": "double",
}


def dtype_key(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    return f"{dtype.kind}{dtype.itemsize}"


def dtype_code(dtype: np.dtype) -> int:
    key = dtype_key(dtype)
    if key not in DTYPE_CODES:
        raise NotImplementedError(
            f"the GPU gather kernel does not load dtype {np.dtype(dtype)}; use device='cpu'"
        )
    return DTYPE_CODES[key]


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def payload_bounds(codec: ChunkCodec, nbytes: int) -> tuple[int, int]:
    """``(skip, length)``: the decompressor's input inside a chunk's stored bytes.

    numcodecs' LZ4 prepends the decoded size (4 bytes, little-endian) to a raw
    LZ4 block; a crc32c codec appends 4 bytes. nvCOMP sees neither.
    """
    skip = 4 if codec.compressor == "lz4" else 0
    tail = 4 if codec.has_crc32c else 0
    length = nbytes - skip - tail
    if length < 0:
        raise ValueError(f"a {nbytes}-byte chunk is too short for its codec {codec}")
    return skip, length


def fill_bits(fill_value: object, source: np.dtype, out: np.dtype) -> int:
    """The fill value as the CPU path produces it (stored dtype, then cast to the
    batch dtype), as a signed int64 holding its little-endian bytes."""
    value = np.array(fill_value, dtype=np.dtype(source).newbyteorder("=")).astype(out)
    raw = value.astype(np.dtype(out).newbyteorder("<")).tobytes().ljust(8, b"\0")
    return int(np.frombuffer(raw, dtype="<i8")[0])


# -- staging: where encoded bytes and payloads go -----------------------------
@dataclass(frozen=True)
class EncodedChunk:
    """One stored chunk to read: ``nbytes`` at ``offset`` of ``path``."""

    position: int  # caller's index (e.g. position in the batch's chunk list)
    path: str
    offset: int
    nbytes: int
    skip: int  # payload starts this many bytes into the stored chunk
    length: int  # payload length


@dataclass(frozen=True)
class StagedRead:
    """One ``pread`` of ``[file_offset, file_offset + nbytes)`` into ``staging[dst:]``."""

    path: str
    file_offset: int
    nbytes: int
    dst: int


@dataclass(frozen=True)
class StagingPlan:
    reads: list[StagedRead]
    raw_nbytes: int  # bytes of the read area (aligned)
    payload_raw: dict[int, int]  # position -> payload offset in the read area
    payload_packed: dict[int, int]  # position -> payload offset once packed (aligned)
    packed_nbytes: int  # bytes of the packed area (0 when no packing is needed)
    needs_packing: bool  # some payload is not aligned where it was read

    def payload_offset(self, position: int) -> int:
        """Where nvCOMP reads chunk ``position``'s payload, relative to the staging start."""
        if self.needs_packing:
            return self.raw_nbytes + self.payload_packed[position]
        return self.payload_raw[position]

    @property
    def total_nbytes(self) -> int:
        return self.raw_nbytes + (self.packed_nbytes if self.needs_packing else 0)


def plan_staging(
    chunks: Sequence[EncodedChunk], max_gap: int = 64 * 1024, align: int = ALIGN
) -> StagingPlan:
    """Coalesce the reads per file and lay them out in one staging buffer.

    Each coalesced read starts at an ``align``-ed offset. A read spanning several
    inner chunks keeps their file layout, so payloads inside it may be
    misaligned; then every payload also gets an aligned slot in a packed area
    after the read area, filled by one device-side copy kernel.
    """
    by_file: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        by_file.setdefault(c.path, []).append(i)
    reads: list[StagedRead] = []
    payload_raw: dict[int, int] = {}
    pos = 0
    for path, members in by_file.items():
        ranges = [(chunks[i].offset, chunks[i].nbytes) for i in members]
        for read in coalesce(ranges, max_gap):
            reads.append(StagedRead(path, read.start, read.nbytes, pos))
            for m in read.members:
                c = chunks[members[m]]
                payload_raw[c.position] = pos + (c.offset - read.start) + c.skip
            pos = align_up(pos + read.nbytes, align)
    payload_packed: dict[int, int] = {}
    packed = 0
    for c in chunks:
        payload_packed[c.position] = packed
        packed = align_up(packed + max(c.length, 1), align)
    needs = any(off % align for off in payload_raw.values())
    return StagingPlan(reads, pos, payload_raw, payload_packed, packed, needs)


def decoded_slots(nbytes: Sequence[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Aligned offsets of consecutive slots of ``nbytes`` each, and the total size."""
    offsets, pos = [], 0
    for n in nbytes:
        offsets.append(pos)
        pos = align_up(pos + n, align)
    return offsets, pos


# -- gather descriptors -------------------------------------------------------
def _c_strides(shape: Sequence[int]) -> list[int]:
    strides, s = [], 1
    for n in reversed(shape):
        strides.append(s)
        s *= n
    return strides[::-1]


def _box(index: tuple, shape: Sequence[int]) -> tuple[int, list[tuple[int, int]]]:
    """Start element and ``(extent, stride)`` of each sliced axis of ``array[index]``."""
    strides = _c_strides(shape)
    start, axes = 0, []
    for i, stride, n in zip(index, strides, shape, strict=True):
        if isinstance(i, slice):
            lo, hi, step = i.indices(n)
            if step != 1:
                raise ValueError(f"strided slice {i} in a tile copy")
            start += lo * stride
            axes.append((max(hi - lo, 0), stride))
        else:
            start += int(i) * stride
    return start, axes


def build_descriptors(
    plan: BatchReadPlan,
    chunk_shapes: Sequence[tuple[int, ...]],
    source_dtypes: Sequence[np.dtype],
    swap: Sequence[bool],
    missing: Sequence[bool],
    slots: Sequence[int],
    fills: Sequence[int],
) -> np.ndarray:
    """``[n_copies, N_FIELDS]`` int64: the gather kernel's work list for ``plan``.

    Per chunk ``i`` of ``plan.chunks``: its (full) shape, the dtype its decoded
    bytes hold, whether they are big-endian (swap), whether it is missing, its
    byte offset in the decoded buffer and its fill bits (:func:`fill_bits`).
    """
    desc = np.zeros((len(plan.copies), N_FIELDS), dtype=np.int64)
    codes = [dtype_code(d) for d in source_dtypes]
    for k, copy in enumerate(plan.copies):
        i = copy.chunk
        src0, src_axes = _box(copy.src, chunk_shapes[i])
        dst0, dst_axes = _box(copy.dst, plan.out_shape)
        if len(src_axes) != len(dst_axes) or len(src_axes) > 3:
            raise ValueError(f"copy {copy} has mismatched sliced axes")
        if [e for e, _ in src_axes] != [e for e, _ in dst_axes]:
            raise ValueError(f"copy {copy} has mismatched extents")
        pad = [(1, 0)] * (3 - len(src_axes))
        src_axes, dst_axes = pad + src_axes, pad + dst_axes
        row = desc[k]
        row[D_SLOT] = slots[i]
        row[D_SRC0] = src0
        row[D_SRC_STRIDES] = [s for _, s in src_axes]
        row[D_DST0] = dst0
        row[D_DST_STRIDES] = [s for _, s in dst_axes]
        row[D_EXTENT] = [e for e, _ in src_axes]
        row[D_CODE] = codes[i]
        row[D_FLAGS] = (FLAG_SWAP if swap[i] else 0) | (FLAG_MISSING if missing[i] else 0)
        row[D_FILL] = fills[i]
        row[D_ITEMSIZE] = np.dtype(source_dtypes[i]).itemsize
    return desc


_CODE_DTYPES = {v: np.dtype(k) for k, v in DTYPE_CODES.items() if k != "b1"}


def gather_reference(
    decoded: np.ndarray, desc: np.ndarray, out_shape: tuple[int, ...], out_dtype: np.dtype
) -> np.ndarray:
    """What the gather kernel computes, in numpy (the CPU oracle of the encoding).

    ``decoded`` is the uint8 decoded buffer; each descriptor row is executed
    element by element the way the kernel does (load with optional byte swap,
    C cast to the output dtype, or the fill bits for a missing chunk).
    """
    out = np.empty(int(np.prod(out_shape)), dtype=out_dtype)
    for row in desc.tolist():
        nl, ny, nx = row[D_EXTENT]
        idx = np.indices((nl, ny, nx)).reshape(3, -1)
        dst = row[D_DST0] + sum(a * s for a, s in zip(idx, row[D_DST_STRIDES], strict=True))
        if row[D_FLAGS] & FLAG_MISSING:
            raw = int(row[D_FILL]).to_bytes(8, "little", signed=True)
            fill = np.frombuffer(raw[: out.itemsize], dtype=np.dtype(out_dtype).newbyteorder("<"))
            out[dst] = fill[0]
            continue
        src = row[D_SRC0] + sum(a * s for a, s in zip(idx, row[D_SRC_STRIDES], strict=True))
        dtype = _CODE_DTYPES[row[D_CODE]]
        if row[D_FLAGS] & FLAG_SWAP:
            dtype = dtype.newbyteorder(">")
        item = row[D_ITEMSIZE]
        base = row[D_SLOT]
        starts = base + src * item
        raw = decoded[starts[:, None] + np.arange(item)[None, :]].reshape(-1)
        out[dst] = np.frombuffer(raw.tobytes(), dtype=dtype).astype(out_dtype)
    return out.reshape(out_shape)


def chunk_sources(
    layouts: Sequence,
    plan: BatchReadPlan,
    native: set[int],
    out_dtype: np.dtype,
) -> tuple[list[tuple[int, ...]], list[np.dtype], list[bool], list[int]]:
    """Per chunk of ``plan``: shape, dtype its decoded bytes hold (native order),
    whether they are big-endian, and its fill bits in ``out_dtype``.

    Chunks at positions in ``native`` were decoded by zarr-python (native byte
    order); the others hold the bytes the codec chain stores (``bytes`` codec's
    endianness).
    """
    shapes, dtypes, swap, fills = [], [], [], []
    for i, c in enumerate(plan.chunks):
        layout = layouts[c.var]
        stored = layout.dtype if i in native else layout.codec.stored_dtype(layout.dtype)
        shapes.append(tuple(layout.chunk_shape))
        dtypes.append(stored.newbyteorder("="))
        swap.append(stored.itemsize > 1 and stored.byteorder == ">")
        fills.append(fill_bits(layout.fill_value, layout.dtype, out_dtype))
    return shapes, dtypes, swap, fills
