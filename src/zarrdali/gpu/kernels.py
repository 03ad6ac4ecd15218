"""CUDA sources of the GPU backend's kernels (compiled by CuPy's NVRTC on first use).

Header-free C++: NVRTC compiles them without the CUDA runtime headers.

* ``zarrdali_pack``: byte copies ``(source offset, destination offset, bytes)``,
  one block row per job, 16 bytes per load and store between the destination's
  16-byte boundaries: aligns payloads in the staging buffer, copies
  uncompressed chunks to their decoded slots and payloads into the GPU cache.
* ``zarrdali_gather``: assembles the batch ``[B, T, C, H, W]`` from the decoded
  chunks, one block column per tile (variable, sample, frame), its threads over
  the tile's rows (``zd_row_of``, three integer divisions a row) and columns
  (``zd_element``, one a column); each thread derives
  its element's source chunk and offset from the gather tables of
  :func:`zarrdali.gpu.describe.gather_tables` (column numbers as there),
  loads it with a byte swap for big-endian chunks, casts it to the batch dtype,
  or writes the fill value where the chunk is missing.
  :func:`zarrdali.gpu.describe.gather_reference` is its numpy twin.
* ``zarrdali_gather_finish``: the same gather, finishing each element in the
  same pass as the CPU path does where pieces land (float32 cast, ``(x - mean)
  / std``, the missing-value check of :mod:`zarrdali.store.missing`, ``nan_fill``)
  and writing the uint8 mask beside it (``finish_source``; the loader's
  batches on the GPU path). ``gather_reference(..., finish)`` is its twin.
"""

from __future__ import annotations

import numpy as np

from zarrdali.gpu import describe as gpu_plan
from zarrdali.gpu.describe import CTYPES, dtype_key

THREADS = 256  # threads per block of both kernels

PACK_SOURCE = r"""
// 16 bytes, aligned as a 16-byte load and store need.
struct alignas(16) zd_bytes16 {
    unsigned int w[4];
};

__device__ __forceinline__ unsigned int zd_funnel(const unsigned int lo, const unsigned int hi,
                                                  const unsigned int bits) {
    return (unsigned int)((((unsigned long long)hi << 32) | lo) >> bits);
}

// Bytes [shift, shift + 16) of the 32 bytes a, b (shift in 1..15), in registers.
__device__ __forceinline__ zd_bytes16 zd_shifted(const zd_bytes16& a, const zd_bytes16& b,
                                                 const unsigned int shift) {
    unsigned int w0, w1, w2, w3, w4;  // the five words the 16 bytes span
    switch (shift >> 2) {
    case 0: w0 = a.w[0]; w1 = a.w[1]; w2 = a.w[2]; w3 = a.w[3]; w4 = b.w[0]; break;
    case 1: w0 = a.w[1]; w1 = a.w[2]; w2 = a.w[3]; w3 = b.w[0]; w4 = b.w[1]; break;
    case 2: w0 = a.w[2]; w1 = a.w[3]; w2 = b.w[0]; w3 = b.w[1]; w4 = b.w[2]; break;
    default: w0 = a.w[3]; w1 = b.w[0]; w2 = b.w[1]; w3 = b.w[2]; w4 = b.w[3]; break;
    }
    const unsigned int bits = (shift & 3) * 8;
    zd_bytes16 r;
    r.w[0] = zd_funnel(w0, w1, bits);
    r.w[1] = zd_funnel(w1, w2, bits);
    r.w[2] = zd_funnel(w2, w3, bits);
    r.w[3] = zd_funnel(w3, w4, bits);
    return r;
}

// jobs: [n_jobs, 3] (source offset, destination offset, bytes); one block row per
// job. The destination's bytes up to its first 16-byte boundary and after its
// last are copied one by one; those between, 16 at a time: aligned 16-byte
// stores of 16-byte loads (two aligned loads, shifted, when the source is not
// aligned as the destination; both lie within the 16-byte words holding the
// job's source bytes, hence within its buffer).
extern "C" __global__ void zarrdali_pack(const unsigned char* __restrict__ src,
                                         unsigned char* __restrict__ dst,
                                         const long long* __restrict__ jobs,
                                         const int n_jobs) {
    const int j = blockIdx.x;
    if (j >= n_jobs) return;
    const long long s = jobs[3 * j], d = jobs[3 * j + 1], n = jobs[3 * j + 2];
    const long long first = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.y * blockDim.x;
    long long head = (long long)((16 - ((unsigned long long)(dst + d) & 15)) & 15);
    if (head > n) head = n;
    const long long words = (n - head) >> 4;
    const long long tail = head + words * 16;
    for (long long i = first; i < head; i += stride) dst[d + i] = src[s + i];
    for (long long i = tail + first; i < n; i += stride) dst[d + i] = src[s + i];
    const unsigned char* from = src + s + head;
    zd_bytes16* to = (zd_bytes16*)(dst + d + head);
    const unsigned int shift = (unsigned int)((unsigned long long)from & 15);
    const zd_bytes16* aligned = (const zd_bytes16*)(from - shift);
    if (shift == 0) {
        for (long long i = first; i < words; i += stride) to[i] = aligned[i];
    } else {
        for (long long i = first; i < words; i += stride)
            to[i] = zd_shifted(aligned[i], aligned[i + 1], shift);
    }
}
"""

_GATHER_SOURCE = r"""
typedef OUT_CTYPE out_t;

__device__ __forceinline__ unsigned short zd_bswap16(unsigned short v) {
    return (unsigned short)((v >> 8) | (v << 8));
}
__device__ __forceinline__ unsigned int zd_bswap32(unsigned int v) {
    return __byte_perm(v, 0, 0x0123);
}
__device__ __forceinline__ unsigned long long zd_bswap64(unsigned long long v) {
    return ((unsigned long long)zd_bswap32((unsigned int)(v & 0xffffffffULL)) << 32)
           | (unsigned long long)zd_bswap32((unsigned int)(v >> 32));
}

// Load one element of dtype `code` (gpu_plan.DTYPE_CODES), swapping its bytes
// when the chunk is big-endian, and convert it to T (a C cast, as numpy's
// astype does).
template <typename T>
__device__ __forceinline__ T zd_load_as(const unsigned char* p, const int code,
                                        const bool swap) {
    switch (code) {
    case 0: return (T)(*(const signed char*)p);
    case 1: return (T)(*p);
    case 2: { unsigned short u = *(const unsigned short*)p; if (swap) u = zd_bswap16(u);
              return (T)(short)u; }
    case 3: { unsigned short u = *(const unsigned short*)p; if (swap) u = zd_bswap16(u);
              return (T)u; }
    case 4: { unsigned int u = *(const unsigned int*)p; if (swap) u = zd_bswap32(u);
              return (T)(int)u; }
    case 5: { unsigned int u = *(const unsigned int*)p; if (swap) u = zd_bswap32(u);
              return (T)u; }
    case 6: { unsigned long long u = *(const unsigned long long*)p;
              if (swap) u = zd_bswap64(u); return (T)(long long)u; }
    case 7: { unsigned long long u = *(const unsigned long long*)p;
              if (swap) u = zd_bswap64(u); return (T)u; }
    case 8: { unsigned int u = *(const unsigned int*)p; if (swap) u = zd_bswap32(u);
              return (T)__uint_as_float(u); }
    case 9: { unsigned long long u = *(const unsigned long long*)p;
              if (swap) u = zd_bswap64(u); return (T)__longlong_as_double((long long)u); }
    }
    return (T)0;
}

__device__ __forceinline__ out_t zd_load(const unsigned char* p, const int code,
                                         const bool swap) {
    return zd_load_as<out_t>(p, code, swap);
}

// Columns of the tables (gpu_plan.TILE_* and VAR_*).
#define N_TILE_FIELDS {N_TILE_FIELDS}
#define TILE_VAR {TILE_VAR}
#define TILE_T {TILE_T}
#define TILE_Y0 {TILE_Y0}
#define TILE_X0 {TILE_X0}
#define TILE_OUT0 {TILE_OUT0}
#define N_VAR_FIELDS {N_VAR_FIELDS}
#define VAR_CL {VAR_CL}
#define VAR_CY {VAR_CY}
#define VAR_CX {VAR_CX}
#define VAR_LEVELS {VAR_LEVELS}
#define VAR_CHANNEL0 {VAR_CHANNEL0}
#define VAR_CODE {VAR_CODE}
#define VAR_SWAP {VAR_SWAP}
#define VAR_ITEMSIZE {VAR_ITEMSIZE}
#define VAR_FILL {VAR_FILL}
#define VAR_ST {VAR_ST}
#define VAR_SL {VAR_SL}
#define VAR_SY {VAR_SY}
#define VAR_SX {VAR_SX}
#define VAR_LEVEL0 {VAR_LEVEL0}
#define N_LEVEL_FIELDS {N_LEVEL_FIELDS}
#define LEVEL_RUN {LEVEL_RUN}
#define LEVEL_SRC {LEVEL_SRC}
#define N_FIN_FIELDS {N_FIN_FIELDS}
#define FIN_FILL {FIN_FILL}
#define FIN_N_MISSING {FIN_N_MISSING}
#define FIN_MISSING0 {FIN_MISSING0}
#define FIN_PACKING {FIN_PACKING}
#define FIN_SCALE {FIN_SCALE}
#define FIN_OFFSET {FIN_OFFSET}
#define PACK_SCALE {PACK_SCALE}
#define PACK_OFFSET {PACK_OFFSET}
#define PACK_FLOAT32 {PACK_FLOAT32}

// What the elements of tile j share (the tile and variable table rows).
struct zd_tile {
    const long long* var;     // its variable's row
    const long long* levels;  // its variable's rows of the level table
    const int* chunks;        // its row of tile_chunks
    long long v, out0, total, item;  // v: its variable
    long long st, sl, sy, sx;        // element strides of a decoded chunk
    int t, y0, x0, cy, cx, channel0, code, hw, h, w, n_y, n_x;
    int y0q, x0q;  // y0 / cy, x0 / cx: the tile's first chunk row and column
    bool swap;
};

__device__ __forceinline__ zd_tile zd_tile_of(const long long* tiles,
                                              const long long* variables,
                                              const long long* levels,
                                              const int* tile_chunks, const int j,
                                              const int n_l, const int n_y, const int n_x,
                                              const int h, const int w) {
    zd_tile s;
    const long long* tile = tiles + (long long)j * N_TILE_FIELDS;
    s.v = tile[TILE_VAR];
    s.var = variables + s.v * N_VAR_FIELDS;
    s.levels = levels + s.var[VAR_LEVEL0] * N_LEVEL_FIELDS;
    s.chunks = tile_chunks + (long long)j * n_l * n_y * n_x;
    s.t = (int)tile[TILE_T];
    s.y0 = (int)tile[TILE_Y0];
    s.x0 = (int)tile[TILE_X0];
    s.out0 = tile[TILE_OUT0];
    s.st = s.var[VAR_ST];
    s.sl = s.var[VAR_SL];
    s.sy = s.var[VAR_SY];
    s.sx = s.var[VAR_SX];
    s.cy = (int)s.var[VAR_CY];
    s.cx = (int)s.var[VAR_CX];
    s.channel0 = (int)s.var[VAR_CHANNEL0];
    s.code = (int)s.var[VAR_CODE];
    s.swap = s.var[VAR_SWAP] != 0;
    s.item = s.var[VAR_ITEMSIZE];
    s.hw = h * w;
    s.h = h;
    s.w = w;
    s.n_y = n_y;
    s.n_x = n_x;
    s.y0q = s.y0 / s.cy;
    s.x0q = s.x0 / s.cx;
    s.total = s.var[VAR_LEVELS] * s.hw;
    return s;
}

// What the elements of row `row` = (level, y) of tile `s` share, for row in
// [0, levels * H): its row of chunk cells in tile_chunks, its element offset in
// those chunks at x = 0 (less the column's), its channel, its output offset at
// x = 0. Channel `level` of the variable is in run levels[level].run of the
// tile's level runs, at level levels[level].src of that run's chunk.
struct zd_row {
    int cell, channel;
    long long src, o;
};

__device__ __forceinline__ zd_row zd_row_of(const zd_tile& s, const int row) {
    zd_row r;
    const int level = row / s.h;
    const int y = row - level * s.h;
    const int yy = s.y0 + y;
    const int yq = yy / s.cy;
    const long long* lv = s.levels + (long long)level * N_LEVEL_FIELDS;
    r.cell = ((int)lv[LEVEL_RUN] * s.n_y + (yq - s.y0q)) * s.n_x;
    r.src = (long long)s.t * s.st + lv[LEVEL_SRC] * s.sl + (long long)(yy - yq * s.cy) * s.sy;
    r.channel = s.channel0 + level;
    r.o = s.out0 + (long long)r.channel * s.hw + (long long)y * s.w;
    return r;
}

// Element (level, y, x) of tile `s`, in its row `r` (zd_row_of): the slot of its
// chunk (< 0: missing), its element offset in the chunk (`src`), its channel and
// its output offset (`o`). The element is in chunk tile_chunks[j, run, (y0 + y) /
// cy - y0 / cy, (x0 + x) / cx - x0 / cx], at (t, src, (y0 + y) % cy, (x0 + x) %
// cx) inside it (through the chunk's stored strides), and goes to out[b, frame,
// channel0 + level, y, x] (tile_out0 holds (b, frame)). One integer division per
// element.
__device__ __forceinline__ long long zd_element(const zd_tile& s,
                                                const long long* chunk_slots, const zd_row& r,
                                                const int x, long long* src, int* channel,
                                                long long* o) {
    const int xx = s.x0 + x;
    const int xq = xx / s.cx;
    *src = r.src + (long long)(xx - xq * s.cx) * s.sx;
    *channel = r.channel;
    *o = r.o + x;
    return chunk_slots[s.chunks[r.cell + xq - s.x0q]];
}

// One block column (blockIdx.x) per tile j; blockIdx.y and threadIdx.y stride
// over its rows (level, y) (zd_row_of), threadIdx.x over the columns x of a row
// (zd_element): launched with gather_block(W) threads (kernels.py).
extern "C" __global__ void zarrdali_gather(const unsigned char* __restrict__ decoded,
                                           const long long* __restrict__ tiles,
                                           const int* __restrict__ tile_chunks,
                                           const long long* __restrict__ chunk_slots,
                                           const long long* __restrict__ variables,
                                           const long long* __restrict__ levels,
                                           const int n_tiles,
                                           const int n_l, const int n_y, const int n_x,
                                           const int h, const int w,
                                           out_t* __restrict__ out) {
    const int j = blockIdx.x;
    if (j >= n_tiles) return;
    const zd_tile s = zd_tile_of(tiles, variables, levels, tile_chunks, j, n_l, n_y, n_x, h,
                                 w);
    union { long long bits; out_t value; } fill;
    fill.bits = s.var[VAR_FILL];
    const int rows = (int)s.var[VAR_LEVELS] * s.h;
    for (int row = blockIdx.y * blockDim.y + threadIdx.y; row < rows;
         row += gridDim.y * blockDim.y) {
        const zd_row r = zd_row_of(s, row);
        for (int x = threadIdx.x; x < s.w; x += blockDim.x) {
            long long src, o;
            int c;
            const long long slot = zd_element(s, chunk_slots, r, x, &src, &c, &o);
            if (slot < 0) {  // missing chunk
                out[o] = fill.value;
                continue;
            }
            out[o] = zd_load(decoded + slot + src * s.item, s.code, s.swap);
        }
    }
}
"""

_FINISH_SOURCE = r"""
// The element at p (dtype `code`, bytes swapped when `swap`), zero-extended bits.
__device__ __forceinline__ unsigned long long zd_bits(const unsigned char* p, const int item,
                                                      const bool swap) {
    switch (item) {
    case 1: return *p;
    case 2: { unsigned short u = *(const unsigned short*)p; return swap ? zd_bswap16(u) : u; }
    case 4: { unsigned int u = *(const unsigned int*)p; return swap ? zd_bswap32(u) : u; }
    }
    const unsigned long long u = *(const unsigned long long*)p;
    return swap ? zd_bswap64(u) : u;
}

// Whether the element at p is not data: NaN, or equal to one of the variable's
// missing values (fin[FIN_MISSING0..], bits of its dtype), compared as that
// dtype: floats by value (-0.0 equals 0.0), integers by their bits.
__device__ __forceinline__ bool zd_invalid(const unsigned char* p, const int code,
                                           const int item, const bool swap,
                                           const long long* fin) {
    const unsigned long long bits = zd_bits(p, item, swap);
    const int n = (int)fin[FIN_N_MISSING];
    bool bad = false;
    if (code == 8) {
        const float v = __uint_as_float((unsigned int)bits);
        bad = v != v;
        for (int m = 0; m < n; ++m)
            bad = bad || v == __uint_as_float((unsigned int)fin[FIN_MISSING0 + m]);
    } else if (code == 9) {
        const double v = __longlong_as_double((long long)bits);
        bad = v != v;
        for (int m = 0; m < n; ++m)
            bad = bad || v == __longlong_as_double(fin[FIN_MISSING0 + m]);
    } else {
        for (int m = 0; m < n; ++m)
            bad = bad || bits == (unsigned long long)fin[FIN_MISSING0 + m];
    }
    return bad;
}

// The value of the element at p as float: a C cast, or where the variable is
// CF-packed (fin[FIN_PACKING]) x * scale_factor + add_offset in double, each
// operation rounded on its own (no fused multiply-add: the CPU path's numpy
// arithmetic), then rounded to float once; in float with the attributes
// rounded to float first where xarray unpacks so (PACK_FLOAT32, zarrdali/store/cf.py).
__device__ __forceinline__ float zd_value(const unsigned char* p, const int code,
                                          const bool swap, const long long* fin) {
    const int packing = (int)fin[FIN_PACKING];
    if (!packing) return zd_load_as<float>(p, code, swap);
    if (packing & PACK_FLOAT32) {  // a float32 variable xarray unpacks in float32
        float f = zd_load_as<float>(p, code, swap);
        if (packing & PACK_SCALE) f = __fmul_rn(f, (float)__longlong_as_double(fin[FIN_SCALE]));
        if (packing & PACK_OFFSET) f = __fadd_rn(f, (float)__longlong_as_double(fin[FIN_OFFSET]));
        return f;
    }
    double d = zd_load_as<double>(p, code, swap);
    if (packing & PACK_SCALE) d = __dmul_rn(d, __longlong_as_double(fin[FIN_SCALE]));
    if (packing & PACK_OFFSET) d = __dadd_rn(d, __longlong_as_double(fin[FIN_OFFSET]));
    return __double2float_rn(d);
}

// The gather of zarrdali_gather, finishing each element as the CPU path does
// (batch/finish.py): cast to float (CF-unpacked: zd_value), (x - mean[c]) /
// std[c] in float when `normalize`, an invalid value (zd_invalid) replaced by
// `nan_fill` when `fill_missing` (NaN for CF decoding), and when `write_mask`
// mask = 1 where valid, 0 where not. A missing chunk holds the fill value
// (fin[FIN_FILL]), finished the same way. stats: [C, 2] (mean, std); finish:
// [V, N_FIN_FIELDS].
extern "C" __global__ void zarrdali_gather_finish(const unsigned char* __restrict__ decoded,
                                                  const long long* __restrict__ tiles,
                                                  const int* __restrict__ tile_chunks,
                                                  const long long* __restrict__ chunk_slots,
                                                  const long long* __restrict__ variables,
                                                  const long long* __restrict__ levels,
                                                  const long long* __restrict__ finish,
                                                  const float* __restrict__ stats,
                                                  const int n_tiles,
                                                  const int n_l, const int n_y, const int n_x,
                                                  const int h, const int w,
                                                  const int normalize, const int fill_missing,
                                                  const float nan_fill, const int write_mask,
                                                  float* __restrict__ out,
                                                  unsigned char* mask) {
    const int j = blockIdx.x;
    if (j >= n_tiles) return;
    const zd_tile s = zd_tile_of(tiles, variables, levels, tile_chunks, j, n_l, n_y, n_x, h,
                                 w);
    const long long* fin = finish + s.v * N_FIN_FIELDS;
    const unsigned char* fill = (const unsigned char*)(fin + FIN_FILL);  // native order
    const int rows = (int)s.var[VAR_LEVELS] * s.h;
    for (int row = blockIdx.y * blockDim.y + threadIdx.y; row < rows;
         row += gridDim.y * blockDim.y) {
        const zd_row r = zd_row_of(s, row);
        for (int x = threadIdx.x; x < s.w; x += blockDim.x) {
            long long src, o;
            int c;
            const long long slot = zd_element(s, chunk_slots, r, x, &src, &c, &o);
            const bool missing = slot < 0;
            const unsigned char* p = missing ? fill : decoded + slot + src * s.item;
            const bool sw = missing ? false : s.swap;
            float v = zd_value(p, s.code, sw, fin);
            const bool bad = zd_invalid(p, s.code, (int)s.item, sw, fin);
            if (normalize) v = (v - stats[2 * c]) / stats[2 * c + 1];
            if (fill_missing && bad) v = nan_fill;
            out[o] = v;
            if (write_mask) mask[o] = bad ? 0 : 1;
        }
    }
}
"""

# The crc32c gate (decode.BatchedDecoder._check_crc): after nvCOMP's batched
# CRC32-C of the staged chunks, compare each with the 4 bytes stored after it
# (little-endian) and keep a chunk that fails (or whose CRC call failed) from the
# decoder: its decode input becomes its algorithm's stand-in stream, valid and
# decoding to one byte (corrupt input to nvCOMP is undefined behaviour).
# ``jobs``: [5, n] int64, rows as decode.CRC_*: staged offset of the stored chunk,
# bytes before its crc32c, decode-table column (-1: none), stand-in offset and size.
CRC_GATE_SOURCE = r"""
extern "C" __global__ void zarrdali_crc_gate(const unsigned char* __restrict__ staging,
                                             const long long* __restrict__ jobs,
                                             const unsigned int* __restrict__ crcs,
                                             const int* __restrict__ statuses, const int n,
                                             const unsigned long long stand_ins,
                                             unsigned long long* __restrict__ in_ptrs,
                                             unsigned long long* __restrict__ in_bytes,
                                             int* __restrict__ bad) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    const unsigned char* p = staging + jobs[k] + jobs[n + k];
    const unsigned int stored = (unsigned int)p[0] | ((unsigned int)p[1] << 8)
                                | ((unsigned int)p[2] << 16) | ((unsigned int)p[3] << 24);
    const int failed = statuses[k] != 0 || crcs[k] != stored;
    bad[k] = failed;
    const long long column = jobs[2 * n + k];
    if (failed && column >= 0) {
        in_ptrs[column] = stand_ins + (unsigned long long)jobs[3 * n + k];
        in_bytes[column] = (unsigned long long)jobs[4 * n + k];
    }
}
"""

_COLUMNS = {
    name: getattr(gpu_plan, name)
    for name in dir(gpu_plan)
    if name.startswith(
        ("TILE_", "VAR_", "N_TILE_", "N_VAR_", "FIN_", "N_FIN_", "LEVEL_", "N_LEVEL_", "PACK_")
    )
}


def gather_source(out_dtype: np.dtype) -> str:
    """CUDA source of the gather kernel writing ``out_dtype``."""
    key = dtype_key(out_dtype)
    if key not in CTYPES:
        raise NotImplementedError(
            f"the GPU path assembles batches of dtype {np.dtype(out_dtype)} not yet; "
            f"use device='cpu'"
        )
    source = _GATHER_SOURCE.replace("OUT_CTYPE", CTYPES[key])
    for name, value in _COLUMNS.items():
        source = source.replace("{" + name + "}", str(value))
    return source


def finish_source() -> str:
    """CUDA source of the finishing gather kernel (``zarrdali_gather_finish``,
    float32 output, with ``zarrdali_gather`` for float32 beside it)."""
    return gather_source(np.dtype(np.float32)) + _FINISH_SOURCE


def grid_y(max_items: int) -> int:
    """Block rows along y for jobs of up to ``max_items`` items (about 4 per thread)."""
    return int(min(max(1, -(-max_items // (THREADS * 4))), 65535))


def gather_block(w: int) -> tuple[int, int]:
    """Threads of a gather block, ``(x, y)``: up to a warp across a row of ``w``
    columns (the power of two at or above ``w``, at most 32), the rest of
    :data:`THREADS` down the rows."""
    bx = 1 << min(5, max(0, (int(w) - 1).bit_length()))
    return bx, THREADS // bx


def gather_grid_y(max_rows: int, w: int) -> int:
    """Block rows of the gather for tiles of up to ``max_rows`` rows (levels x H)."""
    by = gather_block(w)[1]
    return int(min(max(1, -(-int(max_rows) // by)), 65535))
