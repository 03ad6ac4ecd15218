"""Host-side planning for the GPU backend. Pure numpy: no GPU, no I/O.

:func:`describe_batch` turns a batch's :class:`~zarrdali.batch.plan.BatchPlan`
and its :class:`~zarrdali.batch.locate.ChunkLocations` into everything the
device work needs, as arrays (loops run over variables and algorithms only):

* **staging**: the coalesced reads of the chunks decoded on the device (but
  those the GPU chunk cache holds: ``cached``), each at
  an 8-byte-aligned offset of one staging buffer, and where each chunk's
  *payload* (what the decompressor sees: numcodecs' LZ4 size prefix and a
  trailing crc32c stripped) lies in it; a payload that lands there at an
  offset its nvCOMP decoder does not accept (the library's input alignment:
  1 byte for zstd, LZ4 and gzip in nvCOMP 5.3, so only raw deflate ever
  needs it) gets an aligned slot in a packed area after the reads;
* **decode groups**: per nvCOMP algorithm, each chunk's payload (in staging or
  in the cache's arena), its decoded slot and both sizes;
* **decoded slots**: where each decoded chunk lives in the batch's decoded
  buffer (8-byte aligned): the device-decoded region first, then the region
  the host fills (Blosc chunks, zarr-python's fallback), one copy to the device;
* **the gather tables** (:class:`GatherTables`) the gather kernel of
  :mod:`zarrdali.gpu.kernels` reads: one row per tile (variable, sample,
  frame), the plan's ``tile_chunks``, one slot per chunk and one row per
  variable. What crosses to the device grows with tiles, not with copies.

:func:`gather_reference` executes the gather tables with numpy exactly as the
kernel does; the CPU test suite checks it against the CPU backend, which
validates what the kernel consumes on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zarrdali.batch.backend import batch_dtype
from zarrdali.batch.finish import Finish
from zarrdali.batch.locate import ChunkLocations
from zarrdali.batch.plan import BatchPlan, channel_offsets, chunk_shape4, level_runs
from zarrdali.errors import ChunkError
from zarrdali.io.ranges import coalesce_arrays
from zarrdali.store.codecs import ChunkCodec
from zarrdali.store.missing import MAX_MISSING
from zarrdali.store.open import ArrayLayout

ALIGN = 8  # our staging reads and decoded slots: the gather kernel loads 8-byte elements

# Input alignment of nvCOMP's decoders when the library cannot be asked: the
# headers' ``nvcomp<Alg>RequiredDecompressionAlignment`` (nvCOMP 5.3: "the most
# restrictive of the minimum alignment requirements" for input, output and temp),
# an upper bound of what ``nvcompBatched<Alg>DecompressGetRequiredAlignments``
# returns (5.3.0.16: input 1 for zstd, LZ4 and gzip, 4 for deflate). The backend
# passes the library's own values (:attr:`~.decode.NvcompCApi.alignments`).
FALLBACK_INPUT_ALIGN = {"Zstd": 8, "LZ4": 1, "Gzip": 8, "Deflate": 4}

# nvCOMP algorithm names (``nvidia.nvcomp.Codec(algorithm=...)``) for the
# compressors it decodes. "none" needs no decoder (a device-to-device copy);
# "deflate" is listed for raw-deflate chains, which codecs.py does not parse yet.
NVCOMP_ALGORITHMS = {"zstd": "Zstd", "lz4": "LZ4", "gzip": "Gzip", "deflate": "Deflate"}
DEVICE_DECODABLE = frozenset({"none", *NVCOMP_ALGORITHMS})

# How the chunks of a variable are decoded.
ON_DEVICE = 0  # nvCOMP, or a device copy when uncompressed
ON_HOST = 1  # numcodecs on the host (Blosc), then one copy per batch
BY_ZARR_PYTHON = 2  # off the fast path: zarr-python reads it on the host

# -- gather tables: column indices (the kernel source uses the same numbers) ---
TILE_VAR = 0  # variable of the tile (row of the variable table)
TILE_T = 1  # time index inside its chunks
TILE_Y0 = 2  # first row of the tile in the array
TILE_X0 = 3  # first column of the tile in the array
TILE_OUT0 = 4  # flat output offset of element (b, frame, channel 0, 0, 0)
N_TILE_FIELDS = 5

VAR_CL = 0  # chunk shape along level, y, x
VAR_CY = 1
VAR_CX = 2
VAR_LEVELS = 3  # levels (channels) of the variable
VAR_CHANNEL0 = 4  # its first channel in the output
VAR_CODE = 5  # dtype code of its decoded bytes (DTYPE_CODES)
VAR_SWAP = 6  # 1: decoded bytes are big-endian, swap them while loading
VAR_ITEMSIZE = 7  # bytes per decoded element
VAR_FILL = 8  # fill value bits in the output dtype (little-endian, zero-padded)
VAR_ST = 9  # element strides of a decoded chunk along (t, level, y, x): its stored
VAR_SL = 10  # C order, whatever the order of the array's dimensions
VAR_SY = 11
VAR_SX = 12
VAR_LEVEL0 = 13  # its first row in the level table (GatherTables.levels)
N_VAR_FIELDS = 14

# The level table: per channel of each variable, the run of levels it is in
# (the tile_chunks L index) and its level inside that run's chunk.
LEVEL_RUN = 0
LEVEL_SRC = 1
N_LEVEL_FIELDS = 2

# Columns of the finishing gather's per-variable table (GatherFinish.variables):
# bits (little-endian, zero-padded) of values in the variable's decoded dtype.
FIN_FILL = 0  # its fill value: what a missing chunk holds
FIN_N_MISSING = 1  # how many missing values follow
FIN_MISSING0 = 2  # the first of up to MAX_MISSING missing values
FIN_PACKING = FIN_MISSING0 + MAX_MISSING  # CF unpacking: 1 scale, 2 offset (bits)
FIN_SCALE = FIN_PACKING + 1  # float64 bits of scale_factor
FIN_OFFSET = FIN_PACKING + 2  # float64 bits of add_offset
N_FIN_FIELDS = FIN_PACKING + 3
PACK_SCALE = 1
PACK_OFFSET = 2
PACK_FLOAT32 = 4  # unpacked in float32 (a float32 variable xarray unpacks so), else float64

_NO_ROWS = np.empty(0, dtype=np.int64)
MISSING_SLOT = -1  # chunk slot of a chunk that does not exist: the kernel writes the fill

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


def align_up(n: int | np.ndarray, align: int = ALIGN) -> int | np.ndarray:
    """``n`` rounded up to a multiple of ``align`` (a power of two)."""
    return (n + (align - 1)) & -align


def fill_bits(fill_value: object, source: np.dtype, out: np.dtype) -> int:
    """The fill value as the CPU path produces it (stored dtype, then cast to the
    batch dtype), as a signed int64 holding its little-endian bytes."""
    value = np.array(fill_value, dtype=np.dtype(source).newbyteorder("=")).astype(out)
    raw = value.astype(np.dtype(out).newbyteorder("<")).tobytes().ljust(8, b"\0")
    return int(np.frombuffer(raw, dtype="<i8")[0])


def _value_bits(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` of ``dtype`` as signed int64s holding their little-endian bytes,
    zero-padded (what the kernel's zero-extended loads compare with)."""
    little = np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    raw = b"".join(v.tobytes().ljust(8, b"\0") for v in little.reshape(-1))
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def decoding_of(layout: ArrayLayout) -> int:
    """Where the chunks of ``layout`` are decoded: ON_DEVICE, ON_HOST or BY_ZARR_PYTHON."""
    if not layout.fast_path:
        return BY_ZARR_PYTHON
    return ON_DEVICE if layout.codec.compressor in DEVICE_DECODABLE else ON_HOST


# -- payloads ----------------------------------------------------------------------
def payload_trims(codecs: Sequence[ChunkCodec | None]) -> tuple[np.ndarray, np.ndarray]:
    """Per variable, the bytes before a chunk's payload (numcodecs' 4-byte LZ4
    size prefix) and after it (a 4-byte crc32c)."""
    skip = [4 if c is not None and c.compressor == "lz4" else 0 for c in codecs]
    tail = [4 if c is not None and c.has_crc32c else 0 for c in codecs]
    return np.array(skip, dtype=np.int64), np.array(tail, dtype=np.int64)


def payload_bounds(
    trims: tuple[np.ndarray, np.ndarray], chunk_var: np.ndarray, nbytes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(skip, length)`` per chunk of ``nbytes`` stored bytes: where the
    decompressor's input starts in them and how long it is (negative: the chunk
    is too short). ``trims``: :func:`payload_trims` of the variables."""
    skip_v, tail_v = trims
    skip = skip_v[chunk_var]
    return skip, nbytes - skip - tail_v[chunk_var]


# -- staging: where encoded bytes and payloads go ------------------------------------
@dataclass(frozen=True, eq=False)
class StagingLayout:
    """The reads of ``K`` chunks into one staging buffer, and where their payloads are.

    Read ``r`` copies ``read_nbytes[r]`` bytes at ``read_start[r]`` of file
    ``read_file[r]`` to ``staging[read_dst[r]:]``. ``payload_raw[k]`` is where
    chunk ``k``'s payload landed; ``payload_offset[k]`` is where the decoder
    reads it: there, or its packed slot (after ``raw_nbytes``) when it landed
    at an offset its decoder does not accept (``needs_packing``: some did).
    """

    read_file: np.ndarray  # [R]
    read_start: np.ndarray  # [R]
    read_nbytes: np.ndarray  # [R]
    read_dst: np.ndarray  # [R]
    payload_raw: np.ndarray  # [K]
    payload_offset: np.ndarray  # [K]
    raw_nbytes: int
    total_nbytes: int
    needs_packing: bool

    @property
    def n_reads(self) -> int:
        return len(self.read_file)


def aligned_offsets(nbytes: np.ndarray, align: int = ALIGN) -> tuple[np.ndarray, int]:
    """Offsets of consecutive slots of ``nbytes`` each, every slot ``align``-ed,
    and the total size."""
    sizes = align_up(np.asarray(nbytes, dtype=np.int64), align)
    ends = np.cumsum(sizes)
    return ends - sizes, int(ends[-1]) if len(ends) else 0


def plan_staging(
    file: np.ndarray,
    offset: np.ndarray,
    nbytes: np.ndarray,
    skip: np.ndarray,
    length: np.ndarray,
    input_align: np.ndarray,
    *,
    max_gap: int = 64 * 1024,
    align: int = ALIGN,
) -> StagingLayout:
    """Coalesce the reads per file and lay them out in one staging buffer.

    Chunk ``k`` is ``nbytes[k]`` at ``offset[k]`` of file ``file[k]``; its
    payload starts ``skip[k]`` bytes in and is ``length[k]`` long, and its
    decoder reads it from an offset that is a multiple of ``input_align[k]``
    (a power of two; 1: anywhere). Each coalesced read starts at an
    ``align``-ed offset. A read spanning several inner chunks keeps their file
    layout, so payloads inside it may land misaligned for their decoder: those
    (and only those) get an ``align``-ed slot in a packed area after the reads.
    """
    reads = coalesce_arrays(file, offset, nbytes, max_gap)
    read_nbytes = reads.nbytes
    read_dst, raw_nbytes = aligned_offsets(read_nbytes, align)
    # A chunk's bytes land at read_dst + (offset - read_start) of the read serving
    # it; reads.order lists the chunks read by read.
    shift = np.repeat(read_dst - reads.start, np.diff(reads.bounds))
    payload_raw = np.empty(len(file), dtype=np.int64)
    payload_raw[reads.order] = shift
    payload_raw += offset + skip
    input_align = np.asarray(input_align, dtype=np.int64)
    misaligned = (payload_raw & (input_align - 1)) != 0
    needs_packing = bool(misaligned.any())
    payload_offset = payload_raw
    total = raw_nbytes
    if needs_packing:
        packed, packed_nbytes = aligned_offsets(
            np.where(misaligned, np.maximum(length, 1), 0), align
        )
        payload_offset = np.where(misaligned, raw_nbytes + packed, payload_raw)
        total += packed_nbytes
    return StagingLayout(
        read_file=reads.file,
        read_start=reads.start,
        read_nbytes=read_nbytes,
        read_dst=read_dst,
        payload_raw=payload_raw,
        payload_offset=payload_offset,
        raw_nbytes=raw_nbytes,
        total_nbytes=total,
        needs_packing=needs_packing,
    )


# -- the batch ---------------------------------------------------------------------
IN_STAGING = 0  # a payload read into the batch's staging buffer
IN_CACHE = 1  # a payload held by the GPU chunk cache's arena (read by an earlier batch)


@dataclass(frozen=True, eq=False)
class DecodeGroup:
    """The device-decoded chunks of one nvCOMP algorithm: payloads in staging
    (or in the chunk cache's arena, where ``in_source`` is ``IN_CACHE``),
    outputs in the decoded buffer."""

    algorithm: str
    chunks: np.ndarray  # plan chunk rows
    in_source: np.ndarray  # int8: IN_STAGING or IN_CACHE
    in_offset: np.ndarray  # byte offset in the buffer ``in_source`` names
    in_nbytes: np.ndarray
    out_offset: np.ndarray
    out_nbytes: np.ndarray
    crc_row: np.ndarray | None = None  # row of BatchDescription.crc_jobs, or -1 (none)


@dataclass(frozen=True, eq=False)
class GatherTables:
    """What the gather kernel reads: ``tiles`` ``[J, N_TILE_FIELDS]`` int64,
    ``tile_chunks`` ``[J, L, Y, X]`` int32 (chunk rows, -1 past a tile's last),
    ``chunk_slots`` ``[N]`` int64 (byte offset in the decoded buffer,
    ``MISSING_SLOT``: write the fill value) and ``variables``
    ``[V, N_VAR_FIELDS]`` int64."""

    tiles: np.ndarray
    tile_chunks: np.ndarray
    chunk_slots: np.ndarray
    variables: np.ndarray
    levels: np.ndarray  # [channels, N_LEVEL_FIELDS] int64: run and level of each channel
    out_shape: tuple[int, int, int, int, int]
    out_dtype: np.dtype

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays uploaded to the device, in the kernel's argument order."""
        return (self.tiles, self.tile_chunks, self.chunk_slots, self.variables, self.levels)

    @property
    def max_tile_elements(self) -> int:
        """Elements of the largest tile (its variable's levels times H times W)."""
        h, w = self.out_shape[-2:]
        return int(self.variables[:, VAR_LEVELS].max(initial=0)) * h * w


@dataclass(frozen=True, eq=False)
class GatherFinish:
    """What the finishing gather kernel (``zarrdali_gather_finish``) reads
    besides the gather tables: it writes the batch in float32, CF-unpacked
    where a variable is packed (``x * scale + offset`` in float64, rounded
    once), normalized (``normalize``: ``(x - stats[c, 0]) / stats[c, 1]`` in
    float32), missing values (NaN, or one of ``variables``' missing values,
    compared in the decoded dtype) replaced by ``nan_fill`` where given (NaN:
    CF decoding), and with ``masks`` a uint8 mask, 1 where the value is valid.
    ``variables``: ``[V, N_FIN_FIELDS]`` int64 (FIN_* columns)."""

    variables: np.ndarray
    stats: np.ndarray  # [C, 2] float32: mean, std
    normalize: bool
    nan_fill: float | None
    masks: bool

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays uploaded to the device, in the kernel's argument order."""
        return (self.variables, self.stats)


def decoded_dtype(layout: ArrayLayout) -> np.dtype:
    """The dtype of a chunk of ``layout`` as the decoded buffer holds it (stored
    byte order; zarr-python's fallback hands back native order)."""
    return layout.dtype if not layout.fast_path else layout.codec.stored_dtype(layout.dtype)


def finish_tables(layouts: Sequence[ArrayLayout], finish: Finish, masks: bool) -> GatherFinish:
    """The finishing kernel's inputs for ``finish`` (its statistics, ``nan_fill``
    and per-channel missing values; no flags: DALI augments on the GPU path)."""
    if finish.flags is not None:
        raise ValueError("the GPU gather does not augment: finish without flags")
    channels = sum(layout.n_levels for layout in layouts)
    table = np.zeros((len(layouts), N_FIN_FIELDS), dtype=np.int64)
    for v, (layout, c) in enumerate(zip(layouts, channel_offsets(layouts), strict=True)):
        stored = decoded_dtype(layout).newbyteorder("=")
        table[v, FIN_FILL] = _value_bits(np.array(layout.fill_value, dtype=stored), stored)[0]
        if finish.missing is not None:
            values = np.asarray(finish.missing[c])
            if len(values) > MAX_MISSING:
                raise ValueError(f"at most {MAX_MISSING} missing values per variable")
            table[v, FIN_N_MISSING] = len(values)
            bits = _value_bits(values.astype(stored), stored)
            table[v, FIN_MISSING0 : FIN_MISSING0 + len(bits)] = bits
        packing = finish.packing[c] if finish.packing is not None else None
        if packing is not None:
            flags = 0
            if packing.scale is not None:
                flags |= PACK_SCALE
                table[v, FIN_SCALE] = np.float64(packing.scale).view(np.int64)
            if packing.offset is not None:
                flags |= PACK_OFFSET
                table[v, FIN_OFFSET] = np.float64(packing.offset).view(np.int64)
            if packing.dtype == "float32":
                flags |= PACK_FLOAT32
            elif packing.dtype != "float64":
                raise NotImplementedError(
                    f"the GPU path unpacks in float32 or float64, not {packing.dtype} "
                    f"(variable {layout.name!r}); use device='cpu'"
                )
            table[v, FIN_PACKING] = flags
    stats = np.zeros((channels, 2), dtype=np.float32)
    stats[:, 1] = 1
    if finish.normalizes:
        stats[:, 0], stats[:, 1] = finish.mean, finish.std
    nan_fill = finish.nan_fill
    if nan_fill is None and finish.missing_to_nan:
        nan_fill = float("nan")  # CF decoding: a missing value is served as NaN
    return GatherFinish(
        variables=table,
        stats=np.ascontiguousarray(stats),
        normalize=finish.normalizes,
        nan_fill=nan_fill,
        masks=masks and finish.missing is not None,
    )


@dataclass(frozen=True, eq=False)
class BatchDescription:
    """One batch's device work, as arrays (see the module docstring).

    Chunk rows are the plan's. ``device_chunks`` are decoded on the device;
    ``read_chunks`` (all of them unless the chunk cache holds some) are read
    into staging, in the order of ``staging``'s per-chunk arrays;
    ``host_chunks`` are read and decoded by numcodecs on the host,
    ``fallback_chunks`` by zarr-python; missing chunks are in none of them.
    ``slots`` locates every decoded chunk (``MISSING_SLOT`` for missing ones):
    the device region ``[0, device_nbytes)``, then the host region of
    ``host_nbytes``. ``pack_jobs`` (copies inside staging that align payloads)
    and ``copy_jobs`` (uncompressed chunks, staging to decoded buffer) are
    ``[K, 3]`` rows of (source offset, destination offset, bytes).
    ``crc_jobs`` (``[K, 2]``: staging offset of the stored chunk, bytes before
    its trailing crc32c) are the staged chunks that carry a crc32c, checked on
    the device before anything decodes them; ``crc_chunks`` their plan rows.
    """

    device_chunks: np.ndarray
    read_chunks: np.ndarray
    host_chunks: np.ndarray
    fallback_chunks: np.ndarray
    slots: np.ndarray
    device_nbytes: int
    host_nbytes: int
    staging: StagingLayout
    pack_jobs: np.ndarray
    copy_jobs: np.ndarray
    decode_groups: list[DecodeGroup]
    gather: GatherTables
    crc_jobs: np.ndarray = field(default_factory=lambda: _NO_CRC)
    crc_chunks: np.ndarray = field(default_factory=lambda: _NO_ROWS)

    @property
    def decoded_nbytes(self) -> int:
        return self.device_nbytes + self.host_nbytes


@dataclass(frozen=True, eq=False)
class VariableColumns:
    """What :func:`describe_batch` needs per variable, as ``[V]`` arrays (or a
    ``[V, N_VAR_FIELDS]`` table): the same for every batch of these layouts."""

    decoding: np.ndarray  # ON_DEVICE, ON_HOST or BY_ZARR_PYTHON
    algorithms: list[str]  # the nvCOMP algorithms the variables need
    algorithm: np.ndarray  # index into ``algorithms`` (-1: not nvCOMP's)
    uncompressed: np.ndarray  # bool: the chunks are stored raw
    chunk_nbytes: np.ndarray
    skip: np.ndarray
    tail: np.ndarray
    table: np.ndarray  # the gather kernel's variable table
    levels: np.ndarray  # its level table
    out_dtype: np.dtype


_COLUMNS: dict[tuple[int, ...], tuple[list[ArrayLayout], VariableColumns]] = {}


def variable_columns(layouts: Sequence[ArrayLayout]) -> VariableColumns:
    """:func:`describe_variables` of ``layouts``, cached (a few layouts lists live
    per process; they are kept alive so their ids stay theirs)."""
    key = tuple(id(layout) for layout in layouts)
    hit = _COLUMNS.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], layouts, strict=True)):
        return hit[1]
    columns = describe_variables(layouts)
    if len(_COLUMNS) >= 64:
        _COLUMNS.pop(next(iter(_COLUMNS)))
    _COLUMNS[key] = (list(layouts), columns)
    return columns


def level_table(layout: ArrayLayout) -> np.ndarray:
    """``[channels, N_LEVEL_FIELDS]``: per channel of ``layout`` the run of levels
    it is in (:func:`~zarrdali.batch.plan.level_runs`: the L index of its tiles'
    ``tile_chunks``) and its level inside that run's chunk."""
    table = np.empty((layout.n_levels, N_LEVEL_FIELDS), dtype=np.int64)
    _, run_src, run_dst, run_len = level_runs(layout)
    for r, (src, dst, n) in enumerate(zip(run_src, run_dst, run_len, strict=True)):
        table[dst : dst + n, LEVEL_RUN] = r
        table[dst : dst + n, LEVEL_SRC] = np.arange(src, src + n)
    return table


def describe_variables(layouts: Sequence[ArrayLayout]) -> VariableColumns:
    """The per-variable columns of :func:`describe_batch`.

    Decoded bytes hold the stored byte order (the ``bytes`` codec's), except
    zarr-python's fallback, which hands back native order.
    """
    out_dtype = batch_dtype(layouts)
    table = np.zeros((len(layouts), N_VAR_FIELDS), dtype=np.int64)
    levels = []
    for v, (layout, channel0) in enumerate(zip(layouts, channel_offsets(layouts), strict=True)):
        fallback = not layout.fast_path
        stored = layout.dtype if fallback else layout.codec.stored_dtype(layout.dtype)
        row = table[v]
        row[[VAR_CL, VAR_CY, VAR_CX]] = chunk_shape4(layout)[1:]
        row[[VAR_ST, VAR_SL, VAR_SY, VAR_SX]] = layout.element_strides4
        row[VAR_LEVELS] = layout.n_levels
        row[VAR_CHANNEL0] = channel0
        row[VAR_LEVEL0] = channel0  # one level-table row per channel
        levels.append(level_table(layout))
        row[VAR_CODE] = dtype_code(stored)
        row[VAR_SWAP] = stored.itemsize > 1 and stored.byteorder == ">"
        row[VAR_ITEMSIZE] = stored.itemsize
        row[VAR_FILL] = fill_bits(layout.fill_value, layout.dtype, out_dtype)
    skip, tail = payload_trims([layout.codec for layout in layouts])
    compressors = [lay.codec.compressor if lay.codec is not None else None for lay in layouts]
    names = [NVCOMP_ALGORITHMS.get(c) if c else None for c in compressors]
    algorithms = sorted({name for name in names if name is not None})
    return VariableColumns(
        decoding=np.array([decoding_of(layout) for layout in layouts], dtype=np.int64),
        algorithms=algorithms,
        algorithm=np.array([algorithms.index(n) if n else -1 for n in names], dtype=np.int64),
        uncompressed=np.array([c == "none" for c in compressors], dtype=bool),
        chunk_nbytes=np.array([layout.chunk_nbytes for layout in layouts], dtype=np.int64),
        skip=skip,
        tail=tail,
        table=table,
        levels=np.ascontiguousarray(np.concatenate(levels), dtype=np.int64).reshape(-1, 2),
        out_dtype=out_dtype,
    )


def _chunk_error(
    message: str, layouts: Sequence[ArrayLayout], plan: BatchPlan, i: int, store_name: str
) -> ChunkError:
    layout = layouts[int(plan.chunk_var[i])]
    key = layout.describe_chunk(plan.chunk_coords_of(layouts, i))
    return ChunkError(message, store=store_name, array=layout.name, key=key)


def _check_payloads(
    layouts: Sequence[ArrayLayout],
    plan: BatchPlan,
    chunks: np.ndarray,
    nbytes: np.ndarray,
    length: np.ndarray,
    uncompressed: np.ndarray,
    expected: np.ndarray,
    store_name: str,
) -> None:
    """Raise :class:`ChunkError` for the first chunk too short for its codec, or
    an uncompressed chunk whose size is not the chunk's."""
    short = np.flatnonzero(length < 0)
    if len(short):
        k = int(short[0])
        raise _chunk_error(
            f"a {int(nbytes[k])}-byte chunk is too short for its codec",
            layouts,
            plan,
            int(chunks[k]),
            store_name,
        )
    wrong = np.flatnonzero(uncompressed & (length != expected))
    if len(wrong):
        k = int(wrong[0])
        raise _chunk_error(
            f"uncompressed chunk holds {int(length[k])} bytes, the chunk has {int(expected[k])}",
            layouts,
            plan,
            int(chunks[k]),
            store_name,
        )


def gather_tables(plan: BatchPlan, columns: VariableColumns, slots: np.ndarray) -> GatherTables:
    """The gather kernel's tables for ``plan`` (one output: the whole window)."""
    if plan.frame_split is not None:
        raise ValueError("the GPU gather assembles the whole window: plan without frame_split")
    _, n_frames, n_channels, h, w = plan.out_shape
    tiles = np.empty((len(plan.tile_var), N_TILE_FIELDS), dtype=np.int64)
    tiles[:, TILE_VAR] = plan.tile_var
    tiles[:, TILE_T] = plan.tile_t
    tiles[:, TILE_Y0] = plan.samples[plan.tile_b, 1]
    tiles[:, TILE_X0] = plan.samples[plan.tile_b, 2]
    tiles[:, TILE_OUT0] = (plan.tile_b * n_frames + plan.tile_frame) * (n_channels * h * w)
    return GatherTables(
        tiles=tiles,
        tile_chunks=plan.tile_chunks.astype(np.int32),
        chunk_slots=slots,
        variables=columns.table,
        levels=columns.levels,
        out_shape=plan.out_shape,
        out_dtype=columns.out_dtype,
    )


def describe_batch(
    layouts: Sequence[ArrayLayout],
    plan: BatchPlan,
    locations: ChunkLocations,
    *,
    store_name: str,
    max_gap: int = 64 * 1024,
    cached: np.ndarray | None = None,
    input_align: Mapping[str, int] | None = None,
) -> BatchDescription:
    """Everything the GPU backend does for ``plan`` besides I/O and device calls.

    ``cached`` (optional, ``[N]`` int64): for each plan chunk, the offset of its
    payload in the GPU chunk cache's arena, or -1. Cached chunks are decoded
    from there and not read (only compressed, device-decoded chunks can be
    cached: see :func:`cacheable_payloads`). ``input_align``: the input
    alignment of each nvCOMP algorithm's decoder, as the library reports it
    (default: :data:`FALLBACK_INPUT_ALIGN`, the headers' upper bounds); only
    payloads staged at an offset their decoder refuses are packed.

    Raises :class:`ChunkError` (naming array and key) for a chunk too short for
    its codec, or an uncompressed chunk of the wrong size.
    """
    cols = variable_columns(layouts)
    var = plan.chunk_var
    present = locations.present
    if np.all(cols.decoding == ON_DEVICE):  # the usual case spares a few scans
        device, host, fallback = np.flatnonzero(present), _NO_ROWS, _NO_ROWS
    else:
        decoding = cols.decoding[var]
        device = np.flatnonzero(present & (decoding == ON_DEVICE))
        host = np.flatnonzero(present & (decoding == ON_HOST))
        fallback = np.flatnonzero(decoding == BY_ZARR_PYTHON)

    # Decoded slots: the device region, then the host region (one upload).
    dvar = var[device]
    device_sizes = cols.chunk_nbytes[dvar]
    slots = np.full(plan.n_chunks, MISSING_SLOT, dtype=np.int64)
    device_slots, device_nbytes = aligned_offsets(device_sizes)
    slots[device] = device_slots
    host_like = np.concatenate([host, fallback])
    host_slots, host_nbytes = aligned_offsets(cols.chunk_nbytes[var[host_like]])
    slots[host_like] = device_nbytes + host_slots

    # Payloads of the device-decoded chunks, and where they are staged.
    nbytes = locations.nbytes[device]
    skip, length = payload_bounds((cols.skip, cols.tail), dvar, nbytes)
    uncompressed = cols.uncompressed[dvar]
    _check_payloads(layouts, plan, device, nbytes, length, uncompressed, device_sizes, store_name)
    hit = None if cached is None else cached[device] >= 0
    if hit is not None and not hit.any():
        hit = None
    if hit is not None and np.any(hit & uncompressed):
        raise ValueError("the chunk cache holds compressed payloads only")
    # The chunks read into staging (all device chunks but the cached ones).
    read: np.ndarray | slice = slice(None) if hit is None else ~hit
    # Uncompressed chunks (no algorithm) are copied by our kernel: any offset.
    align_of = input_alignment(cols.algorithms, input_align)
    staging = plan_staging(
        locations.file[device[read]],
        locations.offset[device[read]],
        nbytes[read],
        skip[read],
        length[read],
        align_of[cols.algorithm[dvar[read]]],
        max_gap=max_gap,
    )
    # Device copies (source, destination, bytes): misaligned payloads to their
    # packed slots; uncompressed chunks to their decoded slots.
    raw = staging.payload_raw
    read_length = length[read]
    pack_jobs = _NO_JOBS
    if staging.needs_packing:
        packed = staging.payload_offset != raw
        pack_jobs = _copy_jobs(raw, staging.payload_offset, read_length, packed)
    copy_jobs = _copy_jobs(raw, device_slots[read], read_length, uncompressed[read])
    # Staged chunks with a trailing crc32c: checked on the device before decoding
    # (a payload from the cache passed its check when it was read).
    crc_row = np.full(len(device), -1, dtype=np.int64)
    crc_jobs, crc_chunks = _NO_CRC, _NO_ROWS
    checked = cols.tail[dvar[read]] > 0
    if checked.any():
        stored = raw[checked] - skip[read][checked]  # where the stored chunk starts
        crc_jobs = np.stack([stored, nbytes[read][checked] - 4], axis=1)
        crc_chunks = device[read][checked]
        rows = np.flatnonzero(read if hit is not None else np.ones(len(device), dtype=bool))
        crc_row[rows[checked]] = np.arange(len(crc_chunks))
    # Where each device chunk's payload is for its decoder.
    if hit is None:
        in_source = np.zeros(len(device), dtype=np.int8)
        in_offset = staging.payload_offset
    else:
        in_source = hit.astype(np.int8)
        in_offset = np.empty(len(device), dtype=np.int64)
        in_offset[read] = staging.payload_offset
        in_offset[hit] = cached[device[hit]]
    return BatchDescription(
        device_chunks=device,
        read_chunks=device[read],
        host_chunks=host,
        fallback_chunks=fallback,
        slots=slots,
        device_nbytes=device_nbytes,
        host_nbytes=host_nbytes,
        staging=staging,
        pack_jobs=pack_jobs,
        copy_jobs=copy_jobs,
        decode_groups=_decode_groups(
            cols, device, dvar, in_source, in_offset, length, device_slots, crc_row
        ),
        gather=gather_tables(plan, cols, slots),
        crc_jobs=crc_jobs,
        crc_chunks=crc_chunks,
    )


def input_alignment(
    algorithms: Sequence[str], input_align: Mapping[str, int] | None = None
) -> np.ndarray:
    """``[len(algorithms) + 1]`` int64: the input alignment of each algorithm's
    decoder (``input_align``, else :data:`FALLBACK_INPUT_ALIGN`), then 1 (index
    -1: chunks no nvCOMP decoder reads)."""
    table = FALLBACK_INPUT_ALIGN if input_align is None else input_align
    out = np.array([int(table[a]) for a in algorithms] + [1], dtype=np.int64)
    if np.any(out < 1) or np.any(out & (out - 1)):
        raise ValueError(f"input alignments must be powers of two, got {dict(table)}")
    return out


def cacheable_payloads(
    layouts: Sequence[ArrayLayout], plan: BatchPlan, locations: ChunkLocations
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, length)``: the plan chunks the GPU chunk cache may hold (stored
    in a file, decoded by nvCOMP: compressed and on the device path) and the
    length of each one's payload (what the decoder reads)."""
    cols = variable_columns(layouts)
    var = plan.chunk_var
    eligible = (cols.decoding == ON_DEVICE) & (cols.algorithm >= 0)
    rows = np.flatnonzero(locations.present & eligible[var])
    _, length = payload_bounds((cols.skip, cols.tail), var[rows], locations.nbytes[rows])
    ok = length > 0  # too short: describe_batch raises for it
    return rows[ok], length[ok]


_NO_JOBS = np.empty((0, 3), dtype=np.int64)
_NO_CRC = np.empty((0, 2), dtype=np.int64)


def _copy_jobs(
    src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, which: np.ndarray
) -> np.ndarray:
    """``[K, 3]`` (source offset, destination offset, bytes) of the chunks in ``which``."""
    if not which.any():
        return _NO_JOBS
    return np.stack([src[which], dst[which], nbytes[which]], axis=1)


def _decode_groups(
    cols: VariableColumns,
    device: np.ndarray,
    dvar: np.ndarray,
    in_source: np.ndarray,
    in_offset: np.ndarray,
    length: np.ndarray,
    device_slots: np.ndarray,
    crc_row: np.ndarray,
) -> list[DecodeGroup]:
    """One :class:`DecodeGroup` per nvCOMP algorithm of the device-decoded chunks."""
    algorithm = cols.algorithm[dvar]
    groups = []
    for k, name in enumerate(cols.algorithms):
        mine: np.ndarray | slice = np.flatnonzero(algorithm == k)
        if not len(mine):
            continue
        if len(mine) == len(dvar):  # one algorithm for all: views, no copies
            mine = slice(None)
        groups.append(
            DecodeGroup(
                algorithm=name,
                chunks=device[mine],
                in_source=in_source[mine],
                in_offset=in_offset[mine],
                in_nbytes=length[mine],
                out_offset=device_slots[mine],
                out_nbytes=cols.chunk_nbytes[dvar[mine]],
                crc_row=crc_row[mine],
            )
        )
    return groups


# -- the gather kernel, in numpy -------------------------------------------------
_CODE_DTYPES = {v: np.dtype(k) for k, v in DTYPE_CODES.items() if k != "b1"}


def _fill_value(bits: int, out_dtype: np.dtype) -> np.ndarray:
    raw = int(bits).to_bytes(8, "little", signed=True)[: np.dtype(out_dtype).itemsize]
    return np.frombuffer(raw, dtype=np.dtype(out_dtype).newbyteorder("<"))[0]


def gather_reference(
    decoded: np.ndarray, gather: GatherTables, finish: GatherFinish | None = None
) -> Any:
    """What the gather kernel computes, in numpy (the CPU oracle of the tables).

    ``decoded`` is the uint8 decoded buffer. Every element of every tile takes
    the kernel's arithmetic, vectorized: element ``i`` of tile ``j`` is
    ``(level, y, x)``; its chunk comes from ``tile_chunks``, its source from
    the chunk's slot, and it is loaded with the kernel's byte swap and C cast,
    or set to the fill bits when the chunk is missing. Checks that every output
    element is written exactly once.

    With ``finish``, what ``zarrdali_gather_finish`` computes: float32
    ``(float(x) - mean) / std`` of the decoded value ``x`` (a missing chunk's
    is its fill value; CF-unpacked in float64 where the variable is packed),
    invalid values (NaN or one of the variable's missing values, compared in
    the decoded dtype) replaced by ``nan_fill``; returns
    ``(out, mask)`` (mask uint8, None without ``finish.masks``).
    """
    tiles, var_table = gather.tiles, gather.variables
    n_tiles, n_l, n_y, n_x = gather.tile_chunks.shape
    h, w = gather.out_shape[-2:]
    hw = h * w
    out_dtype = np.dtype(np.float32) if finish is not None else gather.out_dtype
    out = np.zeros(int(np.prod(gather.out_shape)), dtype=out_dtype)
    mask = np.zeros(out.size, dtype=np.uint8) if finish is not None and finish.masks else None
    var = var_table[tiles[:, TILE_VAR]]
    # Element i of tile j, for i < levels * H * W of its variable.
    totals = var[:, VAR_LEVELS] * hw
    j = np.repeat(np.arange(n_tiles), totals)
    i = np.arange(len(j)) - np.repeat(np.cumsum(totals) - totals, totals)
    cy, cx = var[j, VAR_CY], var[j, VAR_CX]
    t, y0, x0 = tiles[j, TILE_T], tiles[j, TILE_Y0], tiles[j, TILE_X0]

    level = i // hw
    r = i - level * hw
    y = r // w
    x = r - y * w
    yy, xx = y0 + y, x0 + x
    run, level_src = gather.levels[var[j, VAR_LEVEL0] + level].T
    cell = (run * n_y + (yy // cy - y0 // cy)) * n_x + (xx // cx - x0 // cx)
    chunk = gather.tile_chunks.reshape(n_tiles, n_l * n_y * n_x)[j, cell]
    if np.any(chunk < 0):
        raise ValueError("an element's tile_chunks entry is -1")
    slot = gather.chunk_slots[chunk]
    channel = var[j, VAR_CHANNEL0] + level
    o = tiles[j, TILE_OUT0] + channel * hw + r
    src = t * var[j, VAR_ST] + level_src * var[j, VAR_SL]
    src += (yy % cy) * var[j, VAR_SY] + (xx % cx) * var[j, VAR_SX]

    for v in np.unique(tiles[:, TILE_VAR]).tolist():
        row = var_table[v]
        mine = tiles[j, TILE_VAR] == v
        item = int(row[VAR_ITEMSIZE])
        dtype = _CODE_DTYPES[int(row[VAR_CODE])]
        if row[VAR_SWAP]:
            dtype = dtype.newbyteorder(">")
        if dtype.itemsize != item:
            raise ValueError(f"variable {v}: itemsize {item} is not that of code {row[VAR_CODE]}")
        missing = np.flatnonzero(mine & (slot == MISSING_SLOT))
        load = np.flatnonzero(mine & (slot != MISSING_SLOT))
        addr = slot[load] + src[load] * item
        raw = decoded[addr[:, None] + np.arange(item)].reshape(-1)
        values = np.frombuffer(raw.tobytes(), dtype=dtype)
        if finish is None:
            out[o[missing]] = _fill_value(row[VAR_FILL], gather.out_dtype)
            out[o[load]] = values.astype(gather.out_dtype)
            continue
        fin = finish.variables[v]
        native = dtype.newbyteorder("=")
        fill = _fill_value(fin[FIN_FILL], native)
        stored = np.empty(len(missing) + len(load), dtype=native)  # missing, then loaded
        stored[: len(missing)], stored[len(missing) :] = fill, values
        where = np.concatenate([o[missing], o[load]])
        c = np.concatenate([channel[missing], channel[load]])
        bad = np.isnan(stored) if native.kind == "f" else np.zeros(len(stored), dtype=bool)
        for m in range(int(fin[FIN_N_MISSING])):
            bad |= stored == _fill_value(fin[FIN_MISSING0 + m], native)
        packing = int(fin[FIN_PACKING])
        if packing:  # CF unpacking in float64 (or float32), rounded once (as the CPU path)
            kind = np.float32 if packing & PACK_FLOAT32 else np.float64
            unpacked = stored.astype(kind)
            if packing & PACK_SCALE:
                unpacked = unpacked * kind(np.int64(fin[FIN_SCALE]).view(np.float64))
            if packing & PACK_OFFSET:
                unpacked = unpacked + kind(np.int64(fin[FIN_OFFSET]).view(np.float64))
            value = unpacked.astype(np.float32)
        else:
            value = stored.astype(np.float32)
        if finish.normalize:
            value = (value - finish.stats[c, 0]) / finish.stats[c, 1]
        if finish.nan_fill is not None:
            value[bad] = np.float32(finish.nan_fill)
        out[where] = value
        if mask is not None:
            mask[where] = ~bad
    writes = np.bincount(o, minlength=out.size)
    if len(writes) != out.size or np.any(writes != 1):
        raise ValueError("the gather tables do not write every output element exactly once")
    if finish is None:
        return out.reshape(gather.out_shape)
    return out.reshape(gather.out_shape), None if mask is None else mask.reshape(gather.out_shape)
