"""CUDA sources of the GPU backend's kernels (compiled by CuPy's NVRTC on first use).

Header-free C++: NVRTC compiles them without the CUDA runtime headers.

* ``zarrdali_pack``: byte copies ``(source offset, destination offset, bytes)``,
  one block row per job: aligns payloads in the staging buffer and copies
  uncompressed chunks to their decoded slots.
* ``zarrdali_gather``: assembles the batch ``[B, T, C, H, W]`` from the decoded
  chunks, one block row per tile (variable, sample, frame); each thread derives
  its element's source chunk and offset from the gather tables of
  :func:`zarrdali.backends.gpu.plan.gather_tables` (column numbers as there),
  loads it with a byte swap for big-endian chunks, casts it to the batch dtype,
  or writes the fill value where the chunk is missing.
  :func:`zarrdali.backends.gpu.plan.gather_reference` is its numpy twin.
"""

from __future__ import annotations

import numpy as np

from . import plan as gpu_plan
from .plan import CTYPES, dtype_key

THREADS = 256  # threads per block of both kernels

PACK_SOURCE = r"""
extern "C" __global__ void zarrdali_pack(const unsigned char* __restrict__ src,
                                         unsigned char* __restrict__ dst,
                                         const long long* __restrict__ jobs,
                                         const int n_jobs) {
    // jobs: [n_jobs, 3] (source offset, destination offset, bytes)
    const int j = blockIdx.x;
    if (j >= n_jobs) return;
    const long long s = jobs[3 * j], d = jobs[3 * j + 1], n = jobs[3 * j + 2];
    for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.y * blockDim.x) {
        dst[d + i] = src[s + i];
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
// when the chunk is big-endian, and convert it to the output type (a C cast,
// as numpy's astype does).
__device__ __forceinline__ out_t zd_load(const unsigned char* p, const int code,
                                         const bool swap) {
    switch (code) {
    case 0: return (out_t)(*(const signed char*)p);
    case 1: return (out_t)(*p);
    case 2: { unsigned short u = *(const unsigned short*)p; if (swap) u = zd_bswap16(u);
              return (out_t)(short)u; }
    case 3: { unsigned short u = *(const unsigned short*)p; if (swap) u = zd_bswap16(u);
              return (out_t)u; }
    case 4: { unsigned int u = *(const unsigned int*)p; if (swap) u = zd_bswap32(u);
              return (out_t)(int)u; }
    case 5: { unsigned int u = *(const unsigned int*)p; if (swap) u = zd_bswap32(u);
              return (out_t)u; }
    case 6: { unsigned long long u = *(const unsigned long long*)p;
              if (swap) u = zd_bswap64(u); return (out_t)(long long)u; }
    case 7: { unsigned long long u = *(const unsigned long long*)p;
              if (swap) u = zd_bswap64(u); return (out_t)u; }
    case 8: { unsigned int u = *(const unsigned int*)p; if (swap) u = zd_bswap32(u);
              return (out_t)__uint_as_float(u); }
    case 9: { unsigned long long u = *(const unsigned long long*)p;
              if (swap) u = zd_bswap64(u); return (out_t)__longlong_as_double((long long)u); }
    }
    return (out_t)0;
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

// One block row (blockIdx.x) per tile j; blockIdx.y and the threads stride over
// its elements i = (level, y, x) in [0, levels * H * W). The element is in chunk
// tile_chunks[j, level / cl, (y0 + y) / cy - y0 / cy, (x0 + x) / cx - x0 / cx],
// at (t, level % cl, (y0 + y) % cy, (x0 + x) % cx) inside it, and goes to
// out[b, frame, channel0 + level, y, x] (tile_out0 holds (b, frame)).
extern "C" __global__ void zarrdali_gather(const unsigned char* __restrict__ decoded,
                                           const long long* __restrict__ tiles,
                                           const int* __restrict__ tile_chunks,
                                           const long long* __restrict__ chunk_slots,
                                           const long long* __restrict__ variables,
                                           const int n_tiles,
                                           const int n_l, const int n_y, const int n_x,
                                           const int h, const int w,
                                           out_t* __restrict__ out) {
    const int j = blockIdx.x;
    if (j >= n_tiles) return;
    const long long* tile = tiles + (long long)j * N_TILE_FIELDS;
    const long long* var = variables + tile[TILE_VAR] * N_VAR_FIELDS;
    const int t = (int)tile[TILE_T];
    const int y0 = (int)tile[TILE_Y0];
    const int x0 = (int)tile[TILE_X0];
    const long long out0 = tile[TILE_OUT0];
    const int cl = (int)var[VAR_CL], cy = (int)var[VAR_CY], cx = (int)var[VAR_CX];
    const int channel0 = (int)var[VAR_CHANNEL0];
    const int code = (int)var[VAR_CODE];
    const bool swap = var[VAR_SWAP] != 0;
    const long long item = var[VAR_ITEMSIZE];
    union { long long bits; out_t value; } fill;
    fill.bits = var[VAR_FILL];
    const int* chunks = tile_chunks + (long long)j * n_l * n_y * n_x;
    const int hw = h * w;
    const long long total = var[VAR_LEVELS] * hw;
    for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.y * blockDim.x) {
        const int level = (int)(i / hw);
        const int r = (int)(i - (long long)level * hw);
        const int y = r / w;
        const int x = r - y * w;
        const int yy = y0 + y, xx = x0 + x;
        const int chunk =
            chunks[((level / cl) * n_y + (yy / cy - y0 / cy)) * n_x + (xx / cx - x0 / cx)];
        const long long slot = chunk_slots[chunk];
        const long long o = out0 + (long long)(channel0 + level) * hw + r;
        if (slot < 0) {  // missing chunk
            out[o] = fill.value;
            continue;
        }
        const long long src =
            (((long long)t * cl + level % cl) * cy + yy % cy) * cx + xx % cx;
        out[o] = zd_load(decoded + slot + src * item, code, swap);
    }
}
"""

_COLUMNS = {
    name: getattr(gpu_plan, name)
    for name in dir(gpu_plan)
    if name.startswith(("TILE_", "VAR_", "N_TILE_", "N_VAR_"))
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


def grid_y(max_items: int) -> int:
    """Block rows along y for jobs of up to ``max_items`` items (about 4 per thread)."""
    return int(min(max(1, -(-max_items // (THREADS * 4))), 65535))
