"""Gather stage of the GPU engine: the launches of the pack and gather kernels.

The CUDA sources are in :mod:`zarrdali.gpu.kernels`; this module
compiles them once per process and device (:class:`Kernels`: NVRTC with
IEEE float arithmetic, :data:`NVRTC_OPTIONS`, loaded with
``cupy.RawModule(path=...)``) and launches them on the current CuPy stream:

* :func:`launch_copies`: ``[K, 3]`` byte copies (source offset, destination
  offset, bytes) between two device buffers, one launch: payload packing inside
  staging, uncompressed chunks to their decoded slots, and payloads into the
  GPU chunk cache's arena;
* :func:`launch_gather`: the batch ``[B, T, C, H, W]`` from the decoded chunks,
  one launch, from the four gather tables of
  :func:`~zarrdali.gpu.describe.gather_tables` (uploaded once per batch);
  with a :class:`~zarrdali.gpu.describe.GatherFinish`, finished in float32
  (normalized, missing values filled) and its mask written in the same launch.

Both return the device arrays they uploaded, which the caller keeps alive
until the stream has passed the launch.

VERIFIED WITHOUT A GPU: the kernel sources compile with nvcc and the gather
kernel's own source, compiled as host C++, reproduces the CPU backend
(``tests/test_gpu_backend.py``); the launch arguments reach numpy twins of the
kernels on the CPU stand-in (``tests/test_gpu_engine.py``). NOT VERIFIED
without a GPU: the launches themselves (NVRTC, grid sizes on a device).
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from zarrdali.gpu.describe import GatherFinish, GatherTables
from zarrdali.gpu.kernels import (
    PACK_SOURCE,
    THREADS,
    finish_source,
    gather_block,
    gather_grid_y,
    gather_source,
    grid_y,
)

# NVRTC options of every kernel: float arithmetic as numpy does it on the CPU
# (denormals kept, no fused multiply-add, IEEE division and square root), so
# that the GPU path's batches equal the CPU path's bit for bit. CuPy's
# RawKernel/RawModule(code=...) append ``-ftz=true`` to whatever they are given
# (``cupy/cuda/compiler.py``, ``_compile_with_cache_cuda``), which flushes
# denormals to zero in every float subtract, divide, convert and compare (a
# float64 -> float32 denormal became 0, and a denormal compared equal to a
# missing value of 0.0). Hence NVRTC here and the binary loaded with
# ``RawModule(path=...)``, which compiles nothing.
NVRTC_OPTIONS = ("--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=false")

_binaries: dict[tuple[str, int], Path] = {}  # (source, device) -> the compiled module's file
_binaries_lock = threading.Lock()
_binary_dir: Path | None = None
_ftz_warned = False


def _binary_folder() -> Path:
    """This process's folder of compiled kernels (removed when it exits)."""
    global _binary_dir
    if _binary_dir is None:
        _binary_dir = Path(tempfile.mkdtemp(prefix="zarrdali-kernels-"))
        atexit.register(shutil.rmtree, _binary_dir, True)
    return _binary_dir


def compile_kernel(cp: Any, name: str, source: str) -> Any:
    """Kernel ``name`` of ``source``, compiled by NVRTC with :data:`NVRTC_OPTIONS`
    for the current device (once per process and device) and loaded with
    ``cupy.RawModule(path=...)``.

    A CuPy without ``cupy.cuda.compiler.compile_using_nvrtc`` gets
    ``cupy.RawKernel`` (denormals flushed to zero), with a warning."""
    global _ftz_warned
    compile_using_nvrtc = getattr(getattr(cp.cuda, "compiler", None), "compile_using_nvrtc", None)
    if compile_using_nvrtc is None or not hasattr(cp, "RawModule"):
        if not _ftz_warned:
            _ftz_warned = True
            warnings.warn(
                "zarrdali: this CuPy has no cupy.cuda.compiler.compile_using_nvrtc; the GPU "
                "kernels are compiled by cupy.RawKernel, which flushes float denormals to zero "
                "(the GPU path's batches may then differ from the CPU path's on denormals).",
                RuntimeWarning,
                stacklevel=3,
            )
        return cp.RawKernel(source, name)
    device = int(cp.cuda.Device().id)
    with _binaries_lock:
        path = _binaries.get((source, device))
        if path is None:
            binary, _ = compile_using_nvrtc(source, options=NVRTC_OPTIONS)
            if isinstance(binary, str):
                binary = binary.encode()
            digest = hashlib.sha256(binary).hexdigest()[:32]
            path = _binary_folder() / f"{digest}.bin"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(binary)
                tmp.replace(path)
            _binaries[(source, device)] = path
    return cp.RawModule(path=str(path)).get_function(name)


class Kernels:
    """Compiled kernels, by source (thread-safe); :meth:`clear` drops them."""

    def __init__(self, cp: Any, compile: Callable[[Any, str, str], Any] = compile_kernel) -> None:
        self._cp = cp
        self._compile = compile
        self._kernels: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str, source: str) -> Any:
        with self._lock:
            kernel = self._kernels.get((name, source))
            if kernel is None:
                kernel = self._kernels[(name, source)] = self._compile(self._cp, name, source)
        return kernel

    def clear(self) -> None:
        with self._lock:
            self._kernels.clear()


Upload = Callable[[np.ndarray], Any]  # host array -> device array (counted)


def launch_copies(kernels: Kernels, src: Any, dst: Any, jobs: np.ndarray, upload: Upload) -> Any:
    """Byte copies ``jobs`` (``[K, 3]``: source offset, destination offset,
    bytes) from ``src`` to ``dst``; the uploaded jobs (None when there are none)."""
    if not len(jobs):
        return None
    jobs_dev = upload(np.ascontiguousarray(jobs, dtype=np.int64))
    kernel = kernels.get("zarrdali_pack", PACK_SOURCE)
    kernel(
        (len(jobs), grid_y(int(jobs[:, 2].max()))),
        (THREADS,),
        (src, dst, jobs_dev, np.int32(len(jobs))),
    )
    return jobs_dev


def launch_gather(
    kernels: Kernels,
    gather: GatherTables,
    decoded: Any,
    out: Any,
    upload: Upload,
    finish: GatherFinish | None = None,
    mask: Any = None,
) -> list[Any]:
    """The gather kernel over ``gather``'s tables into ``out``; the uploaded tables.

    With ``finish``, the finishing kernel: ``out`` float32, and with
    ``finish.masks`` the uint8 ``mask`` (same shape) written in the same pass."""
    if not gather.n_tiles:
        return []
    tables = [upload(np.ascontiguousarray(a)) for a in gather.arrays]
    _, n_l, n_y, n_x = gather.tile_chunks.shape
    h, w = gather.out_shape[-2:]
    sizes = tuple(np.int32(n) for n in (gather.n_tiles, n_l, n_y, n_x, h, w))
    if gather.max_tile_elements >= 1 << 31:
        raise ValueError("a tile of 2**31 elements or more: the gather indexes them as int")
    block = gather_block(w)
    grid = (gather.n_tiles, gather_grid_y(gather.max_tile_elements // w, w))
    if finish is None:
        kernel = kernels.get("zarrdali_gather", gather_source(gather.out_dtype))
        kernel(grid, block, (decoded, *tables, *sizes, out))
        return tables
    if finish.masks and mask is None:
        raise ValueError("a finish with masks needs the mask array")
    extra = [upload(np.ascontiguousarray(a)) for a in finish.arrays]
    kernel = kernels.get("zarrdali_gather_finish", finish_source())
    flags = (
        np.int32(finish.normalize),
        np.int32(finish.nan_fill is not None),
        np.float32(0.0 if finish.nan_fill is None else finish.nan_fill),
        np.int32(finish.masks),
    )
    # without masks the kernel never writes through its mask pointer: any array will do
    target = mask if finish.masks else out
    kernel(grid, block, (decoded, *tables, *extra, *sizes, *flags, out, target))
    return tables + extra
